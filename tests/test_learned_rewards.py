"""Learned rewards: the image–text model (loss, minimal edits, a short training run that must beat
chance, checkpoints, the scorer), FID in its feature space against the closed form, and the
Bradley–Terry preference head on Pick-a-Pic pairs made in the shapes world."""

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from align.pairs import pairs_dataset
from base_model.data import shapes_data, to_model_space
from base_model.shapes import make_split, render
from reward import imagetext, preference
from reward.compositional import score
from reward.fid import ImageFeatures, frechet_distance
from reward.imagetext import (ImageTextConfig, ImageTextModel, ImageTextTrainConfig, contrastive_loss, meaning,
                              minimal_edits)
from reward.preference import PreferenceTrainConfig, bradley_terry_loss, shapes_pairs, split_by_prompt
from reward.scorers import get_scorer

TINY = dict(num_train=800, num_eval=200, steps=120, batch_size=128, learning_rate=3e-3, width=16, embed_dim=64,
            text_width=32, warmup_steps=5, logging_steps=40)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from a second thread, and on two shared cores two
    threads ran the short training 4× slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A tiny image–text model trained for a few dozen steps: (folder, metrics)."""
    out = str(tmp_path_factory.mktemp("imagetext") / "model")
    return out, imagetext.main(ImageTextTrainConfig(output=out, **TINY))


# -- the contrastive loss and the edits -------------------------------------------------------


def test_contrastive_loss_is_clip_loss_for_distinct_captions():
    logits = torch.randn(6, 6)
    loss, _ = contrastive_loss(logits, torch.eye(6, dtype=torch.bool))
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(loss, clip)


def test_contrastive_loss_merges_repeated_captions_and_ignores_negative_only_texts():
    # images 0 and 1 share text 0; text 2 is an extra negative with no image
    positive = torch.tensor([[True, False, False], [True, False, False], [False, True, False]])
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    _, metrics = contrastive_loss(logits, positive)
    assert metrics["batch_accuracy"] == 1.0
    # text 0 picks among images by softmax; both its images are right: −log(2e⁵ / (2e⁵ + 1)), not −log(½)
    t2i_0 = -math.log(2 * math.e ** 5 / (2 * math.e ** 5 + 1))
    t2i_1 = -math.log(math.e ** 5 / (math.e ** 5 + 2))
    assert metrics["loss_t2i"] == pytest.approx((t2i_0 + t2i_1) / 2, rel=1e-4)  # text 2 has no image: left out


def test_meaning_equates_paraphrases_only():
    assert meaning("a red square left of a blue circle") == meaning("a blue circle right of a red square")
    assert meaning("a red square left of a blue circle") != meaning("a blue circle left of a red square")
    assert meaning("a red square and a blue circle") == meaning("a blue circle and a red square")
    assert meaning("a photo of a red square") == meaning("a red square") != meaning("two red squares")


def test_minimal_edits_are_wrong_for_the_scene_and_right_for_themselves():
    scenes = make_split("train", 60)
    pairs = [(s, kind, e) for s in scenes for kind, e in minimal_edits(s)]
    assert {k for _, k, _ in pairs} == {"color", "shape", "swap_colors", "relation", "count"}
    assert all(e.caption != s.caption and meaning(e.caption) != meaning(s.caption) for s, _, e in pairs)
    edited = [render(e) for _, _, e in pairs]
    assert not any(score(edited, [s for s, _, _ in pairs])["correct"])  # the original caption fails
    assert all(score(edited, [e for _, _, e in pairs])["correct"])  # the edit's own caption holds


# -- a short training run, the checkpoint, the scorer -----------------------------------------


def test_short_training_ranks_matching_captions_far_above_chance(trained):
    _, metrics = trained
    retrieval, edit = metrics["retrieval"], metrics["minimal_edit"]
    assert retrieval["n"] == 200 and retrieval["group"] == 100
    assert retrieval["i2t"] > 4 * retrieval["chance"] and retrieval["t2i"] > 4 * retrieval["chance"]
    assert edit["accuracy"] > 0.6 and edit["per_kind"]["color"] > 0.75  # chance 0.5


def test_checkpoint_round_trip_is_identical_and_atomic(trained):
    path, metrics = trained
    assert sorted(os.listdir(path)) == ["config.json", "metrics.json", "model.safetensors"]
    assert not [d for d in os.listdir(os.path.dirname(path)) if d.startswith(".tmp-")]
    with open(os.path.join(path, "metrics.json")) as f:
        assert json.load(f)["retrieval"] == metrics["retrieval"]
    model = ImageTextModel.from_pretrained(path)
    again = os.path.join(os.path.dirname(path), "again")
    model.save_pretrained(again)
    reloaded = ImageTextModel.from_pretrained(again)
    x, context, pooled = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(3, 16, 384), torch.randn(3, 384)
    assert torch.equal(model(x, context, pooled), reloaded(x, context, pooled))
    assert model.config == reloaded.config


def test_scorer_by_spec_prefers_the_true_caption(trained):
    path, _ = trained
    data, scenes = shapes_data("heldout_prompts", 40)
    images = to_model_space(data.images)
    scorer = get_scorer(f"imagetext:{path}")
    right = scorer(images, data.captions)
    assert right.shape == (40,) and right.dtype == torch.float32 and right.abs().max() <= 100.0
    assert torch.equal(scorer(images, scenes), right)  # scenes are read by their captions
    wrong = scorer(images, data.captions[1:] + data.captions[:1])
    assert (right > wrong).float().mean() > 0.7
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer(images[:3], data.captions[:2])


def test_missing_model_names_the_path_and_how_to_train(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"python -m reward\.imagetext --output .*nowhere"):
        get_scorer(f"imagetext:{tmp_path / 'nowhere'}")
    monkeypatch.chdir(tmp_path)  # no runs/reward/imagetext here
    with pytest.raises(FileNotFoundError, match="runs/reward/imagetext"):
        imagetext.load(None)
    with pytest.raises(FileNotFoundError, match=r"python -m reward\.preference"):
        preference.load(None)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 8"):
        ImageTextConfig(resolution=30)
    with pytest.raises(TypeError, match="steps"):
        ImageTextTrainConfig(steps="many")
    with pytest.raises(ValueError, match="eval_fraction"):
        PreferenceTrainConfig(eval_fraction=1.5)


# -- FID in the learned feature space ---------------------------------------------------------


def closed_form_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_fid_matches_closed_form_and_orders_image_sets(trained):
    model = ImageTextModel.from_pretrained(trained[0])
    real = shapes_data("val", 300)[0].images
    other = shapes_data("heldout_prompts", 300)[0].images
    noise = torch.randint(0, 256, other.shape, dtype=torch.uint8)
    blurred = F.avg_pool2d(to_model_space(other), 5, stride=1, padding=2)  # float input, [-1, 1]

    same = frechet_distance(real, other, model)
    features = ImageFeatures(model)
    expected = closed_form_fid(features(real).double().numpy(), features(other).double().numpy())
    assert same == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert frechet_distance(real, real, model) == pytest.approx(0.0, abs=1e-4)
    blur, noisy = frechet_distance(to_model_space(real), blurred, model), frechet_distance(real, noise, model)
    # a few dozen steps barely teach the features sharpness (the full model: 0.006, 0.32, 1.9)
    assert 2 * same < blur < noisy / 10 and noisy > 100 * same


# -- the preference model ---------------------------------------------------------------------


def test_bradley_terry_loss_is_log_two_on_ties_and_falls_with_the_margin():
    r = torch.randn(8)
    loss, metrics = bradley_terry_loss(r, r)
    assert loss.item() == pytest.approx(np.log(2)) and metrics["accuracy"] == 0.0
    assert bradley_terry_loss(r + 1, r)[0] < loss < bradley_terry_loss(r - 1, r)[0]


def test_split_by_prompt_keeps_prompts_on_one_side():
    captions = [f"p{i % 20}" for i in range(200)]
    train, held = split_by_prompt(captions, 0.1, seed=0)
    assert len(train) + len(held) == 200 and len({captions[i] for i in held.tolist()}) == 2
    assert not {captions[i] for i in train.tolist()} & {captions[i] for i in held.tolist()}


def test_preference_model_learns_shapes_pairs_from_pick_a_pic_files(trained, tmp_path):
    rows = shapes_pairs("val", 600, seed=0)
    assert {r["label_0"] for r in rows} == {0.0, 1.0}  # winners on both sides
    pairs_dataset(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    out = str(tmp_path / "preference")
    result = preference.main(PreferenceTrainConfig(pairs=str(tmp_path / "pairs.parquet"), imagetext=trained[0],
                                                   output=out, steps=150, hidden=64, logging_steps=50))
    assert result["n_eval"] > 0 and result["eval_accuracy"] > 0.7  # chance 0.5

    scorer = get_scorer(f"preference:{out}")
    data, scenes = shapes_data("heldout_prompts", 30)
    rewards = scorer(to_model_space(data.images), data.captions)
    assert rewards.shape == (30,) and torch.isfinite(rewards).all()
    again = preference.PreferenceModel.from_pretrained(out)
    assert torch.equal(preference.PreferenceScorer(again)(data.images, scenes), rewards)  # uint8 and scenes too
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["imagetext_source"] == os.path.abspath(trained[0]) and len(config["imagetext_sha256"]) == 64
