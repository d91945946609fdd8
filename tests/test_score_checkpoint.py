import json

from base_model.mmdit import MMDiT, preset
from base_model.shapes import make_split
from reward.score_checkpoint import main


def test_scores_a_checkpoint_per_task_through_reward_eval(tmp_path, capsys):
    """A shorthand for reward.eval: one image per scene, with the scene's own seed, judged per task."""
    ckpt = tmp_path / "ckpt"
    MMDiT(preset("toy", context_dim=384, pooled_dim=384)).save_pretrained(str(ckpt))
    out = main(["--checkpoint", str(ckpt), "--n", "12", "--steps", "2", "--output_dir", str(tmp_path / "s")])
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    m = saved["models"]["checkpoint"]
    assert m["accuracy"]["n"] == 12 and sum(r["n"] for r in m["tasks"].values()) == 12
    assert out["models"]["checkpoint"]["geneval_overall"] == 0.0  # an untrained model draws nothing the scorer accepts
    assert [s.seed for s in make_split("heldout_prompts", 12)] == [saved["config"]["seed"] + i for i in range(12)]
    assert (tmp_path / "s" / "report.html").exists()
    assert "| **overall** (mean of tasks) | 0.0% | | 12 |" in capsys.readouterr().out


def test_sample_cli_writes_a_grid_for_prompts(tmp_path):
    from PIL import Image

    from base_model.sample import main as sample_main
    ckpt = tmp_path / "ckpt"
    MMDiT(preset("toy", context_dim=384, pooled_dim=384)).save_pretrained(str(ckpt))
    sample_main(["--checkpoint", str(ckpt), "--prompts", "a red square", "a blue circle", "--steps", "2",
                 "--output_dir", str(tmp_path / "out")])
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == (2 * (32 * 4 + 2) + 2, 32 * 4 + 4)  # two 32-px tiles upscaled 4×, 2-px padding
