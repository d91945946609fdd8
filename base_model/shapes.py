"""The shapes world: tiny captioned scenes of coloured shapes, rendered from an integer seed.

A scene is 1-4 flat-coloured squares, circles or triangles on a white background, with a caption
drawn from GenEval's six task types. The world is kept deliberately small (4 colours, 3 shapes,
one object size, no overlap) because a prototype showed a tiny model learns such a world on two
CPU cores in minutes, and one with many colours and sizes far worse. Hard edges (no
anti-aliasing) let `reward.compositional` check renders exactly.

Everything is a pure function of `(seed, WorldConfig)`: `numpy.random.default_rng(seed)` drives
every choice, so one seed always gives the same scene, caption and pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Multi-object tasks weigh double: base models fail them most, so DPO has the most room there.
TASK_WEIGHTS = {
    "single_object": 1.0, "two_object": 2.0, "counting": 1.0,
    "colors": 1.0, "position": 2.0, "color_attr": 2.0,
}
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}  # GenEval's counting prompts ask for 2-4

# Seed scheme: split `name` uses seeds SPLIT_OFFSETS[name] + i for 0 <= i < SPLIT_STRIDE, so no
# two splits share a seed. `heldout_combos` also draws one object per scene from the held-out
# (colour, shape) pairs, which every other split excludes.
SPLIT_STRIDE = 10_000_000
SPLIT_OFFSETS = {"train": 0, "val": SPLIT_STRIDE, "heldout_prompts": 2 * SPLIT_STRIDE,
                 "heldout_combos": 3 * SPLIT_STRIDE}


@dataclass(frozen=True)
class WorldConfig:
    # name -> RGB; pairwise at least ~195 apart (and from the background), so the scorer's
    # nearest-colour segmentation survives Gaussian noise of sigma 38/255
    colors: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 20, 20)), ("green", (20, 160, 20)),
        ("blue", (20, 40, 220)), ("yellow", (245, 215, 0)))
    shapes: tuple[str, ...] = ("square", "circle", "triangle")  # a subset of `shape_mask`'s
    background: tuple[int, int, int] = (255, 255, 255)
    grid: int = 32  # layout resolution: boxes sit on whole pixels here and on any multiple of it
    object_size: int = 12  # side of every object's box, in grid pixels
    # empty pixels kept between boxes: 4 objects of 12 still fit in a 2x2 arrangement at 32
    # (12 + 2 + 12 <= 32), so counting up to 4 needs no smaller objects
    gap: int = 2
    max_count: int = 4  # counting prompts ask for 2..max_count objects
    # corners snap to multiples of this many grid pixels: 4 is the toy model's patch, so every
    # object is exactly 3×3 patches and looks the same wherever it is (a measured lever for tiny models)
    snap: int = 4
    heldout_combos: tuple[tuple[str, str], ...] = (("green", "circle"), ("yellow", "triangle"))

    def __post_init__(self):
        names = [name for name, _ in self.colors]
        if unknown := set(self.shapes) - {"square", "circle", "triangle"}:
            raise ValueError(f"cannot draw shapes {unknown}")
        if any(c not in names or s not in self.shapes for c, s in self.heldout_combos):
            raise ValueError(f"held-out combos {self.heldout_combos} are not in the world")
        side = math.ceil(math.sqrt(self.max_count))
        step = math.ceil((self.object_size + self.gap) / self.snap) * self.snap  # snapped pitch
        if (side - 1) * step + self.object_size > self.grid:
            raise ValueError(f"{self.max_count} objects of {self.object_size} px do not fit")

    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        return dict(self.colors)

    @property
    def combos(self) -> list[tuple[str, str]]:
        """Every (colour, shape) pair the train/val samplers may draw."""
        return [(c, s) for c, _ in self.colors for s in self.shapes
                if (c, s) not in self.heldout_combos]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    # (x0, y0, x1, y1) as fractions of the image side, x1 and y1 exclusive
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    seed: int
    task: str  # one of TASKS
    caption: str
    objects: tuple[Obj, ...]  # in caption order
    relation: str | None = None  # position only: objects[0] is `relation` objects[1]


def requested(scene: Scene) -> list[tuple[str, str, int]]:
    """What the caption asks for: (colour, shape, count) per distinct object, in caption order."""
    counts: dict[tuple[str, str], int] = {}
    for obj in scene.objects:
        counts[obj.color, obj.shape] = counts.get((obj.color, obj.shape), 0) + 1
    return [(color, shape, n) for (color, shape), n in counts.items()]


def caption(task: str, objects: tuple[Obj, ...], relation: str | None = None) -> str:
    """Short fixed templates, one per task, so the small sentence encoder sees consistent text."""
    first = f"a {objects[0].color} {objects[0].shape}"
    if task == "single_object":
        return first
    if task == "colors":  # GenEval's colors template, "a photo of a {color} {object}"
        return f"a photo of {first}"
    if task == "counting":
        return f"{NUMBER_WORDS[len(objects)]} {objects[0].color} {objects[0].shape}s"
    second = f"a {objects[1].color} {objects[1].shape}"
    if task == "position":
        return f"{first} {relation} {second}"
    return f"{first} and {second}"  # two_object, color_attr


def scene_from_caption(text: str) -> Scene:
    """The scene a caption asks for, without layout (boxes are zero): enough for the scorer's
    checks, which read only the task, the requested objects and the relation. "A and B" captions
    are two_object and color_attr alike; they parse as two_object."""
    words = text.strip().split()

    def obj(ws: list[str]) -> Obj:
        if len(ws) != 3 or ws[0] != "a":
            raise ValueError(f"cannot parse {' '.join(ws)!r} in caption {text!r} as 'a COLOUR SHAPE'")
        return Obj(ws[2], ws[1], (0.0, 0.0, 0.0, 0.0))

    if words[:3] == ["a", "photo", "of"]:
        return Scene(-1, "colors", text, (obj(words[3:]),))
    counts = {w: n for n, w in NUMBER_WORDS.items()}
    if len(words) == 3 and words[0] in counts and words[2].endswith("s"):
        return Scene(-1, "counting", text, (Obj(words[2][:-1], words[1], (0.0,) * 4),) * counts[words[0]])
    if len(words) == 3:
        return Scene(-1, "single_object", text, (obj(words),))
    if "and" in words:
        i = words.index("and")
        return Scene(-1, "two_object", text, (obj(words[:i]), obj(words[i + 1:])))
    for rel in RELATIONS:
        r = rel.split()
        for i in range(len(words) - len(r) + 1):
            if words[i:i + len(r)] == r:
                return Scene(-1, "position", text, (obj(words[:i]), obj(words[i + len(r):])), rel)
    raise ValueError(f"caption {text!r} is not a shapes-world template")


def sample_scene(seed: int, world: WorldConfig = WorldConfig(),
                 task_weights: dict[str, float] | None = None, heldout: bool = False) -> Scene:
    """The scene of `seed`. With `heldout`, one object is a held-out (colour, shape) pair."""
    rng = np.random.default_rng(seed)
    weights = np.array([(task_weights or TASK_WEIGHTS).get(t, 0.0) for t in TASKS])
    task = TASKS[rng.choice(len(TASKS), p=weights / weights.sum())]
    combos = _pick_combos(rng, task, world, heldout)
    relation = RELATIONS[rng.integers(len(RELATIONS))] if task == "position" else None
    if task == "counting":
        combos = combos * int(rng.integers(2, world.max_count + 1))
    corners = _place(rng, len(combos), world, relation)
    objects = tuple(Obj(shape, color, _box(corner, world))
                    for (color, shape), corner in zip(combos, corners))
    return Scene(seed, task, caption(task, objects, relation), objects, relation)


def make_split(name: str, n: int, world: WorldConfig = WorldConfig(),
               task_weights: dict[str, float] | None = None) -> list[Scene]:
    """The first `n` scenes of split `name`; seeds follow SPLIT_OFFSETS (see there).

    `train`, `val` and `heldout_prompts` share one distribution and differ only in seeds (the
    caption space is small, so a caption may recur with a new layout); `heldout_combos` scenes
    each contain a (colour, shape) pair that no other split ever shows.
    """
    if name not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {name!r}; expected one of {list(SPLIT_OFFSETS)}")
    if not 0 <= n <= SPLIT_STRIDE:
        raise ValueError(f"a split holds at most {SPLIT_STRIDE} scenes, asked for {n}")
    return [sample_scene(SPLIT_OFFSETS[name] + i, world, task_weights, name == "heldout_combos")
            for i in range(n)]


def _pick_combos(rng, task, world, heldout) -> list[tuple[str, str]]:
    """(colour, shape) per mentioned object. Two objects always differ in shape, as GenEval's
    two classes do; color_attr also needs two colours, or swapping them would change nothing."""
    allowed, held = world.combos, list(world.heldout_combos)
    k = 2 if task in ("two_object", "position", "color_attr") else 1
    for _ in range(1000):
        picks = [allowed[rng.integers(len(allowed))] for _ in range(k)]
        if heldout:
            picks[rng.integers(k)] = held[rng.integers(len(held))]
        shapes_differ = k == 1 or picks[0][1] != picks[1][1]
        colors_differ = k == 1 or picks[0][0] != picks[1][0]
        if shapes_differ and (colors_differ or task != "color_attr"):
            return picks
    raise RuntimeError(f"world {world} cannot make a {task} scene")


def _place(rng, n, world, relation=None, tries=50) -> list[tuple[int, int]]:
    """Top-left grid corners of `n` boxes, pairwise `world.gap` apart; for a relation, two boxes
    that show it clearly. Rejection sampling, restarting the layout when an object finds no room."""
    top = (world.grid - world.object_size) // world.snap  # in snap units
    for _ in range(1000):
        corners: list[tuple[int, int]] = []
        for _ in range(n):
            for _ in range(tries):
                c = (world.snap * int(rng.integers(top + 1)), world.snap * int(rng.integers(top + 1)))
                if all(_apart(c, d, world) for d in corners):
                    corners.append(c)
                    break
        if len(corners) == n and (relation is None or _shows(relation, *corners, world)):
            return corners
    raise RuntimeError(f"no room for {n} objects in {world}")


def _apart(a, b, world) -> bool:
    reach = world.object_size + world.gap
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _shows(relation, a, b, world) -> bool:
    """A is `relation` B without doubt: a full object plus gap away along the relation's axis,
    and at most half that across it. Then GenEval's rule gives |dx| >= 0.8 / 1.12 > 0.5 on the
    axis and < 0.5 across it, whatever the size, so a mirrored scene fails it."""
    axis, sign = {"left of": (0, -1), "right of": (0, 1),
                  "above": (1, -1), "below": (1, 1)}[relation]
    along, across = sign * (a[axis] - b[axis]), abs(a[1 - axis] - b[1 - axis])
    return along >= world.object_size + world.gap and across <= along / 2


def _box(corner, world) -> tuple[float, float, float, float]:
    x, y = corner
    s, g = world.object_size, world.grid
    return (x / g, y / g, (x + s) / g, (y + s) / g)


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of `shape` filling its box, tested at pixel centres (no anti-aliasing).
    Fill of the box: square 1, circle ~pi/4, triangle ~0.5; the scorer tells shapes apart by it."""
    v, u = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]  # box coords in (0, 1)
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up; half a pixel of slack so the apex row is drawn
        return np.abs(u - 0.5) <= v / 2 + 0.5 / w
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, resolution: int = 32, world: WorldConfig = WorldConfig()) -> np.ndarray:
    """uint8 (resolution, resolution, 3) image of `scene`; exact at multiples of `world.grid`."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = world.background
    palette = world.palette
    for obj in scene.objects:
        x0, y0, x1, y1 = (round(v * resolution) for v in obj.box)
        image[y0:y1, x0:x1][shape_mask(obj.shape, y1 - y0, x1 - x0)] = palette[obj.color]
    return image


def to_uint8(image) -> np.ndarray:
    """uint8 (H, W, 3) from the world's format (the same) or the model's: float (3, H, W) in
    [-1, 1], numpy or torch. Floats are always read as [-1, 1]: [0, 1] cannot be told apart."""
    if hasattr(image, "detach"):  # a torch tensor; duck-typed so this module needs no torch
        image = image.detach().cpu()
        image = (image if str(image.dtype) == "torch.uint8" else image.float()).numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (H, W, 3), got {image.shape}")
        return image
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"float images must be (3, H, W) in [-1, 1], got {image.shape}")
    pixels = np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5)
    return pixels.astype(np.uint8).transpose(1, 2, 0)


def save_grid(images, path: str, nrow: int = 8, scale: int = 4, pad: int = 2) -> None:
    """Write images (any format `to_uint8` reads) as one PNG grid, upscaled `scale`x with
    nearest-neighbour so 32 px scenes stay sharp in a README."""
    tiles = [to_uint8(im).repeat(scale, 0).repeat(scale, 1) for im in images]
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / nrow)
    cols = min(nrow, len(tiles))
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 128, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        canvas[y:y + h, x:x + w] = tile
    Image.fromarray(canvas).save(path)


# python -m base_model.shapes preview.png: a grid of the first train scenes, captions printed
if __name__ == "__main__":
    import sys

    scenes = make_split("train", 32)
    save_grid([render(s) for s in scenes], sys.argv[1] if len(sys.argv) > 1 else "shapes.png")
    print("\n".join(f"{s.seed:3d} {s.task:14s} {s.caption}" for s in scenes))
