"""Stable Diffusion 3 / 3.5 weights as flowalign parts, from a local diffusers folder.

The folder is what `StableDiffusion3Pipeline.save_pretrained` writes (the layout of the hub
repositories): model_index.json, transformer/, vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/,
scheduler/. `load_sd3(path)` gives the transformer converted into our MMDiT (`convert.py`,
SD3.5's QK-norm included), the VAE as a `LatentSpace` with SD3's shift and scale, and the three
text encoders as an `SD3TextEncoder`, a `TextEmbedder` whose conditioning is exactly diffusers'
`StableDiffusion3Pipeline.encode_prompt`:

    context = [pad(CLIP-L ⊕ CLIP-G penultimate states, to T5's width) ; T5 states]   (N, 77 + 256, 4096)
    pooled  = CLIP-L text_embeds ⊕ CLIP-G text_embeds                                   (N, 768 + 1280)

(⊕ along channels, ; along the sequence). Unlike `text.TextEncoder`, no attention mask is passed
and padding states are kept: SD3 was trained on them. Without T5 the T5 block is zeros.

Classifier-free guidance: SD3's unconditional branch is the encoded empty prompt, `encode([""])`
(diffusers' default negative prompt), not the zeros that flowalign's own models are trained
with; pass it as `sample(..., uncond=text.encode([""]))`, as `sample_sd3` does.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from .convert import config_from_diffusers, from_diffusers
from .errors import InputError, MissingInput
from .sampling import sample
from .text import TextEmbedder, TextEncoder
from .vae import LatentSpace

# Scheduler options whose schedule `euler_times` does not reproduce; SD3 and SD3.5 use none of them.
UNSUPPORTED_SCHEDULER = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "stochastic_sampling",
                         "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def is_sd3_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, "transformer"))


def _read_json(path: str, *parts: str) -> dict:
    with open(os.path.join(path, *parts)) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Text: the two CLIPs side by side, then T5, as StableDiffusion3Pipeline.encode_prompt
# ---------------------------------------------------------------------------------------------


class CLIPPair(TextEncoder):
    """CLIP-L and CLIP-G read as one part: penultimate states concatenated along channels
    (N, 77, wL + wG), projected pooled vectors concatenated (N, pL + pG)."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32):
        # Not TextEncoder.__init__ (one spec, one folder, masked states): two models, SD3's reading.
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        self.kind, self.spec, self.device = "clip", f"sd3:{path}", device
        self.tokenizers = [AutoTokenizer.from_pretrained(os.path.join(path, f"tokenizer{s}"), local_files_only=True)
                           for s in ("", "_2")]
        self.models = [CLIPTextModelWithProjection.from_pretrained(
            os.path.join(path, f"text_encoder{s}"), local_files_only=True, dtype=dtype).to(device).eval()
            .requires_grad_(False) for s in ("", "_2")]
        self.max_length = self.tokenizers[0].model_max_length  # 77; diffusers uses CLIP-L's for both
        self.width = sum(m.config.hidden_size for m in self.models)
        self.pooled_width = sum(m.config.projection_dim for m in self.models)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], []
        for tokenizer, model in zip(self.tokenizers, self.models):
            ids = tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = model(ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (N, 77, w): the penultimate layer, unmasked
            pooled.append(out.text_embeds)  # (N, p): the projected EOS state
        return torch.cat(states, dim=-1).float().cpu(), torch.cat(pooled, dim=-1).float().cpu()


class T5Part(TextEncoder):
    """T5-XXL's last states (N, max_sequence_length, 4096), unmasked; zeros when the folder has no
    T5 or it is left out (`t5=False`), as diffusers does with `text_encoder_3=None`."""

    def __init__(self, path: str | None, max_length: int, width: int, device="cpu", dtype=torch.float32):
        self.kind, self.spec, self.device = "t5", f"sd3:{path}" if path else "sd3:no-t5", device
        self.max_length, self.width, self.pooled_width = max_length, width, 0
        self.tokenizer = self.model = None
        if path is not None:
            from transformers import AutoTokenizer, T5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer_3"), local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(os.path.join(path, "text_encoder_3"), local_files_only=True,
                                                        dtype=dtype).to(device).eval().requires_grad_(False)
            self.width = self.model.config.d_model

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(captions)
        if self.model is None:
            return torch.zeros(n, self.max_length, self.width), torch.zeros(n, 0)
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        return self.model(ids.to(self.device)).last_hidden_state.float().cpu(), torch.zeros(n, 0)


class SD3TextEncoder(TextEmbedder):
    """SD3's three text encoders behind TextEmbedder's interface (`encode`, the per-caption cache,
    `context_dim`, `pooled_dim`, `layout`). The layout has two parts, "clip" (both CLIPs: they
    share sequence positions) and "t5"."""

    def __init__(self, path: str, max_sequence_length: int = 256, t5: bool = True, device="cpu",
                 dtype=torch.float32, batch_size: int = 64):
        has_t5 = t5 and (_read_json(path, "model_index.json").get("text_encoder_3") or [None])[0] is not None
        width = _read_json(path, "transformer", "config.json")["joint_attention_dim"]  # T5's d_model in SD3
        parts = [CLIPPair(path, device, dtype),
                 T5Part(path if has_t5 else None, max_sequence_length, width, device, dtype)]
        super().__init__(parts, context_dim=parts[1].width, batch_size=batch_size)  # CLIP padded to T5's width


# ---------------------------------------------------------------------------------------------
# The whole folder
# ---------------------------------------------------------------------------------------------


def scheduler_shift(path: str) -> float:
    """The folder's FlowMatchEulerDiscreteScheduler shift (3.0 for SD3 and SD3.5)."""
    cfg = _read_json(path, "scheduler", "scheduler_config.json")
    if used := [k for k in UNSUPPORTED_SCHEDULER if cfg.get(k)] + (
            ["num_train_timesteps"] if cfg.get("num_train_timesteps", 1000) != 1000 else []):
        raise InputError(f"{path}: scheduler options {used} are not supported: flowalign's Euler schedule is "
                         "diffusers' FlowMatchEulerDiscreteScheduler with a constant shift and 1000 train steps")
    return float(cfg.get("shift", 1.0))


def load_sd3(path: str, device="cpu", dtype=torch.float32, max_sequence_length: int = 256, t5: bool = True,
             text_device=None, text_dtype=None):
    """→ (MMDiT, SD3TextEncoder, LatentSpace, info) from a local diffusers SD3 / SD3.5 folder.
    The transformer and text encoders load in `dtype` (text: `text_dtype`, on `text_device`, if
    given); the VAE stays fp32 on the CPU as `LatentSpace` keeps it. `t5=False` drops T5 (its
    block of the context is then zeros), as diffusers allows to save memory."""
    from diffusers import SD3Transformer2DModel

    if not is_sd3_folder(path):
        raise MissingInput(f"{path!r} is not a diffusers SD3 folder: expected model_index.json, transformer/, "
                                "vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/ and scheduler/ as written by "
                                "StableDiffusion3Pipeline.save_pretrained")
    try:  # check the architecture before reading gigabytes of weights
        config_from_diffusers(_read_json(path, "transformer", "config.json"))
    except ValueError as e:
        raise InputError(f"{path}: {e}") from e
    shift = scheduler_shift(path)
    diffusers_model = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", local_files_only=True,
                                                            dtype=dtype)
    model = from_diffusers(diffusers_model).to(device).eval()
    del diffusers_model
    vae = LatentSpace(os.path.join(path, "vae"))
    text = SD3TextEncoder(path, max_sequence_length, t5, text_device or device, text_dtype or dtype)
    info = dict(path=os.path.abspath(path), shift=shift, t5=text.encoders[1].model is not None,
                max_sequence_length=max_sequence_length,
                resolution=model.config.sample_size * vae.downsample)  # SD3: 128 · 8 = 1024
    return model, text, vae, info


@torch.no_grad()
def sample_sd3(sd3, prompts: Sequence[str], seeds: Sequence[int], steps: int = 28, guidance: float = 7.0,
               height: int | None = None, width: int | None = None, negative_prompt: str = "",
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for prompts and seeds, from a folder path or `load_sd3`'s
    tuple. Equals `StableDiffusion3Pipeline(prompts, generator=[torch.Generator().manual_seed(s)
    for s in seeds], num_inference_steps=steps, guidance_scale=guidance)` (an image in [0, 1] there)."""
    model, text, vae, info = load_sd3(sd3) if isinstance(sd3, (str, os.PathLike)) else sd3
    height, width = height or info["resolution"], width or info["resolution"]
    f = vae.downsample * model.config.patch_size
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} (VAE downsampling × patch size)")
    context, pooled = text.encode(prompts)
    guided = guidance > 1  # diffusers guides only above 1
    z = sample(model, context, pooled, list(seeds), (vae.channels, height // vae.downsample, width // vae.downsample),
               steps=steps, shift=info["shift"], guidance=guidance if guided else 1.0,
               uncond=text.encode([negative_prompt]) if guided else None, batch_size=batch_size, progress=progress)
    return vae.decode(z.to(vae.vae.device)).clamp(-1, 1).cpu()
