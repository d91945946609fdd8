"""Loading a model as a spec: a checkpoint, or a checkpoint plus a LoRA adapter (PEFT format).

    "runs/toy/final"                    an MMDiT checkpoint (config.json + model.safetensors)
    "runs/toy/final+runs/dpo/final"     that checkpoint with an adapter applied (merged for speed)
    "runs/dpo/final"                    an adapter folder alone: its base is the one it records

An adapter folder written by `align.dpo` holds PEFT's `adapter_config.json` and
`adapter_model.safetensors`, plus `flowalign_base.json` with the base's path and the SHA-256 of
its weights, checked on load. This lives beside the model's own loading so that evaluation
(`reward/`) never imports the trainer it judges (`align/`).

    python -m base_model.adapters merge --model runs/toy/final+runs/dpo/final --output runs/dpo/merged
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

from .mmdit import MMDiT

BASE_RECORD = "flowalign_base.json"


def weights_sha256(checkpoint: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(checkpoint, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def split_spec(spec: str) -> tuple[str, str | None]:
    """→ (base checkpoint, adapter folder or None), validating that both exist."""
    base, _, adapter = spec.partition("+")
    if not adapter and is_adapter(base):
        base, adapter = read_base_record(base)["base"], base
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise FileNotFoundError(f"model spec {spec!r}: {base!r} is not an MMDiT checkpoint (no config.json)")
    if adapter and not is_adapter(adapter):
        raise FileNotFoundError(f"model spec {spec!r}: {adapter!r} is not a PEFT adapter folder "
                                "(expected adapter_config.json and adapter_model.safetensors)")
    return base, adapter or None


def read_base_record(adapter: str) -> dict:
    path = os.path.join(adapter, BASE_RECORD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter!r} records no base model ({BASE_RECORD}); pass BASE+ADAPTER")
    with open(path) as f:
        return json.load(f)


def conditioning_dir(spec: str) -> str:
    """The folder whose conditioning.json describes the model's text encoders and image space."""
    return split_spec(spec)[0]


def load_model(spec: str, device="cpu", merge: bool = True) -> MMDiT:
    """An MMDiT from a spec (see the module doc). With an adapter, the base's hash must match the
    adapter's record; the adapter is merged into the weights unless `merge=False` (then a PeftModel)."""
    base, adapter = split_spec(spec)
    model = MMDiT.from_pretrained(base, device=device)
    if adapter is None:
        return model
    record_path = os.path.join(adapter, BASE_RECORD)
    if os.path.isfile(record_path):
        expected = read_base_record(adapter)["sha256"]
        if weights_sha256(base) != expected:
            raise ValueError(f"adapter {adapter!r} was trained on a base with SHA-256 {expected[:12]}…, "
                             f"but {base!r} differs")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter)
    return peft_model.merge_and_unload() if merge else peft_model


def merge(spec: str, output: str) -> str:
    """Write base + adapter as one plain checkpoint that `MMDiT.from_pretrained` loads."""
    base, _ = split_spec(spec)
    model = load_model(spec)
    model.save_pretrained(output)
    if os.path.isfile(os.path.join(base, "conditioning.json")):
        shutil.copy(os.path.join(base, "conditioning.json"), os.path.join(output, "conditioning.json"))
    return output


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge an adapter into its base and save a plain checkpoint")
    m.add_argument("--model", required=True, help="BASE+ADAPTER, or an adapter folder that records its base")
    m.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    print(f"merged model written to {merge(args.model, args.output)}")


if __name__ == "__main__":
    main()
