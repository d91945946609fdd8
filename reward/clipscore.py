"""CLIPScore: how well an image matches its caption, by the cosine of CLIP's two embeddings.

Two published definitions, one CLIP forward:

    hessel        2.5 · max(cos(E_I, E_C), 0), caption prefixed "A photo depicts "
                  (Hessel et al., EMNLP 2021, `clipscore.py`; the paper's model is ViT-B/32)
    torchmetrics  max(100 · cos(E_I, E_C), 0), caption as given
                  (torchmetrics' `clip_score`; its default model is ViT-L/14)

Text is cut to CLIP's 77 positions as each does it: Hessel's `clip.tokenize(truncate=True)` keeps
the end-of-text token in the last slot (the tokenizer's own truncation does the same), while
torchmetrics slices the padded ids to 77 and so drops it for longer captions. torchmetrics clamps
the batch mean at 0; we clamp each sample, which agrees whenever no cosine is negative.

`load(path)` takes a transformers CLIP folder (e.g. a snapshot of openai/clip-vit-base-patch32):
config.json, model.safetensors (or pytorch_model.bin), the tokenizer (vocab.json + merges.txt or
tokenizer.json) and, optionally, preprocessor_config.json (without it: resize and crop to the
vision tower's image_size with OpenAI's mean and std, the CLIP processor's defaults).

The helpers below (`require`, `processor_settings`, `to_model_pixels`, `in_batches`) are shared by
the other reward modules. Images go to each model as its authors' PIL pipeline would feed them:
8-bit pixels, bicubic resize of the short side (antialiased, as PIL does), centre crop, mean/std.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_WEIGHTS = "model.safetensors|pytorch_model.bin|model.safetensors.index.json"
CLIP_TOKENIZER = "vocab.json+merges.txt|tokenizer.json"
VARIANTS = {"hessel": (2.5, "A photo depicts "), "torchmetrics": (100.0, "")}  # weight w, caption prefix


def require(path: str | None, what: str, files: Sequence[str]) -> str:
    """Fail early, naming the folder and the files it lacks, instead of a hub lookup deep inside.

    Each entry of `files` is one need, written "a|b" for either of two files and "a+b" for both."""
    expected = ", ".join(f.replace("|", " or ").replace("+", " and ") for f in files)
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: model folder {path!r} does not exist (pass '{what}:PATH'); "
                                f"expected a folder holding {expected}")
    def present(option):
        return all(os.path.isfile(os.path.join(path, f)) for f in option.split("+"))
    missing = [f for f in files if not any(present(o) for o in f.split("|"))]
    if missing:
        lacks = "; ".join(f.replace("|", " or ").replace("+", " and ") for f in missing)
        raise FileNotFoundError(f"{what}: folder {path!r} lacks {lacks}; expected {expected}")
    return path


def processor_settings(path: str, image_size: int) -> tuple[int, int, tuple, tuple]:
    """(short side after resize, crop side, mean, std) from the folder's preprocessor_config.json."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return image_size, image_size, OPENAI_MEAN, OPENAI_STD
    with open(file) as f:
        cfg = json.load(f)
    size = cfg.get("size", image_size)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", size)
    crop = crop.get("height") if isinstance(crop, dict) else crop
    return int(size), int(crop), tuple(cfg.get("image_mean", OPENAI_MEAN)), tuple(cfg.get("image_std", OPENAI_STD))


def to_model_pixels(images: torch.Tensor, size: int, crop: int, mean, std, pil: bool = True) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → (N, 3, crop, crop) normalised model input.

    The image is first rounded to 8 bits, as when saved and scored from disk. The short side is
    resized to `size` (long side int(size · long / short), torchvision's and transformers' rule)
    with antialiased bicubic, which is PIL's filter; `pil=True` also rounds and clips to 8 bits
    after each of the two passes, as PIL's uint8 resize does (`pil=False`: one float-tensor
    resize, as in HPSv2's pipeline). The centre crop offset is round((H − crop) / 2), torchvision's."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255
    h, w = x.shape[-2:]
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if new != (h, w) and pil:  # PIL: a horizontal then a vertical pass, each stored as 8 bits
        for size_hw in ((h, new[1]), new):
            x = F.interpolate(x, size=size_hw, mode="bicubic", antialias=True, align_corners=False)
            x = (x.clamp(0, 1) * 255).round() / 255
    elif new != (h, w):
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = round((new[0] - crop) / 2), round((new[1] - crop) / 2)
    x = x[..., top:top + crop, left:left + crop]
    mean, std = x.new_tensor(mean).view(1, 3, 1, 1), x.new_tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


def in_batches(score_batch: Callable, images: torch.Tensor, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Scores (N,) float32 on the CPU, from `score_batch(images, prompts)` on slices of batch_size."""
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    with torch.no_grad():
        out = [score_batch(images[i:i + batch_size], prompts[i:i + batch_size])
               for i in range(0, len(prompts), batch_size)]
    return torch.cat(out).float().cpu() if out else torch.zeros(0)


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def tokenize_clip(tokenizer, prompts: list[str], max_length: int, slice_ids: bool = False,
                  clean: bool = False) -> dict:
    """CLIP tokens padded to the longest prompt. The default truncation keeps end-of-text in the
    last slot (CLIP's `truncate=True`); `slice_ids` cuts the ids instead, as torchmetrics does.
    `clean` is the OpenAI / open_clip tokenizers' basic_clean (html-unescape twice, strip) that
    transformers' tokenizer lacks; their ftfy pass leaves ordinary text unchanged and is skipped."""
    if clean:
        prompts = [html.unescape(html.unescape(p)).strip() for p in prompts]
    if not slice_ids:
        return tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    return {k: v[:, :max_length] for k, v in batch.items()}


def load(path: str | None, variant: str = "hessel", batch_size: int = 32, device: str | None = None):
    """CLIPScore from a local CLIP folder; `variant` is "hessel" (default) or "torchmetrics"."""
    from transformers import CLIPModel, CLIPTokenizer

    if variant not in VARIANTS:
        raise ValueError(f"clipscore variant {variant!r}: choose from {sorted(VARIANTS)}")
    require(path, "clipscore", ["config.json", HF_WEIGHTS, CLIP_TOKENIZER])
    device = default_device(device)
    model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval().to(device)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    size, crop, mean, std = processor_settings(path, model.config.vision_config.image_size)
    max_length = model.config.text_config.max_position_embeddings  # 77
    w, prefix = VARIANTS[variant]
    hessel = variant == "hessel"  # OpenAI's clip package; torchmetrics goes through transformers' processor

    def score_batch(images, prompts):
        pixels = to_model_pixels(images.to(device), size, crop, mean, std)
        tokens = tokenize_clip(tokenizer, [prefix + p for p in prompts], max_length, slice_ids=not hessel, clean=hessel)
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).pooler_output, dim=-1)
        return w * (img * txt).sum(-1).clamp(min=0)  # w · max(cos, 0)

    return lambda images, prompts: in_batches(score_batch, images, prompts, batch_size)
