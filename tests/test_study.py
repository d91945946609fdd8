"""The studies' driver end to end: a killed study resumes its run, a rerun trains nothing, the
report and study.json hold every analysis; config errors are named."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from base_model import runs, study
from reward.imagetext import ImageTextConfig, ImageTextModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(tmp_path, **changes):
    cfg = {**yaml.safe_load(open(os.path.join(ROOT, "configs/study/smoke.yaml"))), "output_dir": str(tmp_path / "s"),
           "fd_model": str(tmp_path / "imagetext"), **changes}
    ImageTextModel(ImageTextConfig(width=8, embed_dim=16, text_width=16, text_heads=2, text_depth=1)).save_pretrained(
        cfg["fd_model"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg


def test_config_errors_are_named(tmp_path):
    path, _ = smoke(tmp_path, variants={"a": {"timestep_densty": "uniform"}})
    with pytest.raises(ValueError, match=r"variants.a: \['timestep_densty'\]"):
        study.load_config(path, {})
    path, _ = smoke(tmp_path, variants={"a": {"output_dir": "x"}})
    with pytest.raises(ValueError, match=r"output_dir"):
        study.load_config(path, {})
    path, _ = smoke(tmp_path, variants={"a": {"formulation": "x0"}})
    with pytest.raises(ValueError, match=r"variant 'a'.*formulation"):
        study.plan(study.load_config(path, {}))


def test_keys_depend_on_the_config_not_on_paths(tmp_path):
    path, _ = smoke(tmp_path)
    keys = [r.key for r in study.plan(study.load_config(path, {}))]
    moved = [r.key for r in study.plan(study.load_config(path, {"output_dir": str(tmp_path / "elsewhere")}))]
    assert keys == moved and len(set(keys)) == 3


@pytest.mark.slow
def test_killed_study_resumes_and_a_rerun_trains_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)
    path, cfg = smoke(tmp_path)
    first = study.plan(study.load_config(path, {}))[0]
    folder = os.path.join(cfg["output_dir"], "runs", first.key)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "base_model.study", "--config", path], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(folder, "checkpoint-3")) and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pretraining child
    proc.wait()
    assert not os.path.isfile(os.path.join(folder, "result.json"))

    study.main(["--config", path])
    assert "--resume_from_checkpoint latest" in capfd.readouterr().out
    out = json.load(open(os.path.join(cfg["output_dir"], "study.json")))
    assert len(out["runs"]) == 3 and set(out["cells"]) == set(cfg["variants"])
    assert {r["formulation"] for r in out["runs"]} == {"rf", "eps_linear"} and {"dit", "mmdit"} <= {
        r["backbone"] for r in out["runs"]}
    assert len(out["ranking"]["mean_rank"]) == 3 and 0 < out["scaling"]["fit"]["r2"] <= 1
    assert len(out["runs"][0]["settings"]) == 4 and out["runs"][0]["settings"][0]["fd"] >= 0
    assert -1 <= out["correlation"]["val_loss_vs_accuracy"]["r"] <= 1 or out["correlation"]["val_loss_vs_accuracy"]["r"] != out["correlation"]["val_loss_vs_accuracy"]["r"]
    html = open(os.path.join(cfg["output_dir"], "study.html")).read()
    assert html.count("<img") >= 3 + 3  # plots and one grid per cell

    def no_training(*a, **k):
        raise AssertionError("a cached run trained again")

    monkeypatch.setattr(runs.subprocess, "run", no_training)
    study.main(["--config", path])  # everything cached
    study.main(["--config", path, "--run_index", "1"])
    study.main(["--config", path, "--list"])
    assert capfd.readouterr().out.count("\tdone") == 3
