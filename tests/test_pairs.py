"""Preference pairs: Pick-a-Pic loading (ties, swapped labels, flags, corrupt bytes, missing
columns, mixed sizes), the pair rule, and caption parsing for the compositional reward."""

import numpy as np
import pytest
import torch

from align.pairs import choose_pairs, encode_png, load_pairs, pairs_dataset
from base_model.shapes import make_split, render, scene_from_caption
from reward.compositional import score


def solid(color, size=32):
    return encode_png(np.full((size, size, 3), color, dtype=np.uint8))


def row(i, label_0=1.0, **kw):
    return {"caption": f"prompt {i}", "jpg_0": solid((200, 0, 0)), "jpg_1": solid((0, 0, 200)),
            "label_0": label_0, "label_1": 1.0 - label_0, **kw}


def write_parquet(rows, path):
    pairs_dataset(rows).to_parquet(str(path))
    return str(path)


def test_winner_first_ties_and_flags_dropped_and_counted(tmp_path):
    rows = [row(0), row(1, label_0=0.0), row(2, label_0=0.5), row(3, has_label=False),
            row(4, are_different=False)] + [row(5 + i) for i in range(5)]
    pairs = load_pairs(write_parquet(rows, tmp_path / "p.parquet"), 32)
    assert pairs.dropped == {"tie": 1, "no_label": 1, "not_different": 1, "bad": 0}
    assert len(pairs) == 7 and pairs.captions[:2] == ["prompt 0", "prompt 1"]
    assert pairs.chosen.shape == (7, 3, 32, 32) and pairs.chosen.dtype == torch.uint8
    assert pairs.chosen[0, 0, 0, 0] == 200 and pairs.rejected[0, 2, 0, 0] == 200  # label_0 = 1: red wins
    assert pairs.chosen[1, 2, 0, 0] == 200 and pairs.rejected[1, 0, 0, 0] == 200  # label_0 = 0: blue wins


def test_mixed_sizes_are_resized(tmp_path):
    rows = [row(0), {**row(1), "jpg_0": solid((200, 0, 0), 64), "jpg_1": solid((0, 0, 200), 48)}]
    pairs = load_pairs(write_parquet(rows, tmp_path / "p.parquet"), 16)
    assert pairs.chosen.shape == pairs.rejected.shape == (2, 3, 16, 16)


def test_save_to_disk_folder_loads(tmp_path):
    pairs_dataset([row(0), row(1)]).save_to_disk(str(tmp_path / "d"))
    assert len(load_pairs(str(tmp_path / "d"), 32)) == 2


def test_corrupt_image_skipped_and_counted_below_one_percent(tmp_path):
    rows = [row(i) for i in range(200)]
    rows[7]["jpg_1"] = b"not an image"
    pairs = load_pairs(write_parquet(rows, tmp_path / "p.parquet"), 32)
    assert len(pairs) == 199 and pairs.dropped["bad"] == 1


def test_too_many_corrupt_images_stop_naming_row_and_column(tmp_path):
    rows = [row(i) for i in range(20)]
    rows[3]["jpg_0"] = b"garbage"
    with pytest.raises(ValueError, match="row 3, column jpg_0"):
        load_pairs(write_parquet(rows, tmp_path / "p.parquet"), 32)


def test_missing_column_is_named(tmp_path):
    ds = pairs_dataset([row(0)]).remove_columns(["label_1"])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="label_1"):
        load_pairs(str(tmp_path / "p.parquet"), 32)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pairs(str(tmp_path / "nowhere"), 32)


def test_threshold_rule_pairs_correct_with_incorrect():
    scores = torch.tensor([1.0, 0.5, 1.0, 0.0, 0.75, 1.0])
    pairs = choose_pairs(scores, "threshold", threshold=1.0, max_pairs=2)
    assert pairs == [(0, 3), (2, 1)]  # best winners with the worst losers, each image once
    assert choose_pairs(torch.ones(4), "threshold") == []  # all correct: nothing to prefer
    assert choose_pairs(scores, "best_worst", margin=0.5) == [(0, 3)]
    assert choose_pairs(torch.tensor([0.6, 0.5]), "best_worst", margin=0.5) == []


def test_captions_parse_back_to_what_they_ask():
    scenes = make_split("heldout_prompts", 300)
    images = [render(s) for s in scenes]
    by_scene, by_caption = score(images, scenes), score(images, [s.caption for s in scenes])
    assert by_caption["correct"] == by_scene["correct"] and all(by_caption["correct"])
    wrong = [render(s) for s in make_split("train", 300)]  # other scenes' images
    assert score(wrong, [s.caption for s in scenes])["correct"] == score(wrong, scenes)["correct"]
    for s in scenes:
        parsed = scene_from_caption(s.caption)
        assert parsed.relation == s.relation
        assert [(o.color, o.shape) for o in parsed.objects] == [(o.color, o.shape) for o in s.objects]
    with pytest.raises(ValueError, match="template"):
        scene_from_caption("a purple elephant riding a bike")


def test_reward_never_imports_align():
    """The Pick-a-Pic reader and writer live in base_model/: reward/ needs nothing from align/."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "reward"
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not [n for n in names if n == "align" or n.startswith("align.")], f"{file} imports {names}"
