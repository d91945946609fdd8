"""Invariants of the shapes world: determinism, disjoint splits, layouts, captions, rendering."""

import re

import numpy as np
import pytest
from PIL import Image

from base_model.shapes import (RELATIONS, SPLIT_STRIDE, TASKS, WorldConfig, make_split, render,
                               requested, sample_scene, save_grid, shape_mask)

WORLD = WorldConfig()
TRAIN = make_split("train", 1500, WORLD)


def test_same_seed_same_scene_and_pixels():
    for seed in (0, 7, 123_456):
        a, b = sample_scene(seed, WORLD), sample_scene(seed, WORLD)
        assert a == b
        assert np.array_equal(render(a), render(b))
    captions = {sample_scene(seed, WORLD).caption for seed in range(50)}
    assert len(captions) > 20  # different seeds really give different scenes


def test_splits_are_disjoint_by_seed():
    names = ("train", "val", "heldout_prompts", "heldout_combos")
    seeds = {name: {s.seed for s in make_split(name, 300, WORLD)} for name in names}
    for i, a in enumerate(names):
        assert len(seeds[a]) == 300
        for b in names[i + 1:]:
            assert not seeds[a] & seeds[b], (a, b)
    with pytest.raises(ValueError):
        make_split("train", SPLIT_STRIDE + 1, WORLD)
    with pytest.raises(ValueError):
        make_split("test", 1, WORLD)


def test_heldout_combos_never_in_train_or_val_and_always_in_their_split():
    held = set(WORLD.heldout_combos)
    for scene in TRAIN + make_split("val", 500, WORLD) + make_split("heldout_prompts", 300, WORLD):
        assert not {(o.color, o.shape) for o in scene.objects} & held, scene.caption
    for scene in make_split("heldout_combos", 300, WORLD):
        assert {(o.color, o.shape) for o in scene.objects} & held, scene.caption


def test_every_task_count_and_relation_is_produced():
    assert {s.task for s in TRAIN} == set(TASKS)
    counts = {len(s.objects) for s in TRAIN if s.task == "counting"}
    assert counts == set(range(2, WORLD.max_count + 1))
    assert {s.relation for s in TRAIN if s.task == "position"} == set(RELATIONS)
    # the default weights favour the multi-object tasks
    share = {t: sum(s.task == t for s in TRAIN) / len(TRAIN) for t in TASKS}
    assert share["color_attr"] > share["single_object"] and share["position"] > share["colors"]


def test_objects_inside_image_and_apart():
    g, reach = WORLD.grid, (WORLD.object_size + WORLD.gap) / WORLD.grid
    for scene in TRAIN:
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert round((x1 - x0) * g) == WORLD.object_size == round((y1 - y0) * g)
            for b in scene.objects[i + 1:]:
                assert abs(a.box[0] - b.box[0]) >= reach or abs(a.box[1] - b.box[1]) >= reach


def test_render_draws_each_object_whole_and_nothing_else():
    # no overlap means the object pixels are exactly the sum of the shape masks
    for resolution in (32, 64):
        for scene in TRAIN[:200]:
            image = render(scene, resolution, WORLD)
            assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
            drawn = (image != WORLD.background).any(-1).sum()
            side = WORLD.object_size * resolution // WORLD.grid
            assert drawn == sum(shape_mask(o.shape, side, side).sum() for o in scene.objects)
            for obj in scene.objects:  # every box holds its own colour, at its mask's pixels
                x0, y0, x1, y1 = (round(v * resolution) for v in obj.box)
                mask = shape_mask(obj.shape, side, side)
                assert (image[y0:y1, x0:x1][mask] == WORLD.palette[obj.color]).all()


def test_shape_masks_fill_their_box_as_the_scorer_expects():
    for side in (12, 24, 96):
        assert shape_mask("square", side, side).mean() == 1.0
        assert abs(shape_mask("circle", side, side).mean() - np.pi / 4) < 0.02
        assert 0.49 < shape_mask("triangle", side, side).mean() < 0.6
        for shape in ("circle", "triangle"):  # every shape reaches all four sides of its box
            mask = shape_mask(shape, side, side)
            assert mask.any(0).all() and mask.any(1).all()


PATTERNS = {
    "single_object": r"a (\w+) (\w+)",
    "colors": r"a photo of a (\w+) (\w+)",
    "two_object": r"a (\w+) (\w+) and a (\w+) (\w+)",
    "color_attr": r"a (\w+) (\w+) and a (\w+) (\w+)",
    "position": r"a (\w+) (\w+) (?:left of|right of|above|below) a (\w+) (\w+)",
    "counting": r"(?:two|three|four) (\w+) (\w+)s",
}


def test_captions_match_scenes():
    numbers = {"two": 2, "three": 3, "four": 4}
    for scene in TRAIN:
        words = re.fullmatch(PATTERNS[scene.task], scene.caption)
        assert words, scene.caption
        named = list(zip(words.groups()[::2], words.groups()[1::2]))  # (colour, shape) pairs
        if scene.task == "counting":
            assert len(scene.objects) == numbers[scene.caption.split()[0]]
            assert {(o.color, o.shape) for o in scene.objects} == set(named)
        else:
            assert [(o.color, o.shape) for o in scene.objects] == named
        if scene.task == "position":
            assert f" {scene.relation} " in scene.caption
        if scene.task in ("two_object", "position", "color_attr"):
            assert scene.objects[0].shape != scene.objects[1].shape
        if scene.task == "color_attr":
            assert scene.objects[0].color != scene.objects[1].color
        assert sum(n for _, _, n in requested(scene)) == len(scene.objects)


def test_save_grid_writes_a_png_of_the_tiles(tmp_path):
    images = [render(s) for s in TRAIN[:10]]
    path = tmp_path / "grid.png"
    save_grid(images, str(path), nrow=4, scale=2, pad=1)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (3 * 65 + 1, 4 * 65 + 1, 3)
    assert np.array_equal(grid[1:65, 1:65], images[0].repeat(2, 0).repeat(2, 1))
    # float (3, H, W) images in [-1, 1], the model's convention, land on the same pixels
    floats = [im.transpose(2, 0, 1) / 127.5 - 1 for im in images]
    save_grid(floats, str(tmp_path / "floats.png"), nrow=4, scale=2, pad=1)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "floats.png").convert("RGB")), grid)


def test_to_uint8_reads_torch_uint8_as_pixels_and_floats_as_model_space():
    import torch

    from base_model.shapes import to_uint8

    image = render(make_split("val", 1)[0])  # (32, 32, 3) uint8
    assert np.array_equal(to_uint8(torch.from_numpy(image)), image)  # a uint8 tensor is pixels, not [-1, 1]
    floats = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    assert np.array_equal(to_uint8(floats), image)
    with pytest.raises(ValueError, match=r"uint8 images must be \(H, W, 3\)"):
        to_uint8(torch.from_numpy(image).permute(2, 0, 1))  # a CHW uint8 tensor is refused, not misread
