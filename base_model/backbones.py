"""The paper's baselines beside MM-DiT (arXiv 2403.03206, section 5.2.1, "Improved backbones"), each
with MM-DiT's call `model(x_t, t, context, pooled) -> prediction`, embedders, final layer and
checkpoint format (config.json names the backbone). Chosen by `MMDiTConfig.backbone`:

    dit       text and image tokens concatenated into one sequence, one set of weights per block
    crossdit  image tokens attend to themselves, then cross-attend to the (fixed) text tokens
    uvit      dit's blocks with long skips: block i of the last half reads Linear([h; h of block d−1−i])

The paper also splits MM-DiT into 3 weight sets (CLIP tokens, T5 tokens, image). flowalign's shapes
world has one text encoder, so there is no second text modality to give its own weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mmdit import MMDiT, MMDiTConfig, Stream, modulate


def attention(q, k, v):
    """(B, T, H, Dh) queries and (B, S, H, Dh) keys/values → (B, T, H·Dh)."""
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class SharedBlock(nn.Module):
    """One stream of MM-DiT's weights over the whole sequence: adaLN-Zero, self-attention, MLP."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, mlp_ratio: float):
        super().__init__()
        self.stream = Stream(dim, heads, qk_norm, mlp_ratio)

    def forward(self, h, c):
        qkv, mod = self.stream.pre_attention(h, c)
        return self.stream.post_attention(h, attention(*qkv), mod)


class CrossBlock(nn.Module):
    """DiT's block on image tokens with a cross-attention to the text between attention and MLP."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.img = Stream(dim, heads, qk_norm, mlp_ratio)
        self.cross_q, self.cross_kv, self.cross_out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, context, c):
        qkv, mod = self.img.pre_attention(x, c)
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa * self.img.out(attention(*qkv))
        q = self.cross_q(F.layer_norm(x, x.shape[-1:], eps=1e-6)).unflatten(-1, (self.heads, -1))  # (B, T, H, Dh)
        k, v = self.cross_kv(context).unflatten(-1, (2, self.heads, -1)).unbind(2)  # (B, L, H, Dh)
        x = x + self.cross_out(attention(q, k, v))
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_mlp, scale_mlp)
        return x + gate_mlp * self.img.mlp(h)


class DiT(MMDiT):
    def make_blocks(self, cfg: MMDiTConfig) -> nn.ModuleList:
        return nn.ModuleList(SharedBlock(cfg.hidden, cfg.heads, cfg.qk_norm, cfg.mlp_ratio) for _ in range(cfg.depth))

    def forward(self, x, t, context, pooled):
        H, W = x.shape[2:]
        x, context, c = self.embed(x, t, context, pooled)
        h = torch.cat([context, x], dim=1)  # (B, L + T, D)
        for block in self.blocks:
            h = self.run_block(block, h, c)
        return self.unpatchify(h[:, context.shape[1]:], c, H, W)


class UViT(DiT):
    def make_blocks(self, cfg: MMDiTConfig) -> nn.ModuleList:
        self.skips = nn.ModuleList(nn.Linear(2 * cfg.hidden, cfg.hidden) for _ in range(cfg.depth // 2))
        return super().make_blocks(cfg)

    def forward(self, x, t, context, pooled):
        H, W = x.shape[2:]
        x, context, c = self.embed(x, t, context, pooled)
        h = torch.cat([context, x], dim=1)  # (B, L + T, D)
        depth, half, saved = len(self.blocks), len(self.skips), []
        for i, block in enumerate(self.blocks):
            if i >= depth - half:  # last half: the mirror block's output comes back
                h = self.skips[i - (depth - half)](torch.cat([h, saved.pop()], dim=-1))
            h = self.run_block(block, h, c)
            if i < half:
                saved.append(h)
        return self.unpatchify(h[:, context.shape[1]:], c, H, W)


class CrossDiT(MMDiT):
    def make_blocks(self, cfg: MMDiTConfig) -> nn.ModuleList:
        return nn.ModuleList(CrossBlock(cfg.hidden, cfg.heads, cfg.qk_norm, cfg.mlp_ratio) for _ in range(cfg.depth))

    def forward(self, x, t, context, pooled):
        H, W = x.shape[2:]
        x, context, c = self.embed(x, t, context, pooled)
        for block in self.blocks:
            x = self.run_block(block, x, context, c)
        return self.unpatchify(x, c, H, W)


MODEL_CLASSES = {"mmdit": MMDiT, "dit": DiT, "crossdit": CrossDiT, "uvit": UViT}


def build_model(config: MMDiTConfig) -> MMDiT:
    return MODEL_CLASSES[config.backbone](config)


def forward_flops(config: MMDiTConfig, image_size: int, context_len: int) -> int:
    """Forward FLOPs per sample of any backbone, counted by torch's FlopCounterMode on one forward
    with shapes only (meta tensors: nothing is allocated or computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(config)
        x = torch.zeros(1, config.in_channels, image_size, image_size)
        args = (torch.zeros(1), torch.zeros(1, context_len, config.context_dim), torch.zeros(1, config.pooled_dim))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, *args)
    return int(counter.get_total_flops())
