"""HPSv2 / HPSv2.1 (Wu et al., 2023): OpenCLIP ViT-H-14 fine-tuned on Human Preference Dataset v2.

The authors' `img_score.py` scores `image_features @ text_features.T` with open_clip's
normalised features: the plain cosine, no logit scale. Images go through their `preprocess_val`
(ToTensor, then a float-tensor bicubic resize of the short side to 224, centre crop, OpenAI mean
and std); text through open_clip's tokenizer (77 tokens, end-of-text kept in the last slot).

open_clip cannot be imported here (it imports torchvision at start-up, which we do not install),
and it does not need to be: ViT-H-14 is the CLIP architecture, so the authors' checkpoint is
mapped onto transformers' `CLIPModel` (exact GELU, LayerNorm eps 1e-5, argmax/eot pooling).

`load(path)` takes one folder holding
    HPS_v2.1_compressed.pt or HPS_v2_compressed.pt   the authors' release ({"state_dict": ...})
    vocab.json + merges.txt (or tokenizer.json)      CLIP's BPE, as in any openai/laion CLIP folder
    open_clip_config.json (optional)                 open_clip's model config; default ViT-H-14
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F

from .clipscore import (CLIP_TOKENIZER, OPENAI_MEAN, OPENAI_STD, default_device, in_batches, require, to_model_pixels,
                        tokenize_clip)

CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
# open_clip's model_configs/ViT-H-14.json (mlp_ratio 4, no QuickGELU)
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}

# open_clip name → transformers CLIPModel name, outside the residual blocks
RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}  # x @ W → Linear
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")


def clip_config(oc: dict, bos_token_id: int, eos_token_id: int):
    """transformers CLIPConfig of an open_clip (non-custom-text) model config."""
    from transformers import CLIPConfig

    v, t = oc["vision_cfg"], oc["text_cfg"]
    return CLIPConfig(
        projection_dim=oc["embed_dim"],
        vision_config=dict(hidden_size=v["width"], intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
                           num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
                           image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="gelu"),
        text_config=dict(hidden_size=t["width"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         max_position_embeddings=t["context_length"], vocab_size=t["vocab_size"], hidden_act="gelu",
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id))


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict under transformers CLIPModel's names (fused qkv split q, k, v)."""
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key.endswith("attn_mask"):  # the causal mask buffer, rebuilt by the model
            continue
        if key in RENAMES:
            out[RENAMES[key]] = value
        elif key in PROJECTIONS:
            out[PROJECTIONS[key]] = value.t().contiguous()
        elif m := RESBLOCK.match(key.replace("attn.in_proj_", "attn.in_proj.")):
            visual, i, name, kind = m.groups()
            prefix = f"{'vision' if visual else 'text'}_model.encoder.layers.{i}."
            if name == "attn.in_proj":
                for proj, part in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{proj}_proj.{kind}"] = part
            elif name in BLOCK:
                out[f"{prefix}{BLOCK[name]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip CLIP checkpoint: unexpected keys {unknown[:8]}")
    return out


def load(path: str | None, batch_size: int = 16, device: str | None = None):
    from transformers import CLIPModel, CLIPTokenizer

    require(path, "hpsv2", ["|".join(CHECKPOINTS), CLIP_TOKENIZER])
    device = default_device(device)
    ckpt = next(os.path.join(path, f) for f in CHECKPOINTS if os.path.isfile(os.path.join(path, f)))
    oc = VIT_H_14
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
        with open(os.path.join(path, "open_clip_config.json")) as f:
            oc = json.load(f)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = from_open_clip(state.get("state_dict", state))
    config = clip_config(oc, tokenizer.bos_token_id, tokenizer.eos_token_id)
    # from a state dict: built on the meta device, so ViT-H's billion weights are not first randomly initialised
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                            output_loading_info=True)
    if info["missing_keys"]:  # (a shape mismatch already raises inside from_pretrained)
        raise ValueError(f"{ckpt!r} does not fit {oc}: missing {sorted(info['missing_keys'])[:8]}")
    model = model.eval().to(device)
    side, context = oc["vision_cfg"]["image_size"], oc["text_cfg"]["context_length"]

    def score_batch(images, prompts):
        pixels = to_model_pixels(images.to(device), side, side, OPENAI_MEAN, OPENAI_STD, pil=False)
        tokens = tokenize_clip(tokenizer, prompts, context, clean=True)
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).pooler_output, dim=-1)
        return (img * txt).sum(-1)  # cosine

    return lambda images, prompts: in_batches(score_batch, images, prompts, batch_size)
