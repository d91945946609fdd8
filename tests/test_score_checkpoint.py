import json

import pytest

from base_model.mmdit import MMDiT, preset
from reward.score_checkpoint import main, wilson


def test_wilson_interval_closed_forms():
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_scores_a_checkpoint_per_task(tmp_path):
    ckpt = tmp_path / "ckpt"
    MMDiT(preset("toy", context_dim=384, pooled_dim=384)).save_pretrained(str(ckpt))
    out = main(["--checkpoint", str(ckpt), "--n", "12", "--steps", "2", "--output_dir", str(tmp_path / "s")])
    saved = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert saved["n"] == 12 and sum(r["n"] for r in saved["tasks"].values()) == 12
    assert out["overall"] == 0.0  # an untrained model draws nothing the scorer accepts
    assert (tmp_path / "s" / "scored_samples.png").exists()


def test_sample_cli_writes_a_grid_for_prompts(tmp_path):
    from PIL import Image

    from base_model.sample import main as sample_main
    ckpt = tmp_path / "ckpt"
    MMDiT(preset("toy", context_dim=384, pooled_dim=384)).save_pretrained(str(ckpt))
    sample_main(["--checkpoint", str(ckpt), "--prompts", "a red square", "a blue circle", "--steps", "2",
                 "--output_dir", str(tmp_path / "out")])
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == (2 * (32 * 4 + 2) + 2, 32 * 4 + 4)  # two 32-px tiles upscaled 4×, 2-px padding
