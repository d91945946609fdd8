"""A reward that ranks wrong relations by how far they miss: a test of whether the toy base can learn "left of".

    PYTHONPATH=benchmarks python -m align.online --config configs/online/toy.yaml --prompts position.txt \
        --reward py:relation_reward:score …

Position prompts only differ from the compositional score: an image with both objects right but the relation
wrong scores 0.5 to 0.9 by how far the first object sits toward the asked side of the second (the same shrunk,
normalised centre offset that `reward.compositional.relative_position` thresholds at 0.5); a missing or wrong
object scores half the share of object checks that hold; a correct image 1. Every other task: the compositional
score. Used in `benchmarks/README.md`, "Position prompts"; not one of `reward.scorers`.
"""

import numpy as np
import torch

from reward import compositional


def toward(box_a, box_b, relation: str) -> float:
    """The component of A's shrunk centre offset from B along the asked direction, in [-1, 1] (> 0.5: it holds)."""
    boxes = np.array([box_a, box_b], np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    norm = np.linalg.norm(offset)
    if norm < 1e-6:
        return 0.0
    revised = np.maximum(np.abs(offset) - compositional.POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    dx, dy = revised / norm
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def graded(image, scene) -> float:
    j = compositional.judge(image, scene)
    if scene.task != "position":
        return j.graded
    if j.correct:
        return 1.0
    results = compositional.checks(scene, list(j.detections))
    objects = sum(ok for _, ok in results[:-1]) / (len(results) - 1)
    if objects < 1:
        return 0.5 * objects
    a, b = [next(d for d in j.detections if d.shape == shape and d.color == color)
            for color, shape, _ in compositional.requested(scene)]
    return 0.5 + 0.8 * min(max((toward(a.box, b.box, scene.relation) + 1) / 3, 0.0), 0.5)


def score(images, prompts) -> torch.Tensor:
    scenes = [compositional.scene_from_caption(p) if isinstance(p, str) else p for p in prompts]
    return torch.tensor([graded(i, s) for i, s in zip(images, scenes, strict=True)], dtype=torch.float32)
