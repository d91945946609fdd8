"""MM-DiT, the Stable Diffusion 3 transformer (Esser et al. 2024, arXiv 2403.03206, section 4).

Two token streams, text context and image patches, each with its own weights, meet in one joint
attention per block. The model only predicts: `MMDiT(x_t, t, context, pooled) -> v`, with t in
[0, 1] and t = 1 pure noise (see `base_model/flow.py`). It equals diffusers'
`SD3Transformer2DModel` with `timestep = 1000·t` for converted weights (`base_model/convert.py`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from .errors import InputError, MissingInput

# ---------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------


JSON_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}  # what config.json may hold per field type
BACKBONES = ("mmdit", "dit", "crossdit", "uvit")  # base_model/backbones.py holds all but MM-DiT
FORMULATIONS = ("rf", "eps_linear", "v_cos")  # how the output is read: base_model/formulations.py
# Keys added after checkpoints existed: absent, they mean what every older checkpoint is.
LATER_KEYS = {"backbone": "mmdit", "formulation": "rf"}


@dataclass
class MMDiTConfig:
    depth: int = 4  # number of joint blocks d
    hidden: int = 0  # width; 0 means the paper's rule 64·d
    heads: int = 0  # attention heads; 0 means the paper's rule d (head dim 64)
    patch_size: int = 2  # p: image tokens are p×p patches
    in_channels: int = 3  # 3 for pixels, 16 for SD3 latents
    out_channels: int = 0  # 0 means in_channels
    sample_size: int = 32  # native input side; fixes the scale of the position table as in SD3
    pos_embed_max_size: int = 16  # side of the position table, in patches; centre-cropped per input
    context_dim: int = 384  # width of the text token states fed to the context embedder
    pooled_dim: int = 384  # width of the pooled text vector
    qk_norm: bool = False  # RMSNorm on queries and keys (SD3.5; stabilises bf16 at scale)
    mlp_ratio: float = 4.0
    backbone: str = "mmdit"  # one of BACKBONES: MM-DiT, or the paper's baselines (DiT, CrossDiT, UViT)
    formulation: str = "rf"  # one of FORMULATIONS: what the output predicts (velocity, ε or v)

    def __post_init__(self):
        self.hidden = self.hidden or 64 * self.depth
        self.heads = self.heads or self.depth
        self.out_channels = self.out_channels or self.in_channels
        if small := [f.name for f in fields(self) if f.type in ("int", "float") and not getattr(self, f.name) > 0]:
            raise ValueError(f"MMDiTConfig {small} must be positive")
        if self.backbone not in BACKBONES or self.formulation not in FORMULATIONS:
            raise ValueError(f"MMDiTConfig backbone {self.backbone!r} / formulation {self.formulation!r}: "
                             f"choose from {BACKBONES} / {FORMULATIONS}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.sample_size // self.patch_size > self.pos_embed_max_size:
            raise ValueError("pos_embed_max_size must cover sample_size // patch_size patches")

    def to_dict(self) -> dict:  # what peft and trackers read from `model.config`
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        """A config from a checkpoint's dict: every field present with its type (a default filled in
        here would build another model than the one saved), no unknown key."""
        names = [f.name for f in fields(cls)]
        d = {**LATER_KEYS, **d}
        if unknown := set(d) - set(names):
            raise InputError(f"unknown MMDiTConfig keys: {sorted(unknown)}")
        if missing := [n for n in names if n not in d]:
            raise InputError(f"missing MMDiTConfig keys: {missing}")
        for f in fields(cls):  # f.type is a string under `from __future__ import annotations`
            v = d[f.name]
            if isinstance(v, bool) != (f.type == "bool") or not isinstance(v, JSON_TYPES[f.type]):
                raise InputError(f"MMDiTConfig key {f.name!r} must be {f.type}, got {v!r}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # CPU toy for the 32×32 shapes world: 64 image tokens, ~2.4M parameters; 4 heads of 32 measured
    # better than 2 of 64 on the shapes world (overall 21.3% vs 18.9%, 600 held-out scenes).
    "toy": dict(depth=4, hidden=128, heads=4, patch_size=4, in_channels=3, sample_size=32,
                pos_embed_max_size=8, context_dim=384, pooled_dim=384),
    # The paper's family on SD3 latents (16 channels, 128² latents for 1024² images),
    # CLIP-L + bigG + T5 context (4096 wide) and pooled CLIP vectors (2048).
    **{f"d{d}": dict(depth=d, patch_size=2, in_channels=16, sample_size=128, pos_embed_max_size=192,
                     context_dim=4096, pooled_dim=2048, qk_norm=d >= 30)
       for d in (2, 4, 8, 12, 18, 24, 30, 38)},
}


def preset(name: str, **overrides) -> MMDiTConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return MMDiTConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Helpers and embedders
# ---------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    return x * (1 + scale) + shift  # measured faster on CPU than a broadcast torch.addcmul


_SQRT_2_PI = math.sqrt(2 / math.pi)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_table(dim: int, size: int, base_size: int) -> torch.Tensor:
    """(size², dim) table: first half encodes the column, second half the row (as SD3).
    Positions are scaled so that the native grid `base_size` spans the same range as in SD3."""
    pos = torch.arange(size, dtype=torch.float64) * base_size / size
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features (cos, sin) of the diffusers timestep 1000·t."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (1000 * t.float())[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU written as x·σ(2u), u = √(2/π)(x + 0.044715x³): the same function
    (½(1 + tanh u) = σ(2u)) without tanh, whose vectorised kernel is slow on CPU."""
    s = x * x
    s.mul_(2 * 0.044715 * _SQRT_2_PI).add_(2 * _SQRT_2_PI).mul_(x).sigmoid_()
    return s.mul_(x)


class _GELUTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")  # torch's fused kernel


class GELUTanh(nn.Module):
    """nn.GELU(approximate="tanh"); on CPU in fp32, the `gelu_tanh` forward and torch's backward.
    Elsewhere torch's own kernel: one fused kernel on GPU, fp32 internals under bf16."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return F.gelu(x, approximate="tanh")
        return _GELUTanh.apply(x) if torch.is_grad_enabled() and x.requires_grad else gelu_tanh(x)


def mlp(d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_out))


# ---------------------------------------------------------------------------------------------
# Joint block
# ---------------------------------------------------------------------------------------------


class Stream(nn.Module):
    """One modality's weights inside a joint block: adaLN-Zero, fused QKV, output, MLP.
    A pre-only stream (the context in the last block) only feeds keys and values."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.adaLN = nn.Linear(dim, (2 if pre_only else 6) * dim)  # SiLU(c) → shift, scale(, gate) ...
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        if not pre_only:
            self.out = nn.Linear(dim, dim)
            self.mlp = mlp(dim, int(dim * mlp_ratio), dim, GELUTanh())

    def pre_attention(self, x, c):
        """x (B, T, D), c = SiLU(conditioning) (B, D) → q, k, v (B, T, H, Dh) and the modulation."""
        mod = self.adaLN(c)[:, None].chunk(2 if self.pre_only else 6, dim=-1)  # each (B, 1, D)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), mod[0], mod[1])
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).unbind(2)
        return (self.q_norm(q), self.k_norm(k), v), mod

    def post_attention(self, x, attn, mod):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa * self.out(attn)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)


def joint_attention(qkv_ctx, qkv_img):
    """One attention over [context; image]: (q, k, v) each (B, T, H, Dh) → (B, Tc, D), (B, Ti, D)."""
    q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in zip(qkv_ctx, qkv_img))  # (B, H, T, Dh)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, T, D)
    return out.split([qkv_ctx[0].shape[1], qkv_img[0].shape[1]], dim=1)


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, mlp_ratio: float, last: bool = False):
        super().__init__()
        self.ctx = Stream(dim, heads, qk_norm, mlp_ratio, pre_only=last)
        self.img = Stream(dim, heads, qk_norm, mlp_ratio)

    def forward(self, x, context, c):
        qkv_x, mod_x = self.img.pre_attention(x, c)
        qkv_c, mod_c = self.ctx.pre_attention(context, c)
        attn_c, attn_x = joint_attention(qkv_c, qkv_x)
        x = self.img.post_attention(x, attn_x, mod_x)
        context = None if self.ctx.pre_only else self.ctx.post_attention(context, attn_c, mod_c)
        return x, context


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden, cfg.patch_size
        self.gradient_checkpointing = False
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        table = sincos_2d_table(D, cfg.pos_embed_max_size, cfg.sample_size // p)
        self.register_buffer("pos_table", table, persistent=False)  # derived from the config
        self.t_embedder = mlp(256, D, D, nn.SiLU())
        self.y_embedder = mlp(cfg.pooled_dim, D, D, nn.SiLU())
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.blocks = self.make_blocks(cfg)
        self.final_adaLN = nn.Linear(D, 2 * D)  # shift, scale
        self.final_linear = nn.Linear(D, p * p * cfg.out_channels)
        self.initialize_weights()

    def make_blocks(self, cfg: MMDiTConfig) -> nn.ModuleList:
        return nn.ModuleList(JointBlock(cfg.hidden, cfg.heads, cfg.qk_norm, cfg.mlp_ratio, last=i == cfg.depth - 1)
                             for i in range(cfg.depth))

    def initialize_weights(self):
        """DiT's initialisation: Xavier linears, zeroed modulation and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        zeroed = [m for name, m in self.named_modules() if name.endswith("adaLN")]  # every block's modulation
        for mod in zeroed + [self.final_linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Centre crop of the position table to an h×w patch grid → (1, h·w, D)."""
        n = self.config.pos_embed_max_size
        if h > n or w > n:
            raise ValueError(f"a {h}×{w} patch grid exceeds pos_embed_max_size={n}")
        top, left = (n - h) // 2, (n - w) // 2
        table = self.pos_table.view(n, n, -1)[top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def embed(self, x, t, context, pooled):
        """Patches with positions (B, T, D), T = H·W / p²; context tokens (B, L, D); SiLU(c) (B, D)."""
        h, w = x.shape[2] // self.config.patch_size, x.shape[3] // self.config.patch_size
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed(h, w).to(x.dtype)  # (B, T, D), T = h·w
        cond = self.t_embedder(timestep_embedding(t, 256).to(x.dtype)) + self.y_embedder(pooled)  # (B, D)
        return x, self.context_embedder(context), F.silu(cond)  # every adaLN reads SiLU(c); computed once

    def unpatchify(self, x, c, H: int, W: int):
        """Final adaLN and linear, (B, T, D) → (B, C, H, W)."""
        p = self.config.patch_size
        shift, scale = self.final_adaLN(c)[:, None].chunk(2, dim=-1)
        x = self.final_linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))
        x = x.view(len(x), H // p, W // p, p, p, -1)  # (B, h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(len(x), -1, H, W)

    def run_block(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, t, context, pooled):
        """x (B, C, H, W) noisy input x_t, t (B,) in [0, 1], context (B, L, context_dim),
        pooled (B, pooled_dim) → the prediction (B, C, H, W): the velocity under rectified flow."""
        H, W = x.shape[2:]
        x, context, c = self.embed(x, t, context, pooled)
        for block in self.blocks:
            x, context = self.run_block(block, x, context, c)
        return self.unpatchify(x, c, H, W)

    # -- checkpoints: config.json + model.safetensors -----------------------------------------

    def save_pretrained(self, path: str, state_dict: dict | None = None):
        """Write atomically: a temporary folder renamed into place, so a kill never leaves half."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        if os.path.exists(path):
            old = path.rstrip("/") + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu") -> MMDiT:
        """Rebuild a saved model; a bad config.json or model.safetensors is an InputError naming it."""
        cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
        from .backbones import build_model  # the baselines subclass MMDiT: imported here, not at the top

        if not os.path.isfile(cfg_file):
            raise MissingInput(f"{path} is not an MMDiT checkpoint: no config.json")
        model = build_model(read_config(cfg_file))
        if not os.path.isfile(weights):
            raise MissingInput(f"{path} is not an MMDiT checkpoint: no model.safetensors")
        try:
            state = load_file(weights, device=str(device))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{weights}: unreadable, truncated or corrupt ({e})") from e
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # torch lists the missing, unexpected and mis-shaped tensors
            detail = "; ".join(line.strip() for line in str(e).splitlines()[1:])
            raise InputError(f"{weights} does not fit {cfg_file}: {detail}") from e
        return model.to(device)


def read_config(path: str) -> MMDiTConfig:
    """A checkpoint's config.json, checked (see `MMDiTConfig.from_dict`); errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object of MMDiTConfig keys, got {type(d).__name__}")
    try:
        return MMDiTConfig.from_dict(d)
    except ValueError as e:  # also __post_init__'s checks of how the fields fit together
        raise InputError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Counting: parameters and FLOPs, without allocating weights
# ---------------------------------------------------------------------------------------------


def count_params(config: MMDiTConfig) -> int:
    from .backbones import build_model

    with torch.device("meta"):  # shapes only: no memory is allocated, even for d38
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def count_flops(config: MMDiTConfig, image_size: int, context_len: int) -> int:
    """Forward FLOPs per sample of an MM-DiT: 2·(weights touched)·(tokens) for every matmul, plus
    attention (QKᵀ and AV: 4·T²·D per block). Backward costs about twice the forward.
    (`backbones.forward_flops` counts any backbone by tracing one forward.)"""
    D, p, r = config.hidden, config.patch_size, config.mlp_ratio
    Ti, Tc = (image_size // p) ** 2, context_len
    T = Ti + Tc
    full_stream = 3 * D * D + D * D + 2 * r * D * D  # qkv, out, mlp
    flops = 0
    for i in range(config.depth):
        last = i == config.depth - 1
        flops += 2 * Ti * full_stream + 2 * Tc * (3 * D * D if last else full_stream)
        flops += 4 * T * T * D
    flops += 2 * Ti * (config.in_channels * p * p * D + D * p * p * config.out_channels)
    flops += 2 * Tc * config.context_dim * D
    return int(flops)
