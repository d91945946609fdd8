"""Compositional scorer: does an image show what its shapes-world caption asks for?

GenEval (Ghosh et al., 2023) judges text-to-image models by detecting objects and checking six
kinds of prompt. The shapes world needs no learned detector: objects are flat palette colours on
a plain background, so we segment by nearest colour, take connected components, and read each
component's shape from how much of its bounding box it fills. The per-task rules follow GenEval's
`evaluate_images.py`; the largest component stands in for the detector's most confident box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from base_model.shapes import TASKS, Scene, WorldConfig, requested, scene_from_caption, to_uint8

MAX_COLOR_DIST = 120.0  # RGB distance (0-255) past which a pixel is no palette colour: background
MIN_AREA_FRAC = 0.25  # components under this fraction of an object's box area are noise
# Fill of the bounding box: square 1.0, circle ~0.78, triangle ~0.51-0.58 (up to 0.65 when
# noise eats the two-pixel apex rows at 32 px); cut about halfway between them.
SQUARE_MIN_FILL = 0.9
CIRCLE_MIN_FILL = 0.7
POSITION_THRESHOLD = 0.1  # GenEval's: box sizes that a centre offset must exceed


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1 y1 exclusive
    area: int  # pixels, holes filled
    fill: float  # area / box area: the shape cue

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class Judgement:
    task: str
    correct: bool  # GenEval's binary verdict
    graded: float  # fraction of the prompt's checks passed, in [0, 1], for ranking samples
    reason: str  # the failed checks, "; "-joined, or "ok"
    detections: tuple[Detection, ...]


def classify_pixels(image: np.ndarray, world: WorldConfig) -> np.ndarray:
    """(H, W) index into `world.colors` of each pixel's nearest colour; -1 where the background
    is nearer or no palette colour is within MAX_COLOR_DIST."""
    refs = np.array([rgb for _, rgb in world.colors] + [world.background], np.float32)
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - refs, axis=-1)  # (H, W, K+1)
    nearest = dist.argmin(-1)
    is_object = (nearest < len(world.colors)) & (dist.min(-1) <= MAX_COLOR_DIST)
    return np.where(is_object, nearest, -1)


def shape_from_fill(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def detect(image, world: WorldConfig = WorldConfig()) -> list[Detection]:
    """Objects in `image` (any format `to_uint8` reads), largest first."""
    image = to_uint8(image)
    labels = classify_pixels(image, world)
    side = world.object_size * image.shape[0] / world.grid  # expected object side in pixels
    detections = []
    for k, (color, _) in enumerate(world.colors):
        components, _ = ndimage.label(labels == k)  # default structure: 4-connectivity
        for i, (ys, xs) in enumerate(ndimage.find_objects(components), start=1):
            if (ys.stop - ys.start) * (xs.stop - xs.start) < MIN_AREA_FRAC * side**2:
                continue  # its area, holes filled, is at most its box's: noise (the test below, without the fill)
            # fill holes so noise inside an object does not lower its fill and change its shape
            mask = ndimage.binary_fill_holes(components[ys, xs] == i)
            area = int(mask.sum())
            if area < MIN_AREA_FRAC * side**2:
                continue
            fill = area / mask.size
            box = (xs.start, ys.start, xs.stop, ys.stop)
            detections.append(Detection(shape_from_fill(fill), color, box, area, fill))
    return sorted(detections, key=lambda d: -d.area)


def relation_components(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> tuple[float, float]:
    """GenEval's (dx, dy) of A relative to B (evaluation/evaluate_images.py): the centre offset shrunk by
    `threshold` times the summed box sizes, per axis, and normalised by the raw offset's length; (0, 0) when
    the shrunk offset vanishes. Image y grows downward."""
    boxes = np.array([box_a, box_b], np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return 0.0, 0.0
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B, as GenEval's `relative_position`: A is "left of" B when `relation_components`'
    dx < -0.5, "right of" when dx > 0.5, and "above"/"below" likewise with dy."""
    dx, dy = relation_components(box_a, box_b, threshold)
    rules = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in rules.items() if holds}


def first_matches(scene: Scene, detections: list[Detection]) -> list[Detection | None]:
    """Per requested object, the first detection of its colour and shape (None when there is none): the
    objects a position prompt's relation is judged between."""
    return [next((d for d in detections if d.shape == shape and d.color == color), None)
            for color, shape, _ in requested(scene)]


def checks(scene: Scene, detections: list[Detection]) -> list[tuple[str, bool]]:
    """The prompt's attributes as (failure message, satisfied), in caption order. Per object:
    its shape is there, its colour is right, and for counting its exact count; for position,
    finally, the relation. An image is correct when all hold, which is GenEval's rule per task:

    single_object, two_object: each requested colour+shape present (extra objects are fine);
    colors: the largest object of the shape (GenEval: the most confident) has the colour;
    counting: exactly N of the requested colour+shape; color_attr: both bindings present;
    position: both present and the largest of A is `relation` the largest of B.
    """
    results = []
    for color, shape, count in requested(scene):
        of_shape = [d for d in detections if d.shape == shape]
        matches = [d for d in of_shape if d.color == color]
        results.append((f"no {shape}", bool(of_shape)))
        if scene.task == "colors":
            seen = of_shape[0].color if of_shape else "absent"
            results.append((f"{shape} is {seen}, expected {color}", seen == color))
        else:
            results.append((f"no {color} {shape}", bool(matches)))
        if scene.task == "counting":
            found = len(matches)
            results.append((f"{found} {color} {shape}s, expected {count}", found == count))
    if scene.task == "position":
        a, b = first_matches(scene, detections)
        holds = None not in (a, b) and scene.relation in relative_position(a.box, b.box)
        results.append((f"not {scene.relation}", holds))
    return results


def judge(image, scene: Scene, world: WorldConfig = WorldConfig()) -> Judgement:
    detections = detect(image, world)
    results = checks(scene, detections)
    failed = [message for message, ok in results if not ok]
    graded = sum(ok for _, ok in results) / len(results)
    return Judgement(scene.task, not failed, graded, "; ".join(failed) or "ok", tuple(detections))


STRICT_POSITION_THRESHOLD = 0.2  # twice GenEval's margin
STRICT_FILL_MARGIN = 0.05  # a shape read from a fill this close to a cut is ambiguous


def strict_checks(scene: Scene, detections: list[Detection]) -> list[tuple[str, bool]]:
    """A stricter variant of `checks`, for the reward-hacking audit of models trained on the checker:
    everything `checks` asks, and the image holds exactly the requested objects (no extra ones), every
    object's shape is unambiguous (its fill is not within STRICT_FILL_MARGIN of a cut between shapes),
    and a position holds with twice GenEval's margin."""
    results = checks(scene, detections)
    wanted = sum(count for _, _, count in requested(scene))
    results.append((f"{len(detections)} objects, expected {wanted}", len(detections) == wanted))
    cuts = (SQUARE_MIN_FILL, CIRCLE_MIN_FILL)
    results.append(("an ambiguous shape", all(min(abs(d.fill - c) for c in cuts) > STRICT_FILL_MARGIN
                                              for d in detections)))
    if scene.task == "position":
        firsts = first_matches(scene, detections)
        holds = None not in firsts and scene.relation in relative_position(firsts[0].box, firsts[1].box,
                                                                           STRICT_POSITION_THRESHOLD)
        results.append((f"not clearly {scene.relation}", holds))
    return results


def strict_graded(image, scene: Scene, world: WorldConfig = WorldConfig()) -> float:
    """The share of `strict_checks` an image passes: 1.0 exactly when it is strictly correct."""
    results = strict_checks(scene, detect(image, world))
    return sum(ok for _, ok in results) / len(results)


def strict_correct(image, scene: Scene, world: WorldConfig = WorldConfig()) -> bool:
    return strict_graded(image, scene, world) == 1.0


# The fill of each shape's clean 12-px render (pixels / box; checked on renders in
# tests/test_compositional.py) and the distance from it at which a detection's shape quality falls
# to 0: about the gap between two shapes' fills.
IDEAL_FILL = {"square": 1.0, "circle": 112 / 144, "triangle": 84 / 144}
FILL_SCALE = 0.2


def shape_quality(scene: Scene, detections: list[Detection]) -> float:
    """How cleanly the requested objects are drawn, in [0, 1]: for each requested colour+shape, the
    closeness max(0, 1 − |fill − IDEAL_FILL[shape]| / FILL_SCALE) of the `count` detections of that
    colour closest to the shape (0 for each one missing), averaged. Dense where `checks` is a step: a
    square drawn with blurred corners (fill 0.85, read as a circle) scores 0.25, a crisp one 1."""
    scores = []
    for color, shape, count in requested(scene):
        closeness = sorted((max(0.0, 1 - abs(d.fill - IDEAL_FILL[shape]) / FILL_SCALE)
                            for d in detections if d.color == color), reverse=True)[:count]
        scores += closeness + [0.0] * (count - len(closeness))
    return float(np.mean(scores))


def soft_graded(image, scene: Scene, world: WorldConfig = WorldConfig()) -> float:
    """The mean of `judge`'s graded score and `shape_quality`: a reward that also ranks near misses
    (1.0 exactly when correct with every requested object drawn at its render's fill)."""
    j = judge(image, scene, world)
    return 0.5 * j.graded + 0.5 * shape_quality(scene, list(j.detections))


def task_accuracies(correct, tasks) -> dict[str, float]:
    """Accuracy per task present (TASKS' order first, then any other name as it first appears), from per-image
    verdicts; their unweighted mean is GenEval's overall."""
    correct, tasks = np.asarray(correct, dtype=float), np.asarray(tasks)
    present = dict.fromkeys(tasks.tolist())
    order = [t for t in TASKS if t in present] + [t for t in present if t not in TASKS]
    return {t: float(correct[tasks == t].mean()) for t in order}


def score(images, scenes: list[Scene | str], world: WorldConfig = WorldConfig()) -> dict:
    """GenEval-style summary: {"tasks": accuracy per task, "overall", "correct", "graded"}.
    A scene may be given as its caption (parsed by `scene_from_caption`).

    `overall` is the unweighted mean of the task accuracies, as GenEval's overall score; tasks
    with no image in the batch are left out of the mean rather than counted as zero.
    """
    scenes = [scene_from_caption(s) if isinstance(s, str) else s for s in scenes]
    judgements = [judge(image, scene, world) for image, scene in zip(images, scenes, strict=True)]
    tasks = task_accuracies([j.correct for j in judgements], [j.task for j in judgements])
    return {
        "tasks": tasks,
        "overall": float(np.mean(list(tasks.values()))) if tasks else float("nan"),
        "correct": [j.correct for j in judgements],
        "graded": [j.graded for j in judgements],
    }
