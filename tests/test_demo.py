"""`make demo`'s pipeline at a reduced size: the same stage commands and configs, smaller flags."""

import json
import os
import re
import sys

import pytest

from align import demo

SMALL = {
    # the pipeline's plumbing, not its quality: the summary's lines are checked, not its numbers
    "pretrain": ["--max_steps=30", "--num_train=256", "--num_val=16", "--eval_steps=1000", "--save_steps=1000",
                 "--num_samples=4", "--sample_steps=2", "--per_device_train_batch_size=16", "--warmup_steps=5"],
    "nft": ["--rounds=2", "--prompts_per_round=4", "--k=4", "--steps_per_round=2", "--per_device_train_batch_size=4",
            "--num_samples=2", "--sample_steps=2", "--torch_compile=False"],  # compiling 2 tiny rounds costs more than it saves
    "eval": ["--n_prompts=8", "--n_per_prompt=2", "--steps=4", "--val_images=16"],
}
SMALL["raft"] = SMALL["nft"]


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    out = tmp_path / "demo"
    overrides = [f"{stage}:{flag}" for stage, flags in SMALL.items() for flag in flags]
    demo.main(["--output_dir", str(out)] + [x for o in overrides for x in ("--override", o)])
    printed = capsys.readouterr().out
    for path in ("pretrain/final/model.safetensors", "nft/final/adapter_model.safetensors", "nft/log.jsonl",
                 "raft/final/adapter_model.safetensors", "eval/results.json", "report.html", "summary.txt",
                 "stage_times.json"):
        assert os.path.exists(out / path), path
    assert f"{sys.executable} -m align.online --config configs/demo/nft.yaml" in printed  # rerunnable commands
    summary = (out / "summary.txt").read_text()
    accuracies = dict(re.findall(r"(base|nft|raft)\s+compositional accuracy\s+([\d.]+)%", summary))
    assert set(accuracies) == {"base", "nft", "raft"}
    assert len(re.findall(r"GenEval overall [\d.]+%\s+diversity \d\.\d\d", summary)) == 3  # the collapse audit
    assert re.search(r"nft_vs_base\s+Δ accuracy [+-][\d.]+% \[", summary)
    times = json.load(open(out / "stage_times.json"))
    assert set(times) == set(demo.STAGES) and all(t > 0 for t in times.values())
