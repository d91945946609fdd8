"""Pretraining: config parsing, data errors, NaN stop, kill-and-resume, ZeRO-2/3 equivalence."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from base_model import pretrain
from base_model.cli import parse
from base_model.errors import InputError
from base_model.mmdit import MMDiT
from base_model.pretrain import PretrainConfig
from base_model.training import DataOrder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num_train", "256", "--num_val", "16", "--num_samples", "4", "--sample_steps", "2",
         "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "1000",
         "--report_to", "none", "--warmup_steps", "2", "--text_drop_prob", "0.2", "--ema_decay", "0.9"]


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def losses(output_dir):
    """step → loss from log.jsonl; a step logged twice (before a kill and after resume) keeps the last."""
    out = {}
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


# -- config: YAML < CLI, unknown keys and wrong types raise ------------------------------------

def test_yaml_then_cli_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 7\nlearning_rate: 0.5\ntext_encoders: [minilm]\n")
    cfg = parse(PretrainConfig, ["--config", str(y), "--learning_rate", "0.25"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.warmup_steps) == (7, 0.25, 100)


def test_unknown_yaml_key_raises(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_stepz: 7\n")
    with pytest.raises(ValueError, match="max_stepz"):
        parse(PretrainConfig, ["--config", str(y)])


def test_unknown_cli_flag_raises():
    with pytest.raises(ValueError, match="--max_stepz"):
        parse(PretrainConfig, ["--max_stepz", "3"])


def test_wrong_type_in_yaml_raises(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 1.5\n")
    with pytest.raises(InputError, match=r"c\.yaml: PretrainConfig\.max_steps: expected <class 'int'>, got 1\.5"):
        parse(PretrainConfig, ["--config", str(y)])


def test_bad_choice_is_named():
    with pytest.raises(ValueError, match="--timestep_density 'lognorm'"):
        PretrainConfig(timestep_density="lognorm")


def test_shipped_toy_config_parses():
    cfg = parse(PretrainConfig, ["--config", os.path.join(ROOT, "configs/pretrain/toy.yaml")])
    assert cfg.model_preset == "toy" and cfg.dataset == "shapes"


# -- data ----------------------------------------------------------------------------------

def write_parquet(path, n, bad_rows=(), drop_caption=False):
    import io

    import datasets
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 24, 3), i % 255, np.uint8)).save(buf, format="PNG")
        rows.append({"image": {"bytes": b"not a png" if i in bad_rows else buf.getvalue(), "path": f"img{i}.png"},
                     "text": f"caption {i}"})
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    if drop_caption:
        ds = ds.remove_columns("text")
    ds.to_parquet(str(path))


def precompute_parquet(tmp_path, name="d"):
    from base_model.precompute import PrecomputeConfig, precompute

    return precompute(parse(PrecomputeConfig, ["--dataset", str(tmp_path / f"{name}.parquet"), "--caption_column", "text",
                                               "--resolution", "16", "--min_bucket", "8",
                                               "--output", str(tmp_path / f"{name}-cache")]))


def test_real_data_skips_and_counts_corrupt_images(tmp_path):
    from base_model.cache import Cache

    write_parquet(tmp_path / "d.parquet", 200, bad_rows=(7,))
    cache = Cache(precompute_parquet(tmp_path))
    assert len(cache) == 199 and cache.manifest["skipped"] == 1 and "img7.png" in cache.manifest["bad"][0]
    assert cache.read([0])["x"].shape == (1, 3, 16, 16)
    with open(os.path.join(cache.path, "text_captions.json")) as f:
        assert "caption 7" not in json.load(f)


def test_too_many_corrupt_images_stop_with_names(tmp_path):
    write_parquet(tmp_path / "d.parquet", 50, bad_rows=(3, 9))
    with pytest.raises(InputError, match="img3.png.*img9.png"):
        precompute_parquet(tmp_path)


def test_missing_column_is_named(tmp_path):
    write_parquet(tmp_path / "d.parquet", 5, drop_caption=True)
    with pytest.raises(InputError, match=r"lack column\(s\) \['text'\]"):
        precompute_parquet(tmp_path)


def test_data_order_is_a_permutation_per_epoch():
    order = DataOrder(10, seed=3)
    first = order.indices(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(order.indices(4, 3), first[4:7])
    assert torch.equal(DataOrder(10, seed=3).indices(8, 4)[:2], first[8:])  # across the epoch boundary


# -- the loop --------------------------------------------------------------------------------

def test_run_writes_final_and_nan_stops_with_step(tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain.main(parse(PretrainConfig, SMALL + ["--max_steps", "3", "--save_steps", "2",
                                                 "--eval_steps", "3", "--output_dir", str(out)]))
    model = MMDiT.from_pretrained(str(out / "final"))
    assert model.config.context_dim == 384 and os.path.exists(out / "final" / "raw" / "model.safetensors")
    assert os.path.exists(out / "samples" / "step-000003.png")
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert not [d for d in os.listdir(out) if d.startswith(".tmp")]
    # without EMA the raw weights are the final model, written once
    pretrain.main(parse(PretrainConfig, SMALL + ["--max_steps", "2", "--ema_decay", "0", "--output_dir", str(out / "no_ema")]))
    assert sorted(os.listdir(out / "no_ema" / "final")) == ["conditioning.json", "config.json", "model.safetensors"]

    real = pretrain.formulation_loss
    calls = {"n": 0}

    def nan_on_third_step(*a):
        calls["n"] += 1
        loss = real(*a)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(pretrain, "formulation_loss", nan_on_third_step)
    with pytest.raises(FloatingPointError, match="at step 3.*checkpoint-2"):
        pretrain.main(parse(PretrainConfig, SMALL + ["--max_steps", "5", "--save_steps", "2",
                                                     "--output_dir", str(tmp_path / "nan")]))
    assert os.path.exists(tmp_path / "nan" / "checkpoint-2" / "trainer_state.json")


def run_cli(args, env_extra=None, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "base_model.pretrain"] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_loss_curve(tmp_path):
    common = SMALL + ["--max_steps", "10", "--save_steps", "3", "--save_total_limit", "5"]
    ref = run_cli(common + ["--output_dir", str(tmp_path / "ref")])
    assert ref.wait() == 0, ref.stdout.read()
    run = run_cli(common + ["--output_dir", str(tmp_path / "run")])
    deadline = time.time() + 300
    while not os.path.exists(tmp_path / "run" / "checkpoint-6") and time.time() < deadline:
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not os.path.exists(tmp_path / "run" / "final")
    resumed = run_cli(common + ["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "latest"])
    assert resumed.wait() == 0, resumed.stdout.read()
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.slow
def test_zero2_and_zero3_match_single_process(tmp_path):
    """Same global batch (2 × 4 vs 1 × 8), same data, t, noise: the loss curves agree."""
    common = [a for a in SMALL] + ["--max_steps", "4", "--save_steps", "4"]
    i = common.index("--per_device_train_batch_size")
    single = common[:i + 1] + ["8"] + common[i + 2:]
    sharded = common[:i + 1] + ["4"] + common[i + 2:]
    p = run_cli(single + ["--output_dir", str(tmp_path / "single")])
    assert p.wait() == 0, p.stdout.read()
    ref = losses(tmp_path / "single")
    ref_final = MMDiT.from_pretrained(str(tmp_path / "single" / "final" / "raw")).state_dict()
    for stage in (2, 3):
        launcher = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--use_deepspeed",
                    "--deepspeed_config_file", os.path.join(ROOT, f"configs/deepspeed/zero{stage}.json"),
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher[0] = os.path.join(os.path.dirname(sys.executable), "accelerate")
        out = tmp_path / f"zero{stage}"
        p = run_cli(sharded + ["--output_dir", str(out)], launcher=launcher)
        stdout, _ = p.communicate(timeout=600)
        assert p.returncode == 0, stdout[-4000:]
        got = losses(out)
        assert sorted(got) == sorted(ref)
        for step in ref:  # float reductions differ in order only
            assert got[step] == pytest.approx(ref[step], rel=1e-4), (stage, step)
        assert sorted(os.listdir(out / "final" / "raw")) == ["config.json", "model.safetensors"]
        final = MMDiT.from_pretrained(str(out / "final" / "raw")).state_dict()
        for k, v in ref_final.items():
            assert torch.allclose(final[k], v, atol=1e-4), (stage, k)


def test_mixed_sizes_train_in_aspect_buckets_and_sample_at_their_size(tmp_path):
    """Square, wide and (too few to batch) tall images: two buckets, non-square latents through the
    cropped position table, and a grid sampled at the wide bucket's size."""
    import datasets

    from base_model import sample
    from base_model.cache import Cache
    from base_model.pickapic import encode_png

    sizes = [(32, 32)] * 8 + [(20, 40)] * 4 + [(40, 20)] * 2
    rows = [{"image": encode_png(np.full((h, w, 3), 40 * (i % 5), np.uint8)), "caption": f"caption {i % 3}"}
            for i, (h, w) in enumerate(sizes)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    out = tmp_path / "run"
    pretrain.main(parse(PretrainConfig, SMALL + ["--dataset", str(tmp_path / "d.parquet"), "--num_val", "2",
                                                 "--per_device_train_batch_size", "4", "--max_steps", "3",
                                                 "--save_steps", "3", "--output_dir", str(out)]))
    cache = Cache(str(out / "data-cache" / "train"))
    assert cache.manifest["bucket_counts"] == {"32x32": 10, "24x48": 4}  # the 2 tall images joined the square
    assert MMDiT.from_pretrained(str(out / "final")).config.pos_embed_max_size == 12  # 48 px / patch 4
    assert len(losses(out)) == 3  # 2 square batches and 1 wide one: the epoch
    sample.main(["--checkpoint", str(out / "final"), "--prompts", "caption 0", "--height", "24", "--width", "48",
                 "--steps", "2", "--output_dir", str(tmp_path / "grid")])
    assert Image.open(tmp_path / "grid" / "grid.png").size[0] >= 48
