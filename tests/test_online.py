"""The online loop end to end on a tiny random base: each method trains and saves an adapter;
online DPO starts at log 2 with a fresh reference; GRPO's on-policy ratio is exactly 1; RAFT
imitates only the samples that pass; exact resume; a failing reward stops with a named error;
and the same run on 1 process and on 2 (ZeRO-2, CPU)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from align import online
from align.online import OnlineConfig
from base_model.adapters import load_model
from base_model.cli import parse
from base_model.mmdit import MMDiT
from tests.conftest import save_tiny_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED = "py:tests.test_online:redness"
SMALL = ["--prompts_per_round", "4", "--k", "4", "--rounds", "2", "--steps_per_round", "2",
         "--per_device_train_batch_size", "4", "--sample_steps", "2", "--grpo_steps", "3", "--num_samples", "2",
         "--lora_r", "4", "--lora_alpha", "4", "--learning_rate", "1e-2", "--report_to", "none",
         "--reward", RED, "--beta", "100"]


def redness(images, prompts):
    """A reward a random tiny base has spread on: how red the image is."""
    return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def broken(images, prompts):
    raise KeyError("no such scorer state")


def half_nan(images, prompts):
    out = torch.zeros(len(images))
    out[::2] = float("nan")
    return out


pytestmark = pytest.mark.usefixtures("reset_accelerate")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(str(tmp_path_factory.mktemp("base") / "final"))


def run(base, out, *flags):
    online.main(parse(OnlineConfig, SMALL + ["--base", base, "--output_dir", str(out), *flags]))
    return out


def logged(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["round"]: r for r in map(json.loads, f)}


def forward(model):
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, generator=g), torch.randn(2, 16, 384, generator=g),
            torch.randn(2, 384, generator=g))
    with torch.no_grad():
        return model(*args)


@pytest.mark.parametrize("method", ["nft", "grpo", "raft", "dpo"])
def test_each_method_trains_and_saves_a_loadable_adapter(base, tmp_path, method):
    out = run(base, tmp_path / method, "--method", method, "--raft_threshold=-1")
    log = logged(out)
    assert set(log) == {1, 2}
    row = log[2]
    assert row["round/reward_calls"] == 2 * 4 * 4 and row["round/train_items"] > 0
    assert {"round/reward_mean", "round/zero_spread_groups", "round/images_per_s", "train/loss"} <= set(row)
    assert os.path.exists(out / "samples" / "step-000002.png")
    record = json.load(open(out / "final" / "flowalign_base.json"))
    assert record["online_config"]["method"] == method and record["reward_calls"] == 32
    y = forward(load_model(str(out / "final")))
    assert not torch.allclose(y, forward(MMDiT.from_pretrained(base)), atol=1e-6)


def test_online_dpo_starts_at_log2_and_a_refreshed_reference_starts_there_again(base, tmp_path):
    fixed = logged(run(base, tmp_path / "fixed", "--method", "dpo", "--steps_per_round", "1"))
    assert fixed[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert fixed[1]["train/rewards/accuracies"] == 0.5
    assert fixed[2]["train/loss"] != pytest.approx(math.log(2), abs=1e-6)  # the base stays the reference
    moving = logged(run(base, tmp_path / "moving", "--method", "dpo", "--steps_per_round", "1",
                        "--ref_update_steps", "1"))
    assert moving[2]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = the policy after step 1
    adaptive = logged(run(base, tmp_path / "adaptive", "--method", "dpo", "--steps_per_round", "1",
                          "--dpo_error_weight", "adaptive"))
    assert adaptive[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # errors weighted alike: still log 2
    assert adaptive[1]["train/mse/policy_chosen"] != fixed[1]["train/mse/policy_chosen"]  # the weights are applied


def test_nft_kl_to_the_base_is_zero_on_the_first_step(base, tmp_path):
    for flags in ([], ["--nft_kl_t_max", "0.3"]):  # at the loss's t, and at its own t near the data
        log = logged(run(base, tmp_path / f"kl{len(flags)}", "--method", "nft", "--steps_per_round", "1",
                         "--nft_kl", "1.0", *flags))
        assert log[1]["train/nft/kl"] == 0.0  # a zero LoRA is the base
        assert log[2]["train/nft/kl"] > 0


def test_grpo_on_policy_ratio_is_exactly_one(base, tmp_path):
    log = logged(run(base, tmp_path / "grpo", "--method", "grpo", "--steps_per_round", "1", "--kl_beta", "0.04"))
    for r in (1, 2):  # every round's first step is purely on-policy
        assert log[r]["train/grpo/ratio"] == 1.0 and log[r]["train/grpo/clip_fraction"] == 0.0
    assert log[1]["train/grpo/kl"] == 0.0  # a zero LoRA is the base


def test_raft_imitates_only_samples_that_pass(base, tmp_path):
    everything = logged(run(base, tmp_path / "all", "--method", "raft", "--raft_threshold=-1e9"))
    assert everything[1]["round/train_items"] == 16
    nothing = run(base, tmp_path / "none", "--method", "raft", "--raft_threshold", "1e9")
    assert all(r["round/train_items"] == 0 for r in logged(nothing).values())
    # nothing passed: the adapter never moved, the policy is the base
    assert torch.equal(forward(load_model(str(nothing / "final"))), forward(MMDiT.from_pretrained(base)))


def test_the_final_adapter_is_the_ema_of_the_policy(base, tmp_path):
    from safetensors.torch import load_file

    def final(out, *flags):
        run(base, out, "--method", "nft", "--steps_per_round", "1", *flags)
        return load_file(str(out / "final" / "adapter_model.safetensors"))

    p1, p2 = final(tmp_path / "p1", "--rounds", "1"), final(tmp_path / "p2")  # the policy after steps 1 and 2
    ema = final(tmp_path / "ema", "--ema_decay", "0.9")
    # step 1 creates the EMA (a copy); step 2 mixes with decay min((1 + 2)/(10 + 2), 0.9) = 0.25
    moved = [k for k in p2 if not torch.equal(p1[k], p2[k])]
    assert moved
    for k in p2:
        assert torch.allclose(ema[k], 0.25 * p1[k] + 0.75 * p2[k], atol=1e-6), k


def test_resume_gives_the_uninterrupted_run(base, tmp_path):
    flags = ["--method", "nft", "--rounds", "4", "--save_rounds", "2", "--ema_decay", "0.5"]
    full = logged(run(base, tmp_path / "full", *flags))
    run(base, tmp_path / "part", "--method", "nft", "--rounds", "2", "--save_rounds", "2", "--ema_decay", "0.5")
    part = logged(run(base, tmp_path / "part", *flags, "--resume_from_checkpoint", "latest"))
    for r in (3, 4):
        assert part[r]["round/reward_mean"] == pytest.approx(full[r]["round/reward_mean"], rel=1e-5)
        assert part[r]["train/loss"] == pytest.approx(full[r]["train/loss"], rel=1e-5)
    assert torch.allclose(forward(load_model(str(tmp_path / "full" / "final"))),
                          forward(load_model(str(tmp_path / "part" / "final"))), atol=1e-6)


def test_a_compiled_run_is_the_eager_run(base, tmp_path):
    """--torch_compile traces the model through peft's adapters, the merged rollouts and the backward
    (aot_eager: inductor's tracing, torch's kernels; benchmarks/compile_round.py measures inductor's);
    --torch_compile_training false compiles the rollouts only."""
    from torch._dynamo.utils import counters

    flags = ["--method", "nft", "--steps_per_round", "1"]
    eager = logged(run(base, tmp_path / "eager", *flags))
    counters.clear()
    compiled = logged(run(base, tmp_path / "compiled", *flags, "--torch_compile", "--torch_compile_backend",
                          "aot_eager"))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3  # rollout, old-policy and training forwards at least
    torch._dynamo.reset()  # forget the graphs (a new model would reuse them) and count afresh
    counters.clear()
    rollouts_only = logged(run(base, tmp_path / "rollouts", *flags, "--torch_compile", "--torch_compile_backend",
                               "aot_eager", "--torch_compile_training", "false", "--grid_rounds", "5"))
    assert 1 <= counters["stats"]["unique_graphs"] < graphs  # the training steps ran eager
    assert os.listdir(tmp_path / "rollouts" / "samples") == ["step-000002.png"]  # a grid after the last round only
    for r in (1, 2):  # round 2 samples from the policy the compiled step trained
        for run_ in (compiled, rollouts_only):
            assert run_[r]["round/reward_mean"] == pytest.approx(eager[r]["round/reward_mean"], rel=1e-4)
            assert run_[r]["train/loss"] == pytest.approx(eager[r]["train/loss"], rel=1e-4)
    assert eager[2]["round/reward_mean"] != eager[1]["round/reward_mean"]


def test_prompt_embeddings_come_from_the_cache_and_a_full_cache_loads_no_text_encoder(base, tmp_path, monkeypatch):
    """The pool's text table is built on first use under --cache_dir; a second run reads it without
    loading a text encoder and trains the same."""
    from base_model.cache import Cache

    flags = ["--method", "raft", "--raft_threshold=-1", "--rounds", "1", "--cache_dir", str(tmp_path / "cache")]
    first = logged(run(base, tmp_path / "a", *flags))
    (name,) = os.listdir(tmp_path / "cache")
    texts = Cache(str(tmp_path / "cache" / name))
    assert texts.kind == "text" and len(texts) == 0 and texts.manifest["text"]["count"] > 2  # captions only

    def no_encoder(*a, **k):
        raise AssertionError("a text encoder was loaded although the cache holds every prompt")

    monkeypatch.setattr(online, "TextEmbedder", no_encoder)
    monkeypatch.setattr("base_model.adapters.TextEmbedder", no_encoder, raising=False)
    monkeypatch.setattr("base_model.text.TextEmbedder", no_encoder)
    second = logged(run(base, tmp_path / "b", *flags))
    assert second[1]["train/loss"] == first[1]["train/loss"]
    assert second[1]["round/reward_mean"] == first[1]["round/reward_mean"]


@pytest.mark.parametrize("spec, error, match", [
    ("py:tests.test_online:broken", RuntimeError, r"reward 'py:tests.test_online:broken' failed in round 1: KeyError"),
    ("py:tests.test_online:half_nan", ValueError, r"reward 'py:tests.test_online:half_nan' returned 8 non-finite"),
    ("py:tests.test_online:missing", ValueError, r"cannot import 'missing'"),
])
def test_a_failing_reward_stops_the_round_with_a_named_error(base, tmp_path, spec, error, match):
    with pytest.raises(error, match=match):
        run(base, tmp_path / "bad", "--reward", spec)


@pytest.mark.slow
def test_zero2_two_processes_match_single_process(base, tmp_path):
    """Same prompts, seeds and global batch (2 × 2 vs 1 × 4): the same rewards and losses."""
    common = SMALL + ["--method", "nft", "--base", base]
    i = common.index("--per_device_train_batch_size") + 1
    single, sharded = common[:i] + ["4"] + common[i + 1:], common[:i] + ["2"] + common[i + 1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "align.online", *single, "--output_dir", str(tmp_path / "single")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    launcher = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "2",
                "--num_machines", "1", "--use_deepspeed", "--deepspeed_config_file",
                os.path.join(ROOT, "configs/deepspeed/zero2.json"), "--mixed_precision", "no", "--dynamo_backend", "no"]
    p = subprocess.run([*launcher, "-m", "align.online", *sharded, "--output_dir", str(tmp_path / "zero2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = logged(tmp_path / "single"), logged(tmp_path / "zero2")
    for r in (1, 2):
        assert b[r]["round/reward_mean"] == pytest.approx(a[r]["round/reward_mean"], rel=1e-4), r
        assert b[r]["train/loss"] == pytest.approx(a[r]["train/loss"], rel=1e-4), r
    assert torch.allclose(forward(load_model(str(tmp_path / "single" / "final"))),
                          forward(load_model(str(tmp_path / "zero2" / "final"))), atol=1e-4)


def test_zero3_with_frozen_adapter_copies_stops_with_a_clear_error(base, tmp_path):
    """NFT's old policy (and DPO's moving reference, the EMA) are frozen adapter copies that ZeRO-3
    would partition: the run refuses before writing anything, naming ZeRO-2 instead."""
    launcher = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "1",
                "--num_machines", "1", "--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    out = tmp_path / "z3"
    p = subprocess.run([*launcher, "-m", "align.online", *SMALL, "--method", "nft", "--base", base,
                        "--output_dir", str(out)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "which ZeRO-3 would partition: launch with ZeRO-2" in p.stderr, p.stderr[-3000:]
    assert not os.path.exists(out / "log.jsonl")


def test_ptx_adds_the_pretraining_loss_and_leaves_the_methods_draws_alone(base, tmp_path):
    plain = logged(run(base, tmp_path / "plain", "--method", "nft", "--steps_per_round", "1"))
    ptx = logged(run(base, tmp_path / "ptx", "--method", "nft", "--steps_per_round", "1", "--ptx_weight", "2.0"))
    assert "train/ptx_loss" not in plain[1] and ptx[1]["train/ptx_loss"] > 0
    # the first step: the same adapter, samples, t and noise for NFT's term; the renders' term is added to it
    assert ptx[1]["train/nft/positive_loss"] == plain[1]["train/nft/positive_loss"]
    assert ptx[1]["train/loss"] == pytest.approx(plain[1]["train/loss"] + 2.0 * ptx[1]["train/ptx_loss"], rel=1e-5)
    assert ptx[2]["train/nft/positive_loss"] != plain[2]["train/nft/positive_loss"]  # it moved the policy
    # the control: no preference (every group has zero spread, r = 0.5): only the renders' term moves the policy
    control = logged(run(base, tmp_path / "control", "--method", "nft", "--steps_per_round", "1", "--ptx_weight",
                         "2.0", "--reward", "constant"))
    assert control[1]["round/zero_spread_groups"] == 1.0 and control[1]["train/nft/r"] == 0.5
    assert not torch.allclose(forward(load_model(str(tmp_path / "control" / "final"))),
                              forward(MMDiT.from_pretrained(base)), atol=1e-6)


def test_ptx_loss_is_one_global_draw_shared_by_the_processes():
    """ptx_loss by hand (rf loss, v = ε − x0, on renders and their text rows drawn from the generator),
    and 2 processes' halves average to the 1-process loss."""
    import numpy as np

    from base_model.flow import sample_t

    def net(x, t, c, p):  # a velocity that reads its text condition
        return 0.5 * x * t.view(-1, 1, 1, 1) + c.mean((1, 2)).view(-1, 1, 1, 1) + p.mean(1).view(-1, 1, 1, 1)

    class Texts:
        def text(self, rows):
            r = torch.as_tensor(rows, dtype=torch.float32) / 100
            return r.view(-1, 1, 1).expand(-1, 2, 3), r.view(-1, 1).expand(-1, 3)

    ptx = {"x0": torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1)), "rows": np.arange(10) * 7}
    cfg = OnlineConfig(base="x", ptx_batch_size=6, logit_mean=1.0)
    one = online.ptx_loss(net, ptx, Texts(), cfg, torch.Generator().manual_seed(5), 1, 0)
    halves = [online.ptx_loss(net, ptx, Texts(), cfg, torch.Generator().manual_seed(5), 2, r) for r in (0, 1)]
    assert torch.allclose(one, (halves[0] + halves[1]) / 2, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(10, (6,), generator=g)
    t = sample_t(6, "logit_normal", 1.0, 1.0, generator=g)
    eps = torch.randn(6, 3, 4, 4, generator=g)
    x0, row = ptx["x0"][idx], (idx * 7).float() / 100
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = 0.5 * x_t * t.view(-1, 1, 1, 1) + 2 * row.view(-1, 1, 1, 1)
    assert torch.allclose(one, ((eps - x0) - v).pow(2).mean(), atol=1e-6)


def test_ptx_needs_a_split_whose_renders_are_the_data(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(ValueError, match=r"--ptx_weight needs a shapes-world split as --prompts .*prompts.txt"):
        parse(OnlineConfig, ["--base", "x", "--prompts", str(prompts), "--ptx_weight", "1"])
