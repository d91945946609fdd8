"""Nothing lost: a finished run is never replaced without --overwrite_output_dir, and a bad input is one
line `error: …` with exit status 2 that leaves every file already there byte-identical."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from align import dpo, online
from align.pairs import encode_png, pairs_dataset
from base_model import pretrain
from base_model.mmdit import MMDiT
from base_model.outputs import atomic_folder, check_output_dir
from base_model.shapes import make_split, render
from reward import eval as reward_eval
from reward.humaneval import __main__ as humaneval
from tests.conftest import save_tiny_base
from tests.test_pretrain import SMALL as PRETRAIN_SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = PRETRAIN_SMALL + ["--max_steps", "2"]
DPO = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_steps", "1000", "--num_samples", "2",
       "--sample_steps", "2", "--report_to", "none", "--lora_r", "4", "--lora_alpha", "4", "--max_steps", "2"]

pytestmark = pytest.mark.usefixtures("reset_accelerate")


def tree(root) -> dict:
    """Every path under `root` with the SHA-256 of its bytes (folders: None)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = None
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                out[os.path.relpath(os.path.join(folder, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def one_line_error(capsys, entry, argv, match):
    """`entry(argv)` exits 2 printing exactly one `error: …` line that matches, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        entry(argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(match, lines[0]), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def world(tmp_path):
    """A folder with a user's file, a file where a folder is expected, a non-database, and pairs with a
    column missing; every case checks that all of it is left byte-identical."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "votes.sqlite").write_bytes(b"not a database" * 100)
    (tmp_path / "bad.yaml").write_text("max_stepz: 3\n")
    rows = [{"caption": "a red square", "jpg_0": encode_png(render(s)), "jpg_1": encode_png(render(s)),
             "label_0": 1.0, "label_1": 0.0} for s in make_split("train", 4)]
    pairs_dataset(rows).remove_columns(["label_1"]).to_parquet(str(tmp_path / "no_label_1.parquet"))
    save_tiny_base(str(tmp_path / "base"))
    shutil.copytree(tmp_path / "base", tmp_path / "truncated")
    with open(tmp_path / "truncated" / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    shutil.copytree(tmp_path / "base", tmp_path / "str_hidden")
    cfg = json.loads((tmp_path / "str_hidden" / "config.json").read_text())
    (tmp_path / "str_hidden" / "config.json").write_text(json.dumps({**cfg, "hidden": "128"}))
    return tmp_path


CASES = {
    "pretrain misspelt flag": (pretrain.cli, ["--max_stepz", "3"], r"--max_stepz"),
    "pretrain unknown YAML key": (pretrain.cli, ["--config", "{t}/bad.yaml"], r"bad\.yaml.*max_stepz"),
    "pretrain missing config": (pretrain.cli, ["--config", "{t}/nowhere.yaml"], r"nowhere\.yaml: no such file"),
    "pretrain missing dataset": (pretrain.cli, ["--dataset", "{t}/no_data", "--output_dir", "{t}/out"],
                                 r"--dataset .*no_data.* does not exist"),
    "pretrain output is a file": (pretrain.cli, ["--output_dir", "{t}/a_file"], r"a_file.* not a folder"),
    "pretrain resume with no checkpoint": (pretrain.cli, ["--output_dir", "{t}/out", "--resume_from_checkpoint", "latest"],
                                           r"latest: no checkpoint"),
    "dpo pairs without a column": (dpo.cli, ["--base", "{t}/base", "--pairs", "{t}/no_label_1.parquet",
                                             "--output_dir", "{t}/out"], r"no_label_1\.parquet.*lack.*label_1"),
    "online bad method": (online.cli, ["--method", "ppo", "--base", "{t}/base"], r"--method 'ppo'"),
    "online resume with no checkpoint": (online.cli, ["--base", "{t}/base", "--output_dir", "{t}/out",
                                                      "--resume_from_checkpoint", "latest"], r"no checkpoint"),
    "eval bad model spec": (reward_eval.main, ["--model", "base={t}/base", "--model", "dpo={t}/nowhere"],
                            r"nowhere.*neither an MMDiT checkpoint"),
    "eval truncated weights": (reward_eval.main, ["--model", "base={t}/truncated", "--output_dir", "{t}/out"],
                               r"truncated.model\.safetensors: unreadable, truncated or corrupt"),
    "eval config.json with a string": (reward_eval.main, ["--model", "base={t}/str_hidden", "--output_dir", "{t}/out"],
                                       r"str_hidden.config\.json.*'hidden'.*'128'"),
    "eval spec without a name": (reward_eval.main, ["--model", "{t}/base"], r"expected NAME=SPEC"),
    "humaneval create count 0": (humaneval.main, ["create", "--model", "a=x", "--model", "b=y", "--prompts", "p",
                                                  "--n_per_prompt", "0", "--db", "{t}/s.db", "--images", "{t}/i"],
                                 r"--n_per_prompt: must be ≥ 1"),
    "humaneval serve on a non-database": (humaneval.main, ["serve", "--db", "{t}/votes.sqlite"],
                                          r"votes\.sqlite.*not a study database"),
    "humaneval export onto a file": (humaneval.main, ["export", "--db", "{t}/votes.sqlite", "--output", "{t}/a_file"],
                                     r"a_file.*not a folder|not a study database"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, capsys, case):
    entry, argv, match = CASES[case]
    before = tree(world)
    one_line_error(capsys, entry, [a.format(t=world) for a in argv], match)
    assert tree(world) == before  # nothing changed, nothing created (no empty output folder, no *.tmp)


def test_the_module_exits_2_and_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "base_model.pretrain", "--config", str(tmp_path / "nowhere.yaml")]
    plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == f"error: --config {tmp_path / 'nowhere.yaml'}: no such file"
    debug = subprocess.run(cmd + ["--debug"], cwd=ROOT, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "MissingInput" in debug.stderr


def test_a_finished_pretraining_run_is_refused_then_replaced_atomically(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    pretrain.cli(PRETRAIN + ["--output_dir", str(out)])
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    one_line_error(capsys, pretrain.cli, PRETRAIN + ["--output_dir", str(out)],
                   r"finished run \(final/\).*--overwrite_output_dir")
    assert tree(out) == before

    # an overwrite that dies while writing final/ leaves the old final/ whole, and no temporary folder
    real = MMDiT.save_pretrained

    def fail(self, path, *a, **k):
        if ".tmp-final" in str(path):
            raise OSError("disk full")
        return real(self, path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(MMDiT, "save_pretrained", fail)
        with pytest.raises(OSError, match="disk full"):
            pretrain.cli(PRETRAIN + ["--output_dir", str(out), "--overwrite_output_dir"])
    assert {k: v for k, v in tree(out).items() if k.startswith("final")} == \
        {k: v for k, v in before.items() if k.startswith("final")}
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]

    pretrain.cli(PRETRAIN + ["--max_steps", "3", "--output_dir", str(out), "--overwrite_output_dir"])
    after = tree(out)
    assert after["final/model.safetensors"] != before["final/model.safetensors"]  # the new run's model
    assert after["notes.txt"] == before["notes.txt"]  # the user's file stays
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3"]
    with open(out / "log.jsonl") as f:  # one run's log, not two mixed
        assert [int(line.split('"step": ')[1].split(",")[0]) for line in f if '"train/loss"' in line] == [1, 2, 3]


def test_an_unfinished_run_points_at_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    one_line_error(capsys, pretrain.cli, PRETRAIN + ["--output_dir", str(out)],
                   r"unfinished run \(checkpoint-4\).*--resume_from_checkpoint latest")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    one_line_error(capsys, pretrain.cli, PRETRAIN + ["--output_dir", str(tmp_path / "mine")], r"not empty \(data\.csv\)")


def test_a_finished_dpo_run_is_refused_then_replaced(world, capsys):
    pairs = world / "pairs.parquet"
    rows = [{"caption": s.caption, "jpg_0": encode_png(render(s)), "jpg_1": encode_png(render(o)), "label_0": 1.0,
             "label_1": 0.0} for s, o in zip(make_split("train", 8), make_split("val", 8))]
    pairs_dataset(rows).to_parquet(str(pairs))
    out = world / "dpo"
    argv = DPO + ["--base", str(world / "base"), "--pairs", str(pairs), "--output_dir", str(out)]
    dpo.cli(argv)
    before = tree(out)
    one_line_error(capsys, dpo.cli, argv, r"finished run \(final/\)")
    assert tree(out) == before
    dpo.cli(argv + ["--seed", "1", "--overwrite_output_dir"])
    assert tree(out)["final/adapter_model.safetensors"] != before["final/adapter_model.safetensors"]


def test_output_checks_and_atomic_folder(tmp_path):
    check_output_dir(str(tmp_path / "new"))  # absent: fine
    (tmp_path / "run" / "final").mkdir(parents=True)
    check_output_dir(str(tmp_path / "run"), overwrite=True)
    check_output_dir(str(tmp_path / "run"), resume="latest")
    (tmp_path / "run" / "final" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(str(tmp_path / "run" / "final")) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
            raise RuntimeError("killed")
    assert os.listdir(tmp_path / "run") == ["final"] and os.listdir(tmp_path / "run" / "final") == ["old.txt"]
    with atomic_folder(str(tmp_path / "run" / "final")) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert os.listdir(tmp_path / "run") == ["final"] and os.listdir(tmp_path / "run" / "final") == ["new.txt"]
