"""reward.eval end to end on two tiny checkpoints: results.json with CIs, report.html whose every
image loads in headless Chromium, and clear errors for bad input."""

import json
import os
import shutil
import struct
import time

import pytest
import torch

from base_model.mmdit import MMDiT, preset
from base_model.sources import read_prompts
from reward import eval as reval
from tests.conftest import randomize


def write_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = randomize(MMDiT(preset("toy", depth=2, hidden=32, heads=2)), std=0.02)
    model.save_pretrained(str(path))
    with open(os.path.join(path, "conditioning.json"), "w") as f:
        json.dump({"text_encoders": ["minilm"], "image_space": "pixels", "resolution": 32}, f)
    return str(path)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return write_checkpoint(root / "a", 0), write_checkpoint(root / "b", 1)


def test_eval_writes_results_and_a_report_whose_images_load(two, tmp_path, chromium):
    a, b = two
    out = reval.main(["--model", f"base={a}", "--model", f"other={b}", "--n_prompts", "6", "--n_per_prompt", "2",
                      "--steps", "2", "--val_images", "16", "--output_dir", str(tmp_path)])
    res = json.load(open(tmp_path / "results.json"))
    assert res == json.loads(json.dumps(out))
    for name in ("base", "other"):
        m = res["models"][name]
        assert m["accuracy"]["n"] == 12 and len(m["accuracy"]["ci95"]) == 2
        assert len(m["val_loss"]["loss_t"]) == 8
    pw = res["pairwise"]["other_vs_base"]
    assert pw["compositional"]["wins"] + pw["compositional"]["ties"] + pw["compositional"]["losses"] == 12
    assert res["config"]["models"] == {"base": a, "other": b}
    page = chromium.new_page()
    page.goto(f"file://{tmp_path / 'report.html'}")
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert len(widths) >= 6 * 2 * 2 + 2 and all(w > 0 for w in widths)  # images of both models and the plots
    assert "GenEval overall" in page.inner_text("body")


def test_a_model_whose_images_of_a_prompt_all_match_is_flagged_collapsed(two, tmp_path, monkeypatch):
    """The collapse audit: one image per prompt repeated k times (what RAFT's demo run drew) has diversity 0 and is
    flagged, whatever its accuracy; a model with distinct images per prompt is not."""
    a, _ = two
    fresh = reval.generate

    def generate(spec, captions, cfg):
        images, val = fresh(a if spec == "collapsed" else spec, captions, cfg)
        if spec == "collapsed":
            images = images[::cfg.n_per_prompt].repeat_interleave(cfg.n_per_prompt, 0)
        return images, val

    monkeypatch.setattr(reval, "generate", generate)
    cfg = reval.EvalConfig(models=[("base", a), ("same", a), ("flat", "collapsed")], n_prompts=4, n_per_prompt=3,
                           steps=2, val_images=0, output_dir=str(tmp_path))
    out = reval.evaluate(cfg)
    div = {n: m["diversity"]["mean"] for n, m in out["models"].items()}
    assert div["base"] > 0.05 and div["same"] == pytest.approx(div["base"]) and div["flat"] == pytest.approx(0, abs=1e-6)
    assert out["models"]["same"]["collapsed"] is False and out["models"]["flat"]["collapsed"] is True
    assert "collapsed" not in out["models"]["base"]
    assert any("flat: diversity 0.000" in line and "FLAGGED: collapsed" in line for line in reval.summary_lines(out))
    assert "<b>collapsed</b>" in (tmp_path / "report.html").read_text()


def test_same_seeds_give_the_same_images_for_the_same_model(two, tmp_path):
    a, _ = two
    cfg = reval.EvalConfig(models=[("x", a)], n_prompts=3, n_per_prompt=2, steps=2, val_images=0)
    caps, _ = read_prompts(cfg.prompts, 3)
    x1, _ = reval.generate(a, caps, cfg)
    x2, _ = reval.generate(a, caps[:2], cfg)  # a different batch: image i keeps seed i
    # the same noise, so the same image; not bit-equal on every CPU: AVX-512 kernels round by batch size
    assert torch.allclose(x1[:4], x2, atol=1e-5, rtol=0)  # measured: 6e-8 apart here


def test_bad_inputs_are_named(two, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWALIGN_DEBUG", "1")  # the errors themselves, not their one-line print
    a, _ = two
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    with pytest.raises(ValueError, match="line 2: empty prompt"):
        reval.main(["--model", f"a={a}", "--prompts", str(prompts), "--output_dir", str(tmp_path / "o")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        reval.main(["--model", f"a={empty}", "--n_prompts", "2", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="NAME=SPEC"):
        reval.main(["--model", a, "--output_dir", str(tmp_path / "o")])


def test_adapter_with_a_different_base_is_refused(two, tmp_path, monkeypatch):
    from align.lora import add_lora
    from base_model.adapters import BASE_RECORD, weights_sha256

    a, b = two
    peft = add_lora(MMDiT.from_pretrained(a), r=2, alpha=2)
    peft.save_pretrained(str(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / BASE_RECORD, "w") as f:
        json.dump({"base": a, "sha256": weights_sha256(a)}, f)
    shutil.copy(os.path.join(a, "conditioning.json"), tmp_path / "adapter")
    monkeypatch.setenv("FLOWALIGN_DEBUG", "1")
    with pytest.raises(ValueError, match="SHA-256"):
        reval.main(["--model", f"x={b}+{tmp_path / 'adapter'}", "--n_prompts", "2", "--output_dir", str(tmp_path / "o")])


def test_yaml_config_and_cli_models(two, tmp_path, monkeypatch):
    a, b = two
    y = tmp_path / "eval.yaml"
    y.write_text(f"n_prompts: 2\nn_per_prompt: 1\nsteps: 1\nval_images: 0\nmodel: [y={a}]\n")
    out = reval.main(["--config", str(y), "--model", f"z={b}", "--output_dir", str(tmp_path / "o")])
    assert list(out["models"]) == ["z"] and out["config"]["n_prompts"] == 2
    y.write_text("n_promptz: 2\n")
    monkeypatch.setenv("FLOWALIGN_DEBUG", "1")
    with pytest.raises(ValueError, match="n_promptz"):
        reval.main(["--config", str(y), "--model", f"z={b}"])


def wandb_records(path: str, block: int = 32768):
    """The records of an offline run file (`run-ID.wandb`: a LevelDB-style log of protobuf records)
    once wandb's service has written its exit record (it may still be flushing after `finish()`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for _ in range(100):
        data, records, buf, pos = open(path, "rb").read(), [], b"", 7
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if n == 0 and kind == 0 or pos + 7 + n > len(data):
                break
            buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # FULL or LAST: a whole record
                records.append(pb.Record.FromString(buf))
                buf = b""
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.2)
    raise AssertionError(f"{path}: no exit record after 20 s")


def test_wandb_logs_every_metric_offline(two, tmp_path, monkeypatch):
    """`--report_to wandb` without an account: an offline run that logged results.json's numbers and the report."""
    a, b = two
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = reval.main(["--model", f"base={a}", "--model", f"other={b}", "--n_prompts", "3", "--n_per_prompt", "2",
                      "--steps", "1", "--val_images", "8", "--output_dir", str(tmp_path), "--report_to", "wandb"])
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
              for r in wandb_records(str(files[0])) if r.WhichOneof("record_type") == "history" for i in r.history.item}
    flat = reval.flat_metrics(out)
    assert {"base/accuracy", "other/accuracy_ci_high", "other_vs_base/accuracy_diff",
            "other_vs_base/win_rate/compositional", "base/val_loss"} <= set(flat)
    assert any(k.startswith("base/tasks/") for k in flat)
    for key, value in flat.items():
        assert logged[key] == pytest.approx(value), key
    assert logged["report/_type"] == "html-file"


def test_height_and_width_sample_through_the_one_path(two, tmp_path, monkeypatch):
    """--height/--width reach `Loaded.generate`: a wide image at the model's patch grid; a side that
    is not a whole number of patches, or beyond the position table, is an InputError naming it."""
    from base_model.errors import InputError

    a, _ = two
    caps, _ = read_prompts("heldout_prompts", 2)
    cfg = reval.EvalConfig(models=[("x", a)], n_prompts=2, n_per_prompt=1, steps=2, val_images=0, height=16, width=32)
    images, _ = reval.generate(a, caps, cfg)
    assert images.shape == (2, 3, 16, 32)
    for h, w, match in ((16, 30, "multiples of 4 px"), (16, 64, "up to 32 px")):
        with pytest.raises(InputError, match=match):
            reval.generate(a, caps, reval.EvalConfig(models=[("x", a)], n_prompts=2, n_per_prompt=1, steps=2,
                                                     val_images=0, height=h, width=w))
    parsed = {}
    monkeypatch.setattr(reval, "evaluate", lambda cfg: parsed.setdefault("cfg", cfg) and {"models": {}, "pairwise": {}})
    reval.main(["--model", f"x={a}", "--height", "16", "--width", "32", "--output_dir", str(tmp_path / "e")])
    assert (parsed["cfg"].height, parsed["cfg"].width) == (16, 32)
