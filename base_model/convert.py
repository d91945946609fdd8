"""Weights between flowalign's MMDiT and diffusers' SD3Transformer2DModel, both directions.

Parity of the two forwards (tests/test_convert.py) is the proof that `mmdit.py` is SD3's MM-DiT;
the same conversion lets a user start from real SD3 / SD3.5 weights. Differences in layout:
- we fuse q, k, v into one projection per stream (diffusers: to_q/to_k/to_v, add_{q,k,v}_proj);
- our two-vector adaLNs (the pre-only context of the last block, the final layer) are ordered
  (shift, scale) as in DiT; diffusers' AdaLayerNormContinuous is ordered (scale, shift);
- the position table is derived from the config and not stored.
"""

from __future__ import annotations

import torch

from .mmdit import MMDiT, MMDiTConfig

# (ours, diffusers) for weights copied as they are; ".weight" and ".bias" are appended.
_TOP = [("x_embedder", "pos_embed.proj"),
        ("t_embedder.0", "time_text_embed.timestep_embedder.linear_1"),
        ("t_embedder.2", "time_text_embed.timestep_embedder.linear_2"),
        ("y_embedder.0", "time_text_embed.text_embedder.linear_1"),
        ("y_embedder.2", "time_text_embed.text_embedder.linear_2"),
        ("context_embedder", "context_embedder"),
        ("final_linear", "proj_out")]
_STREAM = {  # per block: stream -> [(ours, diffusers)]
    "img": [("adaLN", "norm1.linear"), ("out", "attn.to_out.0"),
            ("mlp.0", "ff.net.0.proj"), ("mlp.2", "ff.net.2")],
    "ctx": [("adaLN", "norm1_context.linear"), ("out", "attn.to_add_out"),
            ("mlp.0", "ff_context.net.0.proj"), ("mlp.2", "ff_context.net.2")],
}
_QKV = {"img": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "ctx": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_QK_NORM = {"img": [("q_norm", "attn.norm_q"), ("k_norm", "attn.norm_k")],
            "ctx": [("q_norm", "attn.norm_added_q"), ("k_norm", "attn.norm_added_k")]}


def config_from_diffusers(dcfg) -> MMDiTConfig:
    if tuple(dcfg.get("dual_attention_layers") or ()):
        raise ValueError("SD3.5-Medium's MMDiT-X (dual_attention_layers, a second image-only attention "
                         "in the first blocks) is not supported; SD3-Medium and SD3.5-Large/Large-Turbo are")
    if dcfg["qk_norm"] not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={dcfg['qk_norm']!r} is not supported (None or 'rms_norm')")
    hidden = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg["caption_projection_dim"] != hidden:
        raise ValueError(f"caption_projection_dim={dcfg['caption_projection_dim']} must equal the width {hidden}")
    return MMDiTConfig(depth=dcfg["num_layers"], hidden=hidden, heads=dcfg["num_attention_heads"],
                       patch_size=dcfg["patch_size"], in_channels=dcfg["in_channels"],
                       out_channels=dcfg["out_channels"] or dcfg["in_channels"],
                       sample_size=dcfg["sample_size"], pos_embed_max_size=dcfg["pos_embed_max_size"],
                       context_dim=dcfg["joint_attention_dim"], pooled_dim=dcfg["pooled_projection_dim"],
                       qk_norm=dcfg["qk_norm"] == "rms_norm")


def config_to_diffusers(cfg: MMDiTConfig) -> dict:
    return dict(sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                num_layers=cfg.depth, attention_head_dim=cfg.hidden // cfg.heads,
                num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_dim,
                caption_projection_dim=cfg.hidden, pooled_projection_dim=cfg.pooled_dim,
                out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
                qk_norm="rms_norm" if cfg.qk_norm else None)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output dimension; its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(cfg: MMDiTConfig):
    """Every (ours, diffusers, kind) name pair; kind is 'copy', 'swap' or an index into a fused qkv."""
    for ours, theirs in _TOP:
        yield from ((f"{ours}.{s}", f"{theirs}.{s}", "copy") for s in ("weight", "bias"))
    yield from ((f"final_adaLN.{s}", f"norm_out.linear.{s}", "swap") for s in ("weight", "bias"))
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        for stream in ("img", "ctx"):
            pre_only = stream == "ctx" and last
            ours_prefix, theirs_prefix = f"blocks.{i}.{stream}.", f"transformer_blocks.{i}."
            names = _STREAM[stream][:1] if pre_only else _STREAM[stream]
            for ours, theirs in names:
                kind = "swap" if pre_only and ours == "adaLN" else "copy"
                for s in ("weight", "bias"):
                    yield ours_prefix + f"{ours}.{s}", theirs_prefix + f"{theirs}.{s}", kind
            for j, theirs in enumerate(_QKV[stream]):
                for s in ("weight", "bias"):
                    yield ours_prefix + f"qkv.{s}", theirs_prefix + f"{theirs}.{s}", j
            if cfg.qk_norm:
                for ours, theirs in _QK_NORM[stream]:
                    yield ours_prefix + f"{ours}.weight", theirs_prefix + f"{theirs}.weight", "copy"


def from_diffusers(model) -> MMDiT:
    """diffusers SD3Transformer2DModel -> MMDiT with identical outputs (timestep = 1000·t)."""
    cfg = config_from_diffusers(model.config)
    theirs = model.state_dict()
    ours: dict[str, torch.Tensor | list] = {}
    for o, t, kind in _pairs(cfg):
        if kind == "copy":
            ours[o] = theirs[t]
        elif kind == "swap":
            ours[o] = _swap_halves(theirs[t])
        else:
            ours.setdefault(o, [None] * 3)[kind] = theirs[t]
    ours = {k: torch.cat(v, dim=0) if isinstance(v, list) else v for k, v in ours.items()}
    mmdit = MMDiT(cfg).to(dtype=next(model.parameters()).dtype)  # a no-op for float32
    mmdit.load_state_dict(ours, strict=True)
    return mmdit


def to_diffusers(mmdit: MMDiT):
    """MMDiT -> diffusers SD3Transformer2DModel with identical outputs."""
    from diffusers import SD3Transformer2DModel

    cfg = mmdit.config
    model = SD3Transformer2DModel(**config_to_diffusers(cfg))
    if (dtype := next(mmdit.parameters()).dtype) != torch.float32:
        model = model.to(dtype=dtype)
    ours = mmdit.state_dict()
    theirs = dict(model.state_dict())  # keeps diffusers' own pos_embed buffer
    for o, t, kind in _pairs(cfg):
        if kind == "copy":
            theirs[t] = ours[o]
        elif kind == "swap":
            theirs[t] = _swap_halves(ours[o])
        else:
            theirs[t] = ours[o].chunk(3, dim=0)[kind]
    model.load_state_dict(theirs, strict=True)
    return model
