"""LoRA adapters on the MM-DiT through peft, and a quantised frozen base (QLoRA-style).

The reference model of DPO is the same network with its adapter disabled
(`with model.disable_adapter():`), or a frozen copy of an earlier adapter (`snapshot_adapter`,
online training): never a second copy of the base.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

# q/k/v (fused per stream), attention output and both MLP layers of both streams
DEFAULT_TARGETS = ["qkv", "out", "mlp.0", "mlp.2"]


def add_lora(model: nn.Module, r: int = 16, alpha: int = 16, targets=None, dropout: float = 0.0,
             init: str | bool = True):
    """Wrap `model` in a peft LoRA model. With `init=True` (peft's default) B = 0, so the adapted
    model starts exactly at the base and the first DPO loss is exactly log 2."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets or DEFAULT_TARGETS),
                        lora_dropout=dropout, init_lora_weights=init)
    return get_peft_model(model, config)


def loraplus_groups(peft_model, lr: float, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024, arXiv 2402.12354): the trainable B matrices at `ratio` × the A matrices'
    learning rate, as param groups for the stage's own optimizer (AdamW or 8-bit AdamW, `optimizer_and_scheduler`):
    the grouping of peft's `create_loraplus_optimizer` (B by name), which builds the optimizer itself."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    b = [p for n, p in named if "lora_B" in n]
    a = [p for n, p in named if "lora_B" not in n]
    return [g for g in ({"params": a, "lr": lr}, {"params": b, "lr": lr * ratio}) if g["params"]]


def snapshot_adapter(peft_model, name: str, decay: float = 0.0) -> None:
    """A frozen copy of the policy adapter ("default") under `name`, created when missing:
    name ← decay·name + (1 − decay)·default (decay 0: a plain copy). Online DPO's moving reference
    and DiffusionNFT's old (sampling) policy are such copies: one base, several small adapters."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name="default")
    if name not in peft_model.peft_config:
        peft_model.add_adapter(name, peft_model.peft_config["default"])
        decay = 0.0
    if decay:
        old = get_peft_model_state_dict(peft_model, adapter_name=name)
        state = {k: decay * old[k] + (1 - decay) * v for k, v in state.items()}
    set_peft_model_state_dict(peft_model, {k: v.detach().clone() for k, v in state.items()}, adapter_name=name)
    for param_name, p in peft_model.named_parameters():
        if f".{name}." in param_name:
            p.requires_grad_(False)
    peft_model.set_adapter("default")


@contextmanager
def adapter(peft_model, name: str | None):
    """Run with adapter `name` active ("default": the policy; None: the base, no adapter)."""
    if name is None:
        with peft_model.disable_adapter():
            yield
        return
    peft_model.base_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.base_model.set_adapter("default")  # also restores requires_grad to the policy


@contextmanager
def merged(peft_model, name: str):
    """Inference (no gradients) with adapter `name` folded into the base's weights: W ← W + ΔW_name for the
    duration, with the adapters disabled, so each layer is one matmul and peft's per-layer dispatch is skipped
    (an online round's rollout is 1.45× faster at rank 4: `benchmarks/lora_sampling.py`). On exit every weight is
    its original tensor again (restored, not un-merged by subtraction: bit-exact). Outputs equal the adapter's
    to float rounding. Layers that cannot be merged in place (a quantised base, ZeRO-3's partitioned
    parameters) fall back to running the adapter unmerged."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    weights = [m.base_layer.weight for m in layers]
    if not all(type(w) is nn.Parameter and w.dtype.is_floating_point and not hasattr(w, "ds_id") for w in weights):
        with adapter(peft_model, name), torch.no_grad():
            yield
        return
    originals = [w.data for w in weights]
    try:
        with torch.no_grad():
            for m, w in zip(layers, weights):
                w.data = w.data + m.get_delta_weight(name).to(w.dtype)
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        for w, original in zip(weights, originals):
            w.data = original


def copy_adapter(peft_model, src: str, dst: str) -> None:
    """Adapter `dst` ← the weights of adapter `src` (both exist; `dst` keeps its trainability)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=src)
    set_peft_model_state_dict(peft_model, {k: v.detach().clone() for k, v in state.items()}, adapter_name=dst)


def save_adapters(peft_model, folder: str, names) -> None:
    """Each of the frozen adapters `names` that exists, in PEFT format under folder/NAME/NAME."""
    import os

    for name in names:
        if name in peft_model.peft_config:
            peft_model.save_pretrained(os.path.join(folder, name), selected_adapters=[name])


def load_adapter_weights(peft_model, name: str, path: str) -> None:
    """Adapter `name` (created frozen when missing) from a folder `save_adapters` wrote."""
    import os

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if name not in peft_model.peft_config:
        snapshot_adapter(peft_model, name)
    set_peft_model_state_dict(peft_model, load_file(os.path.join(path, "adapter_model.safetensors")), adapter_name=name)


def quantize_base(model: nn.Module, bits: int) -> nn.Module:
    """Replace every nn.Linear of the transformer blocks and final layer by bitsandbytes' 4-bit
    NF4 (`bits=4`) or 8-bit (`bits=8`) layer holding the same weights, frozen. Embedders stay in
    full precision (they are small and shape the conditioning)."""
    import bitsandbytes as bnb

    if bits not in (4, 8):
        raise ValueError(f"base quantisation must be 4 or 8 bits, got {bits}")
    for parent_name, parent in list(model.named_modules()):
        if not (parent_name.startswith("blocks") or parent_name == ""):
            continue
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or (parent_name == "" and not name.startswith("final")):
                continue
            if bits == 4:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, q.to(child.weight.device))  # moving to a device quantises
    return model
