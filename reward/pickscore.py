"""PickScore (Kirstain et al., NeurIPS 2023): CLIP-H fine-tuned on Pick-a-Pic preferences.

The authors' README scores an image as `model.logit_scale.exp() * (text_emb @ image_emb.T)`, both
embeddings L2-normalised: the CLIP logit, about 100 · cos. Text goes through the CLIP processor
with padding=True, truncation=True, max_length=77 (end-of-text kept in the last slot).

`load(path)` takes one transformers CLIP folder: config.json and model.safetensors (or
pytorch_model.bin) of yuvalkirstain/PickScore_v1, with the tokenizer files (vocab.json + merges.txt
or tokenizer.json) and preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, whose
processor the authors use, copied in beside them (without preprocessor_config.json: 224 px, OpenAI
mean and std, which is what that processor holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .clipscore import (CLIP_TOKENIZER, HF_WEIGHTS, default_device, in_batches, processor_settings, require,
                        to_model_pixels, tokenize_clip)


def load(path: str | None, batch_size: int = 16, device: str | None = None):
    from transformers import CLIPModel, CLIPTokenizer

    require(path, "pickscore", ["config.json", HF_WEIGHTS, CLIP_TOKENIZER])
    device = default_device(device)
    model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval().to(device)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    size, crop, mean, std = processor_settings(path, model.config.vision_config.image_size)
    max_length = model.config.text_config.max_position_embeddings  # 77

    def score_batch(images, prompts):
        pixels = to_model_pixels(images.to(device), size, crop, mean, std)
        tokens = tokenize_clip(tokenizer, prompts, max_length)
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).pooler_output, dim=-1)
        return model.logit_scale.exp() * (img * txt).sum(-1)

    return lambda images, prompts: in_batches(score_batch, images, prompts, batch_size)
