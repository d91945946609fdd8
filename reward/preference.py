"""A preference reward model: a Bradley–Terry head on frozen image–text features.

As PickScore (Kirstain et al. 2023, arXiv 2305.01569) and ImageReward learn a reward from human
choices, a small MLP r(image, prompt) over the frozen features of `reward.imagetext` (image i, text
t and i⊙t) is fit to Pick-a-Pic pairs by maximising P(winner ≻ loser) = σ(r_w − r_l) (Bradley and
Terry 1952). Pairs are split 90/10 by prompt, so the reported accuracy is on unseen prompts.

    python -m reward.preference --config configs/reward/preference.yaml --pairs runs/pairs \
        --imagetext runs/reward/imagetext --output runs/reward/preference

`--pairs shapes` makes pairs in the shapes world instead (from the `val` split, unseen by the
image–text model): the winner is the render of the caption's scene, the loser a render of one
minimal edit of it (one colour, shape, count or relation changed; `reward.imagetext.minimal_edits`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from base_model.cli import check_types, parse
from base_model.errors import entry_point
from base_model.outputs import check_model_output

from .imagetext import DEFAULT_PATH as IMAGETEXT_PATH
from .imagetext import ImageTextConfig, ImageTextModel, minimal_edits, read_checkpoint, save_atomic, text_embedder

DEFAULT_PATH = "runs/reward/preference"


# ---------------------------------------------------------------------------------------------
# Model and loss
# ---------------------------------------------------------------------------------------------


@dataclass
class PreferenceConfig:
    hidden: int = 256  # width of the head's hidden layer
    imagetext: dict | None = None  # the frozen backbone's ImageTextConfig, as a dict
    imagetext_source: str = ""  # where the backbone was read from, and its model.safetensors SHA-256
    imagetext_sha256: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> PreferenceConfig:
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"unknown PreferenceConfig keys: {sorted(unknown)}")
        return cls(**d)


class PreferenceModel(nn.Module):
    """r(image, prompt) = s·cos(i, t) + MLP([i, t, i⊙t]) on the frozen backbone's unit features, the
    MLP zero at init so training starts from the backbone's CLIP logit. The backbone's
    weights are saved with the head (a few hundred thousand parameters), so a checkpoint stands alone."""

    def __init__(self, config: PreferenceConfig):
        super().__init__()
        self.config = config
        self.backbone = ImageTextModel(ImageTextConfig.from_dict(config.imagetext)).eval().requires_grad_(False)
        D = self.backbone.config.embed_dim
        self.head = nn.Sequential(nn.Linear(3 * D, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))
        # start from the backbone's own judgement: r = s·cos(i, t) + head, the head's output zero at init
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.cosine_scale = nn.Parameter(self.backbone.logit_scale.detach().exp().clone())

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(N, D), (N, D) → rewards (N,)."""
        i, t = image_features, text_features
        return self.cosine_scale * (i * t).sum(-1) + self.head(torch.cat([i, t, i * t], -1)).squeeze(-1)

    def save_pretrained(self, path: str, extra_files: dict[str, str] | None = None):
        save_atomic(path, self.state_dict(), asdict(self.config), extra_files)

    @classmethod
    def from_pretrained(cls, path: str) -> PreferenceModel:
        config, state = read_checkpoint(path, "preference model", "python -m reward.preference --pairs shapes "
                                        "--imagetext runs/reward/imagetext --output PATH")
        model = cls(PreferenceConfig.from_dict(config))
        model.load_state_dict(state)
        return model.eval()


def bradley_terry_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """−log σ(r_w − r_l), mean over pairs; log 2 when the model cannot tell them apart."""
    margin = r_w - r_l
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------


class PreferenceScorer:
    """`scorer(images, prompts) -> (N,)` rewards; images float (N, 3, H, W) in [-1, 1] or uint8."""

    def __init__(self, model: PreferenceModel, batch_size: int = 500):
        self.model = model.eval().requires_grad_(False)
        self.text = text_embedder(tuple(model.backbone.config.text_encoders))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        image_f, text_f = features(self.model.backbone, self.text, images,
                                   [p.caption if hasattr(p, "caption") else str(p) for p in prompts], self.batch_size)
        return self.model(image_f, text_f)


def load(path: str | None = None) -> PreferenceScorer:
    """The scorer of a trained preference model folder (default runs/reward/preference)."""
    return PreferenceScorer(PreferenceModel.from_pretrained(path or DEFAULT_PATH))


@torch.no_grad()
def features(backbone: ImageTextModel, text, images: torch.Tensor, captions: list[str], batch_size: int = 500):
    """Unit image features (N, D) of uint8 or [-1, 1] images and text features (N, D) of captions."""
    if images.dtype == torch.uint8:
        images = images.float().div(127.5).sub(1.0)
    image_f = torch.cat([backbone.image_features(images[i:i + batch_size])
                         for i in range(0, len(images), batch_size)])
    context, pooled = text.encode(captions)
    return image_f, backbone.text_features(context, pooled)


# ---------------------------------------------------------------------------------------------
# Data: Pick-a-Pic pairs, shapes-world pairs, a split by prompt
# ---------------------------------------------------------------------------------------------


def shapes_pairs(split: str, n: int, seed: int = 0) -> list[dict]:
    """n Pick-a-Pic rows from the first n scenes of a shapes-world split: the scene's render against
    a render of one of its minimal edits (the kind of edit drawn first, then the edit), the winner
    in `jpg_0` or `jpg_1` at random."""
    from base_model.pickapic import encode_png
    from base_model.shapes import make_split, render

    rng = random.Random(seed)
    rows = []
    for scene in make_split(split, n):
        groups: dict[str, list] = {}
        for kind, edited in minimal_edits(scene):
            groups.setdefault(kind, []).append(edited)
        kind = rng.choice(sorted(groups))
        images = [encode_png(render(scene)), encode_png(render(rng.choice(groups[kind])))]
        names = ["render", f"edit:{kind}"]
        order = (0, 1) if rng.random() < 0.5 else (1, 0)  # order[j]: which image sits in column j
        rows.append({"caption": scene.caption, "jpg_0": images[order[0]], "jpg_1": images[order[1]],
                     "label_0": float(order[0] == 0), "label_1": float(order[1] == 0),
                     "model_0": names[order[0]], "model_1": names[order[1]]})
    return rows


def split_by_prompt(captions: list[str], eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, eval): a seeded `eval_fraction` of the distinct prompts, with all their pairs, is held out."""
    prompts = sorted(set(captions))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, round(eval_fraction * len(prompts)))])
    is_eval = torch.tensor([c in held for c in captions])
    return (~is_eval).nonzero().squeeze(1), is_eval.nonzero().squeeze(1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class PreferenceTrainConfig:
    pairs: str = "shapes"  # a Pick-a-Pic-schema dataset (parquet / arrow / save_to_disk), or "shapes"
    num_pairs: int = 4000  # shapes: pairs from this many `val` scenes
    imagetext: str = IMAGETEXT_PATH  # the frozen backbone (reward.imagetext folder)
    output: str = DEFAULT_PATH
    eval_fraction: float = 0.1  # prompts held out for the reported pairwise accuracy
    hidden: int = 256  # PreferenceConfig.hidden
    steps: int = 300
    batch_size: int = 256  # pairs per step
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    logging_steps: int = 100
    seed: int = 0
    overwrite_output_dir: bool = False  # replace a model already at --output

    def __post_init__(self):
        check_types(self)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval_fraction {self.eval_fraction} must be in (0, 1)")
        for name in ("num_pairs", "hidden", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(cfg: PreferenceTrainConfig) -> dict:
    from base_model.pickapic import load_pairs, pairs_dataset

    # Unpack the config once; functions below take explicit arguments.
    B, steps, seed = cfg.batch_size, cfg.steps, cfg.seed
    check_model_output(cfg.output, cfg.overwrite_output_dir)  # before training, not after
    torch.manual_seed(seed)
    start = time.time()

    backbone = ImageTextModel.from_pretrained(cfg.imagetext)
    text = text_embedder(tuple(backbone.config.text_encoders))
    if cfg.pairs == "shapes":  # written and read back, so both kinds of pairs take the Pick-a-Pic loader
        with tempfile.TemporaryDirectory() as tmp:
            pairs_dataset(shapes_pairs("val", cfg.num_pairs, seed)).to_parquet(os.path.join(tmp, "pairs.parquet"))
            pairs = load_pairs(os.path.join(tmp, "pairs.parquet"), backbone.config.resolution)
    else:
        pairs = load_pairs(cfg.pairs, backbone.config.resolution)
    image_w, text_f = features(backbone, text, pairs.chosen, pairs.captions)  # (N, D) each
    image_l, _ = features(backbone, text, pairs.rejected, pairs.captions)
    train, held = split_by_prompt(pairs.captions, cfg.eval_fraction, seed)

    config = PreferenceConfig(hidden=cfg.hidden, imagetext=asdict(backbone.config),
                              imagetext_source=os.path.abspath(cfg.imagetext),
                              imagetext_sha256=sha256(os.path.join(cfg.imagetext, "model.safetensors")))
    model = PreferenceModel(config)
    model.backbone.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        model.cosine_scale.copy_(backbone.logit_scale.exp())  # the trained backbone's CLIP scale
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    print(json.dumps({"pairs": len(pairs), "dropped": pairs.dropped, "train": len(train), "eval": len(held),
                      "eval_prompts": len({pairs.captions[i] for i in held.tolist()}),
                      "setup_s": round(time.time() - start, 1)}))

    model.train()
    for step in range(1, steps + 1):
        idx = train[torch.randint(len(train), (min(B, len(train)),))]
        # [winners; losers] through one forward, split with chunk(2)
        r_w, r_l = model(torch.cat([image_w[idx], image_l[idx]]), text_f[idx].repeat(2, 1)).chunk(2)
        loss, metrics = bradley_terry_loss(r_w, r_l)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.logging_steps == 0 or step == steps:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "accuracy": round(metrics["accuracy"], 4),
                              "elapsed_s": round(time.time() - start, 1)}))

    model.eval()
    with torch.no_grad():
        (_, held_metrics), (_, train_metrics) = (
            bradley_terry_loss(model(image_w[i], text_f[i]), model(image_l[i], text_f[i])) for i in (held, train))
        cos_w, cos_l = (image_w[held] * text_f[held]).sum(-1), (image_l[held] * text_f[held]).sum(-1)
    result = {"pairs": cfg.pairs, "n_pairs": len(pairs), "dropped": pairs.dropped, "n_train": len(train),
              "n_eval": len(held), "eval_accuracy": held_metrics["accuracy"],
              "train_accuracy": train_metrics["accuracy"],
              # the backbone alone (its image–text cosine as the reward) on the same held-out pairs
              "eval_accuracy_imagetext_cosine": (cos_w > cos_l).float().mean().item(),
              "train_s": round(time.time() - start, 1), "config": asdict(cfg)}
    model.save_pretrained(cfg.output, {"metrics.json": json.dumps(result, indent=2)})
    print(json.dumps({k: result[k] for k in ("n_train", "n_eval", "eval_accuracy", "eval_accuracy_imagetext_cosine",
                                             "train_accuracy", "train_s")}))
    return result


@entry_point
def cli(argv):
    main(parse(PreferenceTrainConfig, argv))


if __name__ == "__main__":
    cli()
