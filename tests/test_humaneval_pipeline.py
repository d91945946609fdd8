"""End to end on tiny models: `create` samples two checkpoints on the same prompts and seeds, votes
come in, `export` writes Pick-a-Pic-schema pairs (ties kept as 0.5/0.5), and `align.dpo` trains on
them directly."""

import io
import json
import os
import sqlite3

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from align import dpo
from align.dpo import DPOConfig
from align.pairs import load_pairs
from base_model.cli import parse
from base_model.mmdit import MMDiT, preset
from reward.humaneval import __main__ as cli
from reward.humaneval.app import create_app
from tests.conftest import randomize
from tests.test_humaneval_app import shown


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def tiny_checkpoint(path, seed):
    torch.manual_seed(seed)
    randomize(MMDiT(preset("toy", depth=1, hidden=32, heads=2)), std=0.05).save_pretrained(str(path))
    with open(path / "conditioning.json", "w") as f:
        json.dump({"text_encoders": ["minilm"], "image_space": "pixels", "resolution": 32}, f)
    return str(path)


def test_create_vote_export_and_train_dpo_on_the_votes(tmp_path, capsys):
    a, b = tiny_checkpoint(tmp_path / "a", 0), tiny_checkpoint(tmp_path / "b", 1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle left of a green square\n")
    db_path, images = str(tmp_path / "study.sqlite"), tmp_path / "images"
    cli.main(["create", "--model", f"base={a}", "--model", f"other={b}", "--prompts", str(prompts),
              "--n_per_prompt", "2", "--votes_per_item", "1", "--db", db_path, "--images", str(images),
              "--steps", "2", "--guidance", "1"])
    admin = capsys.readouterr().out.split("/admin/")[1].split("/")[0]
    with pytest.raises(SystemExit) as err:  # a study is created once
        cli.main(["create", "--model", f"base={a}", "--model", f"other={b}", "--prompts", str(prompts),
                  "--db", db_path, "--images", str(images)])
    assert err.value.code == 2 and "exists" in capsys.readouterr().err
    assert len(os.listdir(images)) == 8  # 2 prompts × 2 seeds × 2 models
    cli.main(["invite", "--db", db_path, "--n", "1", "--url", "http://127.0.0.1:8000"])
    token = capsys.readouterr().out.split("/s/")[1].split("/")[0]

    client = create_app(db_path).test_client()
    assert client.get(f"/admin/{admin}/").status_code == 200
    for n in range(4):  # prefer B on three items, tie on the last
        item, left, _ = shown(client.get(f"/s/{token}/"))
        with sqlite3.connect(db_path) as conn:
            left_is_a = conn.execute("SELECT image_a = ? FROM items WHERE id = ?", (left, item)).fetchone()[0]
        side = "tie" if n == 3 else "right" if left_is_a else "left"
        client.post(f"/s/{token}/vote", data={"item": item, "overall": side, "adherence": "tie", "quality": "tie"})

    out = str(tmp_path / "pairs")
    cli.main(["export", "--db", db_path, "--output", out])
    assert json.loads(capsys.readouterr().out) == {"items": 4, "question": "overall", "a_wins": 0, "b_wins": 3,
                                                   "ties": 1}
    ds = datasets.load_from_disk(out)
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1"} <= set(ds.column_names)
    assert sorted(ds["label_1"]) == [0.5, 1.0, 1.0, 1.0] and ds["model_0"] == [a] * 4 and ds["model_1"] == [b] * 4
    assert ds["seed"] == [0, 1, 2, 3] and ds["caption"][:2] == ["a red square"] * 2
    first = ds[0]  # jpg_0 is model A's image, drawn from the item's seed: it differs from B's
    img_a, img_b = (np.asarray(Image.open(io.BytesIO(first[c]))) for c in ("jpg_0", "jpg_1"))
    assert img_a.shape == (32, 32, 3) and not np.array_equal(img_a, img_b)
    pairs = load_pairs(out, 32)
    assert len(pairs) == 3 and pairs.dropped["tie"] == 1

    cfg = parse(DPOConfig, ["--base", a, "--pairs", out, "--output_dir", str(tmp_path / "dpo"), "--max_steps", "2",
                            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--eval_steps", "1000",
                            "--num_samples", "1", "--sample_steps", "2", "--report_to", "none", "--lora_r", "4",
                            "--lora_alpha", "4"])
    dpo.main(cfg)
    assert os.path.isfile(tmp_path / "dpo" / "final" / "adapter_model.safetensors")

