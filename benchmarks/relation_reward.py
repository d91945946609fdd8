"""A reward that ranks wrong relations by how far they miss: a test of whether the toy base can learn "left of".

    PYTHONPATH=benchmarks python -m align.online --config configs/online/toy.yaml --prompts position.txt \
        --reward py:relation_reward:score …

Position prompts only differ from the compositional score: an image with both objects right but the relation
wrong scores 0.5 to 0.9 by how far the first object sits toward the asked side of the second (the same shrunk,
normalised centre offset that `reward.compositional.relative_position` thresholds at 0.5); a missing or wrong
object scores half the share of object checks that hold; a correct image 1. Every other task: the compositional
score. Used in `benchmarks/README.md`, "Position prompts"; not one of `reward.scorers`.
"""

import torch

from reward import compositional


def toward(box_a, box_b, relation: str) -> float:
    """A's offset from B along the asked direction (`compositional.relation_components`), in [-1, 1] (> 0.5: it holds)."""
    dx, dy = compositional.relation_components(box_a, box_b)
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def graded(image, scene) -> float:
    detections = compositional.detect(image)
    results = compositional.checks(scene, detections)
    held = [ok for _, ok in results]
    if scene.task != "position" or all(held):
        return sum(held) / len(held)  # the compositional score (1 when correct)
    objects = sum(held[:-1]) / (len(held) - 1)
    if objects < 1:
        return 0.5 * objects
    a, b = compositional.first_matches(scene, detections)
    return 0.5 + 0.8 * min(max((toward(a.box, b.box, scene.relation) + 1) / 3, 0.0), 0.5)


def score(images, prompts) -> torch.Tensor:
    scenes = [compositional.scene_from_caption(p) if isinstance(p, str) else p for p in prompts]
    return torch.tensor([graded(i, s) for i, s in zip(images, scenes, strict=True)], dtype=torch.float32)
