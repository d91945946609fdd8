"""Scorers by name: each is `score(images, prompts) -> Tensor (N,)`, higher is better.

`images` are float (N, 3, H, W) in [-1, 1]; `prompts` are captions (or shapes-world scenes,
which carry their layout). A spec is "NAME" or "NAME:PATH" (a local model folder):

    compositional          the shapes world's reference scorer (graded; 1.0 exactly when correct)
    compositional_strict   graded over the stricter checks of the reward-hacking audit (no extra
                           objects, unambiguous shapes, clear positions; 1.0 exactly when strictly correct)
    compositional_soft     the graded score averaged with how close each requested object's fill is to
                           its clean render's (`compositional.shape_quality`): dense for near misses
    constant               0 for every image: no preference (the control of a run whose other loss terms
                           move it, e.g. align.online --ptx_weight)
    other NAME[:PATH]      module `reward.NAME` with `load(path) -> score(images, prompts)`
    py:MODULE:FUNCTION     your own `score(images, prompts)` function, imported by name

The compositional score is the graded fraction of the prompt's attributes satisfied.
"""

from __future__ import annotations

import importlib

import torch

from base_model.errors import InputError

from . import compositional

# name → module of reward/ exposing `load(path: str | None) -> scorer`
MODULES = {
    "clipscore": "reward.clipscore", "pickscore": "reward.pickscore", "hpsv2": "reward.hpsv2",
    "imagereward": "reward.imagereward", "aesthetic": "reward.aesthetic",
    "imagetext": "reward.imagetext", "preference": "reward.preference",
}


def compositional_score(images, prompts) -> torch.Tensor:
    return torch.tensor(compositional.score(list(images), list(prompts))["graded"], dtype=torch.float32)


def per_scene(graded):
    """A scorer from a per-image `graded(image, scene) -> float` of `reward.compositional`."""
    def score(images, prompts) -> torch.Tensor:
        scenes = [compositional.scene_from_caption(p) if isinstance(p, str) else p for p in prompts]
        return torch.tensor([graded(i, s) for i, s in zip(images, scenes, strict=True)], dtype=torch.float32)
    return score


def constant_score(images, prompts) -> torch.Tensor:
    """No preference at all: every image scores 0. A control: a method trained on it learns only from its
    other terms (align.online's `--ptx_weight`)."""
    return torch.zeros(len(images))


SCORERS = {"constant": constant_score, "compositional": compositional_score,
           "compositional_strict": per_scene(compositional.strict_graded),
           "compositional_soft": per_scene(compositional.soft_graded)}


def get_scorer(spec: str):
    if spec.startswith("py:"):
        module, _, attr = spec[3:].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"reward {spec!r}: cannot import {attr!r} from {module!r} ({e})") from e
    name, _, path = spec.partition(":")
    if name in SCORERS:
        return SCORERS[name]
    if name not in MODULES:
        raise InputError(f"unknown reward {name!r}; choose from {sorted(SCORERS) + sorted(MODULES)}")
    return importlib.import_module(MODULES[name]).load(path or None)
