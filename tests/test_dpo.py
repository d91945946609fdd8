"""Diffusion-DPO training end to end on a tiny base: adapter output, loading, merging, 4-bit
base, resume, and ZeRO-2 and ZeRO-3 runs with 2 processes matching one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from align import dpo
from align.dpo import DPOConfig
from align.lora import add_lora, quantize_base
from align.pairs import encode_png, pairs_dataset
from base_model.adapters import load_model, merge
from base_model.cli import parse
from base_model.flow import flow_loss
from base_model.mmdit import MMDiT, preset
from base_model.shapes import make_split, render
from tests.conftest import randomize, save_tiny_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_steps", "1000", "--num_samples", "2",
         "--sample_steps", "2", "--report_to", "none", "--beta", "100", "--lora_r", "4", "--lora_alpha", "4"]


pytestmark = pytest.mark.usefixtures("reset_accelerate")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(str(tmp_path_factory.mktemp("base") / "final"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Winner: the scene's own render; loser: another scene's render."""
    scenes, others = make_split("train", 24), make_split("val", 24)
    rows = [{"caption": s.caption, "jpg_0": encode_png(render(s)), "jpg_1": encode_png(render(o)),
             "label_0": 1.0, "label_1": 0.0} for s, o in zip(scenes, others)]
    path = str(tmp_path_factory.mktemp("pairs") / "pairs.parquet")
    pairs_dataset(rows).to_parquet(path)
    return path


def run(base, pairs, out, *flags):
    cfg = parse(DPOConfig, SMALL + ["--base", base, "--pairs", pairs, "--output_dir", str(out), *flags])
    dpo.main(cfg)
    return out


def logged(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, generator=g), torch.randn(2, 16, 384, generator=g),
            torch.randn(2, 384, generator=g))
    with torch.no_grad():
        return model(*args)


def test_dpo_run_saves_adapter_that_loads_and_merges_identically(base, pairs, tmp_path):
    out = run(base, pairs, tmp_path / "dpo", "--max_steps", "3", "--learning_rate", "1e-2")
    log = logged(out)
    assert log[1]["train/loss"] == pytest.approx(0.6931472, abs=1e-6)  # zero-initialised LoRA: log 2
    assert log[1]["train/rewards/accuracies"] == 0.5
    assert {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins", "train/mse/ref_chosen"} <= set(log[3])
    final = out / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "flowalign_base.json",
            "conditioning.json"} <= set(os.listdir(final))
    assert os.path.exists(out / "samples" / "step-000000.png") and os.path.exists(out / "samples" / "step-000003.png")
    unmerged = load_model(f"{base}+{final}", merge=False)
    merged = load_model(f"{base}+{final}")
    by_record = load_model(str(final))  # the adapter names its base
    ref = forward(MMDiT.from_pretrained(base))
    y = forward(unmerged)
    assert not torch.allclose(y, ref, atol=1e-6)  # training moved the model
    assert torch.allclose(forward(merged), y, atol=1e-5) and torch.allclose(forward(by_record), y, atol=1e-5)
    merge(f"{base}+{final}", str(tmp_path / "merged"))
    assert torch.allclose(forward(MMDiT.from_pretrained(str(tmp_path / "merged"))), y, atol=1e-5)


def test_adapter_refuses_a_different_base(base, pairs, tmp_path):
    out = run(base, pairs, tmp_path / "dpo", "--max_steps", "1")
    other = str(tmp_path / "other")
    shutil.copytree(base, other)
    m = MMDiT.from_pretrained(other)
    with torch.no_grad():
        m.final_linear.bias.add_(1.0)
    m.save_pretrained(other)
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(f"{other}+{out / 'final'}")


def test_sft_control_trains_winners_only(base, pairs, tmp_path):
    out = run(base, pairs, tmp_path / "sft", "--max_steps", "2", "--loss_type", "sft")
    row = logged(out)[2]
    assert "train/mse/policy_chosen" in row and "train/rewards/margins" not in row


def test_resume_continues_the_same_curve(base, pairs, tmp_path):
    full = run(base, pairs, tmp_path / "full", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-2")
    part = run(base, pairs, tmp_path / "part", "--max_steps", "2", "--save_steps", "2", "--learning_rate", "1e-2")
    run(base, pairs, part, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-2",
        "--resume_from_checkpoint", "latest")
    a, b = logged(full), logged(part)
    for step in (3, 4):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_with_lora_stays_close_and_takes_a_step(bits):
    import copy

    import bitsandbytes as bnb

    full = randomize(MMDiT(preset("toy", depth=2, hidden=64, heads=2)), std=0.05)
    q = quantize_base(copy.deepcopy(full), bits)
    assert isinstance(q.blocks[0].img.qkv, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    y, yq = forward(full), forward(q)
    assert 0 < ((yq - y).norm() / y.norm()).item() < 0.25
    model = add_lora(q.requires_grad_(False), r=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    t, ctx, pooled = torch.rand(4, generator=g), torch.randn(4, 8, 384, generator=g), torch.randn(4, 384, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    loss = flow_loss(model, x, noise, t, ctx, pooled).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert before and all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_match_single_process(base, pairs, tmp_path, stage):
    """Same global batch (2 × 2 vs 1 × 4): each process reads its half of every global batch of pairs
    (`cache.loader`), t and noise are the global draws sliced; the same DPO loss curve and adapter."""
    common = SMALL + ["--max_steps", "3", "--save_steps", "3", "--learning_rate", "1e-2", "--base", base,
                      "--pairs", pairs]
    i = common.index("--per_device_train_batch_size") + 1
    single, sharded = common[:i] + ["4"] + common[i + 1:], common[:i] + ["2"] + common[i + 1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "align.dpo", *single, "--output_dir", str(tmp_path / "single")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    ds_config = os.path.join(ROOT, f"configs/deepspeed/zero{stage}.json")
    if stage == 3:  # partition every parameter: DeepSpeed keeps tensors under stage3_param_persistence_threshold
        with open(ds_config) as f:  # (1e5 elements, so every LoRA matrix of a small model) whole on each process
            ds = json.load(f)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        ds_config = str(tmp_path / "zero3.json")
        with open(ds_config, "w") as f:
            json.dump(ds, f)
    launcher = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "2",
                "--num_machines", "1", "--use_deepspeed", "--deepspeed_config_file", ds_config,
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    p = subprocess.run([*launcher, "-m", "align.dpo", *sharded, "--output_dir", str(tmp_path / "zero")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = logged(tmp_path / "single"), logged(tmp_path / "zero")
    for step in (1, 2, 3):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
    sa, sb = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("single", "zero"))
    assert sa.keys() == sb.keys() and all(sb[k].shape == sa[k].shape for k in sa)  # gathered, not a shard
    ya = forward(load_model(str(tmp_path / "single" / "final")))
    yb = forward(load_model(str(tmp_path / "zero" / "final")))
    assert torch.allclose(ya, yb, atol=1e-4)
