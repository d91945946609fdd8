"""The compositional scorer: exact on clean and noisy renders, and it rejects wrong ones."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from base_model.shapes import TASKS, Obj, Scene, WorldConfig, make_split, render
from reward.compositional import detect, judge, relative_position, score

WORLD = WorldConfig()
SCENES = make_split("val", 600, WORLD, task_weights={t: 1.0 for t in TASKS})
SIGMA = 38.0  # noise std in 0-255 units, i.e. 38/255 of the range


def noisy(image, rng):
    return np.clip(image + rng.normal(0.0, SIGMA, image.shape), 0, 255).astype(np.uint8)


def mirrored(scene):
    """The objects reflected across the image's centre line along the relation's axis."""
    axis = 0 if scene.relation in ("left of", "right of") else 1

    def flip(box):
        box = list(box)
        box[axis], box[axis + 2] = 1 - box[axis + 2], 1 - box[axis]
        return tuple(box)

    return tuple(dataclasses.replace(o, box=flip(o.box)) for o in scene.objects)


def swapped_colors(scene):
    a, b = scene.objects
    return (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))


def extra_object(scene):
    """One more copy of the counted object in the first free spot, or None when none is free."""
    s, reach = WORLD.object_size, WORLD.object_size + WORLD.gap
    taken = [(round(o.box[0] * WORLD.grid), round(o.box[1] * WORLD.grid)) for o in scene.objects]
    for y in range(WORLD.grid - s + 1):
        for x in range(WORLD.grid - s + 1):
            if all(abs(x - tx) >= reach or abs(y - ty) >= reach for tx, ty in taken):
                box = (x / WORLD.grid, y / WORLD.grid, (x + s) / WORLD.grid, (y + s) / WORLD.grid)
                return scene.objects + (dataclasses.replace(scene.objects[0], box=box),)
    return None


CORRUPTIONS = {  # task -> the wrong scene's objects
    "color_attr": swapped_colors,
    "position": mirrored,
    "two_object": lambda scene: scene.objects[:1],
    "counting": lambda scene: scene.objects[:-1],
}


@pytest.mark.parametrize("resolution", [32, 64])
def test_clean_renders_are_judged_correct(resolution):
    scenes = SCENES if resolution == 32 else SCENES[:120]
    result = score([render(s, resolution, WORLD) for s in scenes], scenes, WORLD)
    assert set(result["tasks"]) == set(TASKS)
    assert min(result["tasks"].values()) >= 0.99, result["tasks"]
    assert min(result["graded"]) == 1.0


def test_noisy_renders_are_judged_correct():
    rng = np.random.default_rng(0)
    result = score([noisy(render(s), rng) for s in SCENES], SCENES, WORLD)
    assert min(result["tasks"].values()) >= 0.99, result["tasks"]


def test_specks_of_palette_colour_are_noise_not_objects():
    """A collapsed policy's images: hundreds of tiny components (dropped by their box before any hole filling)."""
    rng = np.random.default_rng(1)
    refs = np.array([rgb for _, rgb in WORLD.colors], np.uint8)
    for scene in SCENES[:40]:
        clean = render(scene)
        far = ndimage.binary_dilation((clean != np.array(WORLD.background, np.uint8)).any(-1), iterations=2)
        speckled = clean.copy()
        spots = ~far & (rng.random(far.shape) < 0.3)
        speckled[spots] = refs[rng.integers(len(refs), size=int(spots.sum()))]
        assert detect(speckled) == detect(clean)


@pytest.mark.parametrize("task", sorted(CORRUPTIONS))
def test_corrupted_renders_are_rejected(task):
    rng = np.random.default_rng(1)
    scenes = [s for s in SCENES if s.task == task]
    assert len(scenes) >= 50
    for add_noise in (False, True):
        judgements = []
        for scene in scenes:
            wrong = render(dataclasses.replace(scene, objects=CORRUPTIONS[task](scene)))
            judgements.append(judge(noisy(wrong, rng) if add_noise else wrong, scene, WORLD))
        assert np.mean([not j.correct for j in judgements]) >= 0.99
        assert all(j.graded < 1.0 for j in judgements if not j.correct)
        assert all(j.reason != "ok" for j in judgements if not j.correct)


def test_an_extra_counted_object_is_rejected():
    scenes = [s for s in SCENES if s.task == "counting"]
    extended = [(s, extra_object(s)) for s in scenes]
    extended = [(s, objects) for s, objects in extended if objects is not None]
    assert len(extended) >= 20
    for scene, objects in extended:
        j = judge(render(dataclasses.replace(scene, objects=objects)), scene, WORLD)
        assert not j.correct and 0 < j.graded < 1 and "expected" in j.reason


def test_detect_reads_shape_colour_and_box():
    for scene in SCENES[:100]:
        detections = detect(render(scene, 64, WORLD), WORLD)
        got = sorted((d.color, d.shape, d.box) for d in detections)
        want = sorted((o.color, o.shape, tuple(round(v * 64) for v in o.box))
                      for o in scene.objects)
        assert got == want, scene.caption


def test_model_float_chw_images_are_judged_like_uint8():
    for scene in SCENES[:30]:
        image = render(scene)
        as_model_output = image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        assert judge(as_model_output, scene, WORLD) == judge(image, scene, WORLD)
    with pytest.raises(ValueError):
        detect(np.zeros((32, 32, 3), np.float32), WORLD)  # float HWC is ambiguous: refused


def test_relative_position_follows_geneval():
    left, right = (0, 10, 10, 20), (20, 10, 30, 20)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((10, 0, 20, 10), (10, 20, 20, 30)) == {"above"}
    # offsets within 0.1 of the summed sizes count as no relation
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()
    # diagonal: both relations once the offset clears the threshold
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}


def test_relation_reward_offset_agrees_with_relative_position():
    """benchmarks/relation_reward.py's offset toward the asked side: above 0.5 exactly where the relation holds."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "relation_reward.py")
    spec = importlib.util.spec_from_file_location("relation_reward", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    left, right = (0, 10, 10, 20), (20, 10, 30, 20)
    assert mod.toward(left, right, "left of") == pytest.approx(0.9)  # (20 − 0.1·(10 + 10)) / 20 along −x
    assert mod.toward(left, right, "right of") == pytest.approx(-0.9)
    assert mod.toward(left, right, "above") == 0.0
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = [tuple(np.sort(rng.uniform(0, 32, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]) for _ in range(2)]
        for relation in ("left of", "right of", "above", "below"):
            assert (mod.toward(a, b, relation) > 0.5) == (relation in relative_position(a, b))


def test_overall_is_the_mean_of_present_task_accuracies():
    square = Obj("square", "red", (0.0, 0.0, 0.375, 0.375))
    circle = Obj("circle", "blue", (0.5, 0.0, 0.875, 0.375))
    single = Scene(0, "single_object", "a red square", (square,))
    position = Scene(1, "position", "a red square left of a blue circle", (square, circle),
                     "left of")
    blank = np.full((32, 32, 3), 255, np.uint8)
    images = [render(single), blank, render(position)]
    result = score(images, [single, single, position], WORLD)
    assert result["tasks"] == {"single_object": 0.5, "position": 1.0}
    assert result["overall"] == pytest.approx(0.75)  # not 2/3, the mean over images
    assert result["correct"] == [True, False, True]
    assert result["graded"] == [1.0, 0.0, 1.0]


def test_the_strict_checker_accepts_renders_and_refuses_what_the_checker_lets_pass():
    from reward.compositional import strict_correct

    rng = np.random.default_rng(0)
    scenes = make_split("heldout_prompts", 300)
    noisy = [np.clip(render(s) + rng.normal(0, 38, (32, 32, 3)), 0, 255).astype(np.uint8) for s in scenes]
    assert all(strict_correct(render(s), s) for s in scenes)  # 300 clean renders, every task
    assert all(strict_correct(img, s) for img, s in zip(noisy, scenes))  # and noisy ones
    # an extra object passes GenEval's rule for two objects, not the strict one
    two = next(s for s in scenes if s.task == "two_object")
    single = dataclasses.replace(two, task="single_object", objects=two.objects[:1])
    assert judge(render(two), single).correct and not strict_correct(render(two), single)


def test_the_strict_reward_is_one_exactly_when_strictly_correct():
    import torch

    from reward.scorers import get_scorer

    scenes = make_split("heldout_prompts", 40)
    two = next(s for s in scenes if s.task == "two_object")
    single = dataclasses.replace(two, task="single_object", objects=two.objects[:1])
    images = [render(s) for s in scenes] + [render(two)]
    batch = torch.stack([torch.as_tensor(i).float().permute(2, 0, 1) / 127.5 - 1 for i in images])
    lenient = get_scorer("compositional")(batch, scenes + [single])
    strict = get_scorer("compositional_strict")(batch, scenes + [single])
    assert torch.equal(strict[:-1], torch.ones(40)) and torch.equal(lenient, torch.ones(41))
    assert 0 < strict[-1] < 1  # the extra object fails one strict check of several


def test_the_soft_reward_ranks_near_misses_by_hand():
    from reward.compositional import detect, soft_graded

    scenes = make_split("heldout_prompts", 300)
    assert all(soft_graded(render(s), s) == 1.0 for s in scenes)  # every clean render: fills at IDEAL_FILL
    scene = next(s for s in scenes if s.task == "single_object" and s.objects[0].shape == "square")
    image = render(scene)
    (square,) = detect(image)
    x0, y0, x1, y1 = square.box  # 12 × 12 px: cut a 6-pixel corner (3 + 2 + 1 rows) off each of the 4
    for ys, xs in [(range(y0, y0 + 3), range(x0, x0 + 3)), (range(y0, y0 + 3), range(x1 - 3, x1)),
                   (range(y1 - 3, y1), range(x0, x0 + 3)), (range(y1 - 3, y1), range(x1 - 3, x1))]:
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                dy = i if y < y0 + 3 else 2 - i
                dx = j if x < x0 + 3 else 2 - j
                if dx + dy < 3:
                    image[y, x] = WorldConfig().background
    (blob,) = detect(image)
    assert blob.fill == pytest.approx(120 / 144) and blob.shape == "circle"  # the checker fails both checks
    # graded 0; shape quality 1 − (1 − 120/144) / 0.2 = 1/6; soft = 0.5 · 0 + 0.5 · 1/6
    assert soft_graded(image, scene) == pytest.approx(1 / 12)
    blank = np.full_like(image, 255)
    assert soft_graded(blank, scene) == 0.0
