"""A CLIP-style image–text model learned in-project on the shapes world: a reward and a feature space.

CLIP (Radford et al. 2021, arXiv 2103.00020): an image tower and a text tower map into one unit
sphere and are trained with the symmetric InfoNCE loss over a batch, at a learned temperature. Here
the image tower is a small conv net on 32×32 renders and the text tower attends over the frozen
MiniLM token states of `base_model.text` (so "A left of B" and "B left of A" can differ: order is in
the tokens, not in the pooled mean). In-batch negatives rarely differ by one attribute, so, in the
spirit of NegCLIP (Yuksekgonul et al. 2023, arXiv 2210.01936), half of each batch is the other half's
minimally edited twins (relation flipped, one object fewer, colours swapped, …), image and caption,
and captions that say the same thing in other words count as matches (`meaning`).

    python -m reward.imagetext --config configs/reward/imagetext.yaml  # → runs/reward/imagetext, ~2 min on 1 thread

The score of an image and a prompt is 100·cos(image, text): CLIP's logit at scale 100 (CLIPScore
without its clamp at 0). `image_features` is also the feature space of `reward.fid`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from base_model.cli import check_types, parse
from base_model.errors import entry_point
from base_model.outputs import atomic_folder, check_model_output
from base_model.shapes import Scene, WorldConfig, caption, make_split, render, scene_from_caption

DEFAULT_PATH = "runs/reward/imagetext"

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageTextConfig:
    resolution: int = 32  # images are resized to this side before the image tower
    width: int = 64  # channels of the first conv layer; the deeper ones have 2·width
    embed_dim: int = 128  # D: the joint embedding (and FID feature) width
    text_width: int = 128  # width of the text tower's attention block
    text_heads: int = 4
    text_depth: int = 2  # attention blocks; the readout token needs two to see words bound to each other
    context_dim: int = 384  # width of the frozen encoder's token states (MiniLM: 384)
    context_len: int = 16  # tokens per caption (MiniLM: 16, see base_model.text.MAX_LENGTH)
    pooled_dim: int = 384  # width of the frozen encoder's pooled vector
    text_encoders: list[str] = field(default_factory=lambda: ["minilm"])  # base_model.text specs

    def __post_init__(self):
        check_types(self)
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8 (4-px patches, then a stride 2)")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> ImageTextConfig:
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"unknown ImageTextConfig keys: {sorted(unknown)}")
        return cls(**d)


class TextBlock(nn.Module):
    """Pre-norm self-attention + MLP over a [pooled; tokens] sequence, padding masked out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):  # x (N, L, d), mask (N, L) True on real tokens
        N, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (N, h, L, d/h)
        x = x + self.proj(attn.transpose(1, 2).reshape(N, L, d))
        return x + self.mlp(self.norm2(x))


class ImageTextModel(nn.Module):
    """image_features (N, D) and text_features (N, D) on the unit sphere; forward gives CLIP logits."""

    def __init__(self, config: ImageTextConfig):
        super().__init__()
        self.config = c = config
        w, side = c.width, c.resolution // 8
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=4), nn.GELU(),  # 4×4 patches: the world's snap grid, (N, w, R/4, R/4)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # (N, 2w, R/8, R/8)
            # flatten, not average-pool: where an object is matters ("left of", "above")
            nn.Flatten(), nn.LayerNorm(2 * w * side * side), nn.Linear(2 * w * side * side, c.embed_dim))
        self.context_in = nn.Linear(c.context_dim, c.text_width)
        self.pooled_in = nn.Linear(c.pooled_dim, c.text_width)  # the pooled vector is the readout token
        self.text_pos = nn.Parameter(torch.randn(1, 1 + c.context_len, c.text_width) * 0.02)
        self.text_blocks = nn.ModuleList(TextBlock(c.text_width, c.text_heads) for _ in range(c.text_depth))
        self.text_out = nn.Sequential(nn.LayerNorm(c.text_width), nn.Linear(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())  # CLIP's initial temperature

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images float (N, 3, H, W) in [-1, 1] → unit vectors (N, D)."""
        R = self.config.resolution
        if images.shape[-2:] != (R, R):
            images = F.interpolate(images, size=(R, R), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.image_tower(images), dim=-1)

    def text_features(self, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """context (N, L, context_dim) with zeros past each caption, pooled (N, pooled_dim) → (N, D)."""
        mask = context.abs().amax(-1) > 0  # base_model.text zeroes the padding positions
        x = torch.cat([self.pooled_in(pooled)[:, None], self.context_in(context)], 1) + self.text_pos  # (N, 1+L, d)
        mask = torch.cat([mask.new_ones(len(mask), 1), mask], 1)
        for block in self.text_blocks:
            x = block(x, mask)
        return F.normalize(self.text_out(x[:, 0]), dim=-1)

    def forward(self, images, context, pooled) -> torch.Tensor:
        """CLIP logits (N_images, N_texts) = exp(logit_scale) · cos."""
        scale = self.logit_scale.clamp(max=4.6052).exp()  # CLIP clips the scale at 100
        return scale * self.image_features(images) @ self.text_features(context, pooled).T

    # -- checkpoints: config.json + model.safetensors, written atomically ------------------------

    def save_pretrained(self, path: str):
        save_atomic(path, self.state_dict(), asdict(self.config))

    @classmethod
    def from_pretrained(cls, path: str) -> ImageTextModel:
        config, state = read_checkpoint(path, "image–text model", "python -m reward.imagetext --output PATH")
        model = cls(ImageTextConfig.from_dict(config))
        model.load_state_dict(state)
        return model.eval()


def save_atomic(path: str, state: dict, config: dict, extra_files: dict[str, str] | None = None):
    """config.json + model.safetensors (+ extra text files) into a temporary folder renamed into
    place (as MMDiT.save_pretrained), so a kill never leaves half a checkpoint."""
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        for name, text in {"config.json": json.dumps(config, indent=2), **(extra_files or {})}.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def read_checkpoint(path: str, what: str, how: str) -> tuple[dict, dict]:
    """(config dict, state dict) of a save_atomic folder; a clear error naming how to make one."""
    missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        where = "folder" if os.path.isdir(path) else "path (it does not exist)"
        raise FileNotFoundError(f"{what} {where} {path!r} lacks {' and '.join(missing)}; train one with "
                                f"`{how.replace('PATH', path)}`")
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f), load_file(os.path.join(path, "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Loss: symmetric InfoNCE, with repeated captions and extra negative captions
# ---------------------------------------------------------------------------------------------


def contrastive_loss(logits: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CLIP's symmetric InfoNCE over logits (B images, U texts); positive (B, U) bool marks the texts
    that describe each image. The shapes world repeats a caption, or says the same thing in other
    words ("B right of A"), within a batch, so an image may have several right texts and a text
    several right images: each term is the log of the softmax mass on all the right ones. Text
    columns without an image (extra negatives) enter only the image→text term. With U = B and
    positive = the identity this is exactly CLIP's loss."""
    def nll(dim):  # -log Σ_right softmax along dim, per row (dim 1) or column (dim 0)
        return logits.logsumexp(dim) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim)

    i2t, t2i = nll(1).mean(), nll(0)[positive.any(0)].mean()
    accuracy = positive.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return (i2t + t2i) / 2, {"loss_i2t": i2t.item(), "loss_t2i": t2i.item(), "batch_accuracy": accuracy.item()}


def meaning(text: str) -> tuple:
    """A key equal for shapes-world captions that say the same: "A and B" = "B and A",
    "A left of B" = "B right of A", "a X" = "a photo of a X"."""
    scene = scene_from_caption(text)
    objects = [(o.color, o.shape) for o in scene.objects]
    if scene.relation is None:
        return ("objects", tuple(sorted(objects)))
    a, b = objects
    if scene.relation in ("right of", "below"):
        return ("position", b, {"right of": "left of", "below": "above"}[scene.relation], a)
    return ("position", a, scene.relation, b)


# ---------------------------------------------------------------------------------------------
# Minimal edits: scenes (and captions) one attribute away from a scene
# ---------------------------------------------------------------------------------------------


def minimal_edits(scene: Scene, world: WorldConfig = WorldConfig()) -> list[tuple[str, Scene]]:
    """(kind, edited scene) for every one-attribute edit that makes the caption false for `scene`,
    with kind one of "color", "shape", "swap_colors", "relation", "count". The edited scene keeps
    the layout and its caption describes its own render, so each edit is both a hard negative
    caption for `scene`'s image and a wrong image for `scene`'s caption."""
    objs, task = list(scene.objects), scene.task
    two = task in ("two_object", "position", "color_attr")
    held = set(world.heldout_combos)
    edits: list[tuple[str, list, str | None]] = []
    # counting recolours / reshapes all its objects (they are one kind); others one object at a time
    targets = [list(range(len(objs)))] if task == "counting" else [[i] for i in range(len(objs))]
    for idx in targets:
        o = objs[idx[0]]
        for color, _ in world.colors:
            if color != o.color and (color, o.shape) not in held:
                edits.append(("color", [dataclasses.replace(x, color=color) if i in idx else x
                                        for i, x in enumerate(objs)], scene.relation))
        others = {objs[j].shape for j in range(len(objs)) if j not in idx} if two else set()
        for shape in world.shapes:
            if shape != o.shape and shape not in others and (o.color, shape) not in held:
                edits.append(("shape", [dataclasses.replace(x, shape=shape) if i in idx else x
                                        for i, x in enumerate(objs)], scene.relation))
    if two and objs[0].color != objs[1].color:
        a, b = objs
        edits.append(("swap_colors", [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)],
                      scene.relation))
    if task == "position":  # "A right of B" (not "B left of A", which says the same): swap the boxes too
        a, b = objs
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        edits.append(("relation", [dataclasses.replace(a, box=b.box), dataclasses.replace(b, box=a.box)],
                      flip[scene.relation]))
    if task == "counting" and len(objs) > 2:  # "two" is the fewest a counting caption says
        edits.append(("count", objs[:-1], None))
    return [(kind, Scene(scene.seed, task, caption(task, tuple(o), rel), tuple(o), rel)) for kind, o, rel in edits]


# Edits that the other scenes of a batch almost never supply, hardest first: they keep the objects
# and change only where they are, how many, or which colour goes with which shape. Colour and
# shape edits differ from most captions anyway.
STRUCTURAL_EDITS = ("relation", "count", "swap_colors")


def pick_twin(scene: Scene, rng: random.Random) -> Scene:
    """The minimal edit of `scene` to train beside it: the scene's first structural kind, else a
    colour or shape edit (the kind drawn before the edit)."""
    groups: dict[str, list[Scene]] = {}
    for kind, edited in minimal_edits(scene):
        groups.setdefault(kind, []).append(edited)
    for kind in STRUCTURAL_EDITS:
        if kind in groups:
            return rng.choice(groups[kind])
    return rng.choice(groups[rng.choice(sorted(groups))])


# ---------------------------------------------------------------------------------------------
# Scorer: the model with its frozen text encoder
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def text_embedder(encoders: tuple[str, ...]):
    """One cached TextEmbedder per encoder list: loading MiniLM takes seconds."""
    from base_model.text import TextEmbedder

    return TextEmbedder(list(encoders))


class ImageTextScorer:
    """`scorer(images, prompts) -> (N,)` = 100·cos; prompts are captions or shapes-world scenes."""

    def __init__(self, model: ImageTextModel, batch_size: int = 500):
        self.model = model.eval().requires_grad_(False)
        self.text = text_embedder(tuple(model.config.text_encoders))
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div(127.5).sub(1.0)
        return torch.cat([self.model.image_features(images[i:i + self.batch_size].float())
                          for i in range(0, len(images), self.batch_size)])

    @torch.no_grad()
    def embed_text(self, prompts) -> torch.Tensor:
        captions = [p.caption if hasattr(p, "caption") else str(p) for p in prompts]
        context, pooled = self.text.encode(captions)
        return self.model.text_features(context, pooled)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return 100.0 * (self.embed_images(images) * self.embed_text(prompts)).sum(-1)


def load(path: str | None = None) -> ImageTextScorer:
    """The scorer of a trained model folder (default runs/reward/imagetext)."""
    return ImageTextScorer(ImageTextModel.from_pretrained(path or DEFAULT_PATH))


# ---------------------------------------------------------------------------------------------
# Evaluation: retrieval in groups, and the right caption against its minimal edits
# ---------------------------------------------------------------------------------------------


def retrieval_accuracy(scorer: ImageTextScorer, images: torch.Tensor, captions: list[str], group: int = 100) -> dict:
    """Each image picks a caption among the `group` captions of its group (and each caption an
    image); a pick is right when it says the same as the true caption (`meaning`: the world
    repeats captions, so `chance` counts those repeats)."""
    img, txt = scorer.embed_images(images), scorer.embed_text(captions)
    i2t = t2i = chance = 0.0
    n = len(captions) // group * group
    keys = [meaning(c) for c in captions]
    for s in range(0, n, group):
        k = keys[s:s + group]
        same = torch.tensor([[a == b for b in k] for a in k])  # (g, g)
        sim = img[s:s + group] @ txt[s:s + group].T
        i2t += same[torch.arange(group), sim.argmax(1)].sum().item()
        t2i += same[sim.argmax(0), torch.arange(group)].sum().item()
        chance += (same.float().sum(1) / group).sum().item()
    return {"i2t": i2t / n, "t2i": t2i / n, "chance": chance / n, "n": n, "group": group}


def edit_accuracy(scorer: ImageTextScorer, images: torch.Tensor, scenes: list[Scene]) -> dict:
    """How often an image scores its own caption above each minimally edited caption (chance 0.5),
    over all (scene, edit) pairs and per kind of edit."""
    pairs = [(i, kind, e.caption) for i, s in enumerate(scenes) for kind, e in minimal_edits(s)]
    idx = torch.tensor([i for i, _, _ in pairs])
    img = scorer.embed_images(images)[idx]
    right = (img * scorer.embed_text([scenes[i].caption for i in idx.tolist()])).sum(-1)
    wrong = (img * scorer.embed_text([c for _, _, c in pairs])).sum(-1)
    win = (right > wrong).float()
    kinds = sorted({k for _, k, _ in pairs})
    per_kind = {k: win[torch.tensor([kk == k for _, kk, _ in pairs])].mean().item() for k in kinds}
    # the mean over pairs is mostly colour edits (a scene has many); the mean over kinds weighs each alike
    return {"accuracy": win.mean().item(), "kind_mean": sum(per_kind.values()) / len(per_kind),
            "per_kind": per_kind, "pairs": len(pairs)}


def evaluate(scorer: ImageTextScorer, split: str, n: int, group: int = 100) -> dict:
    from base_model.data import shapes_data, to_model_space

    data, scenes = shapes_data(split, n)
    images = to_model_space(data.images)
    return {"split": split, "retrieval": retrieval_accuracy(scorer, images, data.captions, group),
            "minimal_edit": edit_accuracy(scorer, images, scenes)}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageTextTrainConfig:
    output: str = DEFAULT_PATH  # where the model (config.json, model.safetensors, metrics.json) goes
    num_train: int = 6000  # shapes-world train scenes (each with a twin when hard_negatives)
    num_eval: int = 1000  # heldout_prompts scenes for the reported accuracies
    eval_group: int = 100  # retrieval among this many held-out captions
    width: int = 32  # ImageTextConfig.width
    embed_dim: int = 128  # ImageTextConfig.embed_dim
    text_width: int = 64  # ImageTextConfig.text_width
    text_depth: int = 2  # ImageTextConfig.text_depth
    text_encoders: list[str] = field(default_factory=lambda: ["minilm"])
    hard_negatives: bool = True  # half of each batch is the other half's minimally edited twins (NegCLIP)
    noise_std: float = 0.1  # Gaussian pixel noise in [-1, 1] units: generated images are never exact renders
    steps: int = 250
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20  # then cosine decay to 0
    max_grad_norm: float = 1.0
    logging_steps: int = 25
    seed: int = 0
    overwrite_output_dir: bool = False  # replace a model already at --output

    def __post_init__(self):
        check_types(self)
        for name in ("num_train", "num_eval", "eval_group", "steps", "batch_size", "width", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")
        if self.num_eval < self.eval_group:
            raise ValueError(f"--num_eval {self.num_eval} is smaller than --eval_group {self.eval_group}")


def main(cfg: ImageTextTrainConfig) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    from base_model.data import to_model_space

    # Unpack the config once; functions below take explicit arguments.
    B, steps, seed, noise_std = cfg.batch_size, cfg.steps, cfg.seed, cfg.noise_std
    check_model_output(cfg.output, cfg.overwrite_output_dir)  # before training, not after
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.time()

    scenes = make_split("train", cfg.num_train)
    if cfg.hard_negatives:  # scenes 0..N-1, then their twins N..2N-1
        scenes += [pick_twin(s, rng) for s in scenes]
    images = to_model_space(torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2))
    vocab = sorted({s.caption for s in scenes})
    text = text_embedder(tuple(cfg.text_encoders))
    context, pooled = text.encode(vocab)  # once per distinct caption: (V, L, 384), (V, 384)
    index = {c: i for i, c in enumerate(vocab)}
    caption_ids = torch.tensor([index[s.caption] for s in scenes])
    keys: dict[tuple, int] = {}
    meaning_ids = torch.tensor([keys.setdefault(meaning(c), len(keys)) for c in vocab])  # (V,)

    model_cfg = ImageTextConfig(width=cfg.width, embed_dim=cfg.embed_dim, text_width=cfg.text_width,
                                text_depth=cfg.text_depth,
                                context_dim=context.shape[-1], context_len=context.shape[1],
                                pooled_dim=pooled.shape[-1], text_encoders=list(cfg.text_encoders))
    model = ImageTextModel(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "text_pos"]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n == "text_pos"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, steps)
    print(json.dumps({"train_scenes": len(scenes), "texts": len(vocab),
                      "params": sum(p.numel() for p in model.parameters()), "setup_s": round(time.time() - start, 1)}))

    N = cfg.num_train
    per_step = B // 2 if cfg.hard_negatives else B  # scenes per step; with twins the batch is [scenes; twins]
    perm, pos = torch.randperm(N), 0
    model.train()
    for step in range(1, steps + 1):
        if pos + per_step > N:
            perm, pos = torch.randperm(N), 0
        idx, pos = perm[pos:pos + per_step], pos + per_step
        if cfg.hard_negatives:
            idx = torch.cat([idx, idx + N])
        x = images[idx] + noise_std * torch.randn(len(idx), *images.shape[1:])
        texts = torch.unique(caption_ids[idx])  # each distinct text through the tower once
        logits = model(x, context[texts], pooled[texts])  # (B, U)
        positive = meaning_ids[caption_ids[idx]][:, None] == meaning_ids[texts][None]  # (B, U)
        loss, metrics = contrastive_loss(logits, positive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        if step % cfg.logging_steps == 0 or step == steps:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4),
                              **{k: round(v, 4) for k, v in metrics.items()}, "grad_norm": round(grad_norm.item(), 3),
                              "scale": round(model.logit_scale.exp().item(), 2),
                              "elapsed_s": round(time.time() - start, 1)}))

    model.eval()
    scorer = ImageTextScorer(model)
    result = evaluate(scorer, "heldout_prompts", cfg.num_eval, cfg.eval_group)
    # unseen (colour, shape) pairs: how far the features carry outside the training combinations
    result.update(heldout_combos=evaluate(scorer, "heldout_combos", cfg.num_eval, cfg.eval_group),
                  train_s=round(time.time() - start, 1), config=asdict(cfg))
    save_atomic(cfg.output, model.state_dict(), asdict(model_cfg), {"metrics.json": json.dumps(result, indent=2)})
    print(json.dumps({k: result[k] for k in ("retrieval", "minimal_edit", "heldout_combos", "train_s")}))
    return result


@entry_point
def cli(argv):
    main(parse(ImageTextTrainConfig, argv))


if __name__ == "__main__":
    cli()
