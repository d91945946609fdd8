"""Deduplication (`base_model.dedup`) and the memorization audit (`reward.eval --memorization`):
planted near-duplicates are found and distinct scenes kept, the feature loaders on tiny random
models, the kept-rows index in pretraining, a model trained on a repeated image is flagged as a
copier and one trained on the deduplicated data is not, and bad inputs are one line."""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from base_model import dedup, pretrain
from base_model import precompute as pc
from base_model.cli import parse
from base_model.features import load_features, thumbnail
from base_model.pickapic import encode_png
from base_model.shapes import make_split, render
from reward import eval as reward_eval
from reward.imagetext import ImageTextConfig, ImageTextModel
from tests.test_nothing_lost import one_line_error, tree

pytestmark = pytest.mark.usefixtures("reset_accelerate")
THRESHOLD = "0.9"  # the thumbnail feature's (configs/dedup/toy.yaml); 0.5 is SSCD's


def distinct_scenes(n_candidates: int, min_diff: float = 0.1):
    """Random train-split scenes whose 32-px renders pairwise differ in ≥ `min_diff` of their pixels.
    The shapes world is small: half of 20,000 random scenes are pixel copies of another, and many more
    differ by one object moved one 4-px snap step (9.4% of the pixels). Such pairs are not "distinct
    scenes" whatever the detector, so they are left out here (greedily, in seed order)."""
    kept, renders = [], np.zeros((n_candidates, 32 * 32), np.uint32)
    for scene in make_split("train", n_candidates):
        x = render(scene, 32).reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)  # RGB as one int
        if kept and (renders[:len(kept)] != x).mean(1).min() < min_diff:
            continue
        renders[len(kept)] = x
        kept.append(scene)
    return kept


def crop(a, rng):
    """A random crop keeping 90–100% of the side, resized back."""
    side = round(len(a) * rng.uniform(0.9, 1.0))
    x, y = rng.integers(0, len(a) - side + 1, 2)
    return np.asarray(Image.fromarray(a).crop((x, y, x + side, y + side)).resize(a.shape[:2], Image.BICUBIC))


def jitter(a, rng):
    """Brightness, contrast and saturation ×0.8–1.2 and a hue shift of up to ±8/256."""
    im = Image.fromarray(a)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.8, 1.2))
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-8, 9)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def jpeg_bytes(a, rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=int(rng.integers(40, 91)))
    return buf.getvalue()


def image_parquet(path, images, captions):
    import datasets

    rows = [{"image": {"bytes": x if isinstance(x, bytes) else encode_png(x), "path": None}, "caption": c}
            for x, c in zip(images, captions)]
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    return str(path)


def planted_dataset(path, n_candidates=2000, n_planted=240, seed=0):
    """A shuffled image–caption parquet of distinct 64-px scenes plus planted near-duplicates of random
    ones (exact copies, crops, colour jitter, JPEG re-encodes, in turn). Returns the path, each row's
    scene id, and each row's kind ("original" or the planting)."""
    rng = np.random.default_rng(seed)
    scenes = distinct_scenes(n_candidates)
    originals = [render(s, 64) for s in scenes]
    images, ids, kinds = list(originals), list(range(len(scenes))), ["original"] * len(scenes)
    plant = {"copy": lambda a: a.copy(), "crop": lambda a: crop(a, rng), "jitter": lambda a: jitter(a, rng),
             "jpeg": lambda a: jpeg_bytes(a, rng)}
    for k, s in enumerate(rng.choice(len(scenes), n_planted, replace=False)):
        kind = list(plant)[k % len(plant)]
        images.append(plant[kind](originals[s]))
        ids.append(int(s))
        kinds.append(kind)
    order = rng.permutation(len(images))
    path = image_parquet(path, [images[i] for i in order], [scenes[ids[i]].caption for i in order])
    return path, np.array(ids)[order], np.array(kinds)[order]


def planted_scores(kept_rows, ids, kinds) -> dict:
    """Recall of the planted duplicates and the share of distinct scenes dropped, from the kept rows.
    A scene's family is its original and its plantings: dedup should keep exactly one of each family.
    Every extra kept member is a planting missed; a family with nothing kept is a distinct scene dropped
    (merged into another scene's group)."""
    kept = np.zeros(len(ids), bool)
    kept[kept_rows] = True
    per_family = np.bincount(ids, weights=kept, minlength=ids.max() + 1)
    planted = kinds != "original"
    missed = np.maximum(per_family - 1, 0).sum()
    by_kind = {}
    for kind in ("copy", "crop", "jitter", "jpeg"):
        fam = np.unique(ids[kinds == kind])  # each source is planted once, so its family's extra is this kind's
        by_kind[kind] = 1 - np.maximum(per_family[fam] - 1, 0).sum() / (kinds == kind).sum()
    return {"recall": float(1 - missed / planted.sum()), "recall_by_kind": {k: float(v) for k, v in by_kind.items()},
            "distinct_dropped": float((per_family == 0).mean()), "distinct": len(per_family),
            "planted": int(planted.sum())}


# -- (a) planted near-duplicates ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_dataset(tmp_path_factory.mktemp("planted") / "planted.parquet")


@pytest.mark.parametrize("search", ["global", "clusters"])
def test_dedup_finds_planted_duplicates_and_keeps_distinct_scenes(planted, tmp_path, search):
    data, ids, kinds = planted
    out = tmp_path / "dedup"
    dedup.cli(["--dataset", data, "--feature_model", "thumbnail", "--resolution", "64", "--threshold", THRESHOLD,
               "--search", search, "--output_dir", str(out)])
    meta = json.load(open(out / "dedup.json"))
    assert meta["search"] == search and meta["clusters"] == (len(ids) // 40 if search == "clusters" else 0)
    score = planted_scores(np.load(out / "kept_rows.npy"), ids, kinds)
    print(f"\nplanted duplicates, thumbnail ≥ {THRESHOLD}, {search} search: {score}")
    assert score["recall"] >= 0.95, score
    assert score["distinct_dropped"] <= 0.01, score
    assert meta["kept"] + meta["dropped"] == len(ids) == meta["rows_total"]
    assert meta["largest_groups"] and "<img" in (out / "report.html").read_text()


# -- the pieces: search, groups, loaders, sources ----------------------------------------------------


def test_clustered_search_with_every_cluster_probed_equals_the_exact_search():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    emb = centres[rng.integers(0, 50, 2000)] + 0.3 * rng.normal(size=(2000, 32))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    brute = {(i, j) for i, j in zip(*np.nonzero(np.triu(emb @ emb.T >= 0.8, 1)))}
    exact = set(zip(*dedup.near_pairs(emb, 0.8)[:2]))
    probed = set(zip(*dedup.near_pairs(emb, 0.8, clusters=16, nprobe=16)[:2]))
    own = set(zip(*dedup.near_pairs(emb, 0.8, clusters=16, nprobe=1)[:2]))
    assert exact == brute == probed and len(brute) > 1000
    assert own <= brute and len(own) > 0.8 * len(brute)  # one cluster each misses pairs across a boundary


def test_groups_are_connected_components_and_keep_their_first_member():
    groups = dedup.duplicate_groups(7, np.array([1, 3, 5]), np.array([3, 6, 6]))  # 1–3–6–5 chain; 0, 2, 4 alone
    assert groups.tolist() == [0, 1, 2, 1, 4, 1, 1]
    assert (groups == np.arange(7)).sum() == 4
    assert dedup.cluster_count(100) == 2 and dedup.cluster_count(10) == 1
    assert dedup.cluster_count(10**7) == 16_000 and dedup.cluster_count(10**7, 500) == 500


def test_feature_loaders_on_tiny_random_models(tmp_path):
    images = torch.rand(5, 3, 48, 48) * 2 - 1
    unit = lambda e: torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-5)  # noqa: E731

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    torch.jit.script(net).save(str(tmp_path / "sscd.pt"))
    e = load_features(str(tmp_path / "sscd.pt"))(images)
    expect = net(((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                 / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    assert e.shape == (5, 16) and unit(e) and torch.allclose(e, torch.nn.functional.normalize(expect), atol=1e-5)

    tower = ImageTextModel(ImageTextConfig(width=4, embed_dim=8, text_width=8, text_heads=2, text_depth=1))
    tower.save_pretrained(str(tmp_path / "imagetext"))
    e = load_features(str(tmp_path / "imagetext"))(images)
    assert e.shape == (5, 8) and unit(e) and torch.allclose(e, tower.image_features(images), atol=1e-6)

    e = load_features("thumbnail")(images)
    assert e.shape == (5, 192) and unit(e) and torch.allclose(e, thumbnail(images))
    assert torch.allclose(thumbnail(images * 0.5), e, atol=1e-5)  # a contrast change is the same thumbnail


def test_a_torchscript_feature_network_runs_the_clustered_search_end_to_end(tmp_path):
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    torch.jit.script(net).save(str(tmp_path / "sscd.pt"))
    dedup.cli(["--dataset", "shapes", "--num_images", "400", "--feature_model", str(tmp_path / "sscd.pt"),
               "--resolution", "32", "--threshold", "0.999", "--search", "clusters", "--nprobe", "2",
               "--output_dir", str(tmp_path / "out")])
    meta = json.load(open(tmp_path / "out" / "dedup.json"))
    assert (meta["clusters"], meta["nprobe"], meta["embedding_dim"]) == (10, 2, 48)
    rows = np.load(tmp_path / "out" / "kept_rows.npy")
    assert 0 < len(rows) < 400 and (np.diff(rows) > 0).all()  # the shapes world repeats itself


def test_a_cache_dedups_by_the_source_rows_it_was_made_from(tmp_path):
    cache = str(tmp_path / "cache")
    pc.precompute(parse(pc.PrecomputeConfig, ["--dataset", "shapes", "--num_images", "96", "--aspect_buckets",
                                              "false", "--shard_size", "40", "--output", cache]))
    flags = ["--resolution", "32", "--threshold", THRESHOLD]
    dedup.cli(["--dataset", cache, "--output_dir", str(tmp_path / "c")] + flags)
    dedup.cli(["--dataset", "shapes", "--num_images", "96", "--output_dir", str(tmp_path / "s")] + flags)
    assert np.array_equal(np.load(tmp_path / "c" / "kept_rows.npy"), np.load(tmp_path / "s" / "kept_rows.npy"))
    a, b = (json.load(open(tmp_path / d / "dedup.json")) for d in ("c", "s"))
    assert a["inputs"] == b["inputs"] == {"world": "shapes", "split": "train", "num_images": 96}


# -- (b) memorization ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_audit_flags_the_model_trained_on_a_repeated_image_not_the_deduplicated_one(tmp_path, capsys, monkeypatch):
    """64 distinct scenes and one scene repeated 256 times (80% of the rows). The same recipe trains
    one model on all rows and one on the rows dedup keeps (65); the audit generates the repeated
    scene's prompt from both and matches each image to the 320 training rows."""
    from base_model import mmdit

    monkeypatch.setitem(mmdit.PRESETS, "toy", {**mmdit.PRESETS["toy"], "depth": 2})  # 1.2M parameters: fast
    scenes = distinct_scenes(400)
    special = next(s for s in scenes if s.caption.startswith("four") and s.caption.endswith("squares"))
    others = [s for s in scenes if s is not special][:64]
    rows = [(render(s, 32), s.caption) for s in others] + [(render(special, 32), special.caption)] * 256
    random.Random(0).shuffle(rows)
    data = image_parquet(tmp_path / "data.parquet", *zip(*rows))
    dedup.cli(["--dataset", data, "--resolution", "32", "--threshold", THRESHOLD, "--output_dir", str(tmp_path / "dd")])
    assert len(np.load(tmp_path / "dd" / "kept_rows.npy")) == 65

    recipe = ["--dataset", data, "--max_steps", "300", "--per_device_train_batch_size", "16", "--learning_rate", "2e-3",
              "--warmup_steps", "5", "--text_drop_prob", "0.1", "--ema_decay", "0", "--dataloader_num_workers", "0",
              "--report_to", "none", "--logging_steps", "100", "--eval_steps", "1000", "--save_steps", "1000",
              "--num_samples", "2", "--sample_steps", "2"]
    capsys.readouterr()
    pretrain.cli(recipe + ["--output_dir", str(tmp_path / "dup")])
    pretrain.cli(recipe + ["--output_dir", str(tmp_path / "dedup"), "--keep_index", str(tmp_path / "dd")])
    logs = capsys.readouterr().out
    assert "288 training images" in logs and "59 training images" in logs  # 10% of each held out for validation

    (tmp_path / "prompts.txt").write_text(f"{special.caption}\n")
    out = reward_eval.main(["--model", f"dup={tmp_path / 'dup' / 'final'}", "--model",
                            f"dedup={tmp_path / 'dedup' / 'final'}", "--prompts", str(tmp_path / "prompts.txt"),
                            "--n_per_prompt", "16", "--val_images", "0", "--memorization", "--train_data", data,
                            "--feature_resolution", "32", "--memorization_threshold", THRESHOLD,
                            "--output_dir", str(tmp_path / "eval")])
    dup, ded = (out["models"][n]["memorization"] for n in ("dup", "dedup"))
    print(f"\ncopies at cosine ≥ {THRESHOLD}: trained on the repeats {dup['copy_rate']}, on the deduplicated "
          f"data {ded['copy_rate']}; nearest cosines {dup['nearest_cos']['mean']:.3f} vs {ded['nearest_cos']['mean']:.3f}")
    assert dup["copy_rate"]["mean"] >= 0.25 and ded["copies"] == 0
    repeated = {i for i, (_, c) in enumerate(rows) if c == special.caption}
    assert all(c["train_row"] in repeated for c in dup["closest"])  # the copies are of the repeated image
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Memorization" in report and "row " in report


# -- (c) bad input: one line, exit 2, nothing written ---------------------------------------------------


@pytest.fixture
def world(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "not_torchscript.pt").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    dedup.cli(["--dataset", "shapes", "--num_images", "50", "--resolution", "32", "--output_dir",
               str(tmp_path / "index50")])
    return tmp_path


CASES = {
    "missing dataset": (dedup.cli, ["--dataset", "{t}/nowhere", "--output_dir", "{t}/o"], r"nowhere.* does not exist"),
    "missing feature model": (dedup.cli, ["--feature_model", "{t}/sscd.pt", "--output_dir", "{t}/o"],
                              r"--feature_model .*sscd\.pt.*neither 'thumbnail'"),
    "not TorchScript": (dedup.cli, ["--num_images", "4", "--feature_model", "{t}/not_torchscript.pt",
                                    "--output_dir", "{t}/o"], r"not_torchscript\.pt.*not a TorchScript file"),
    "bad search": (dedup.cli, ["--search", "ivf"], r"--search 'ivf': choose from"),
    "threshold out of range": (dedup.cli, ["--threshold", "1.5"], r"--threshold 1\.5"),
    "output is a file": (dedup.cli, ["--output_dir", "{t}/a_file"], r"a_file.* not a folder"),
    "output holds a user's file": (dedup.cli, ["--output_dir", "{t}/full"], r"full.* not empty \(notes\.txt\)"),
    "too many clusters": (dedup.cli, ["--num_images", "8", "--resolution", "32", "--search", "clusters",
                                      "--clusters", "9", "--output_dir", "{t}/o"], r"--clusters 9: more than the 8"),
    "pretrain index of other data": (pretrain.cli, ["--num_train", "64", "--keep_index", "{t}/index50",
                                                    "--output_dir", "{t}/run"], r"index50.*made from other data"),
    "pretrain missing index": (pretrain.cli, ["--keep_index", "{t}/full", "--output_dir", "{t}/run"],
                               r"--keep_index .*full.*no dedup\.json"),
    "eval audit without training data": (reward_eval.main, ["--model", "a={t}/x", "--memorization"],
                                         r"--memorization needs --train_data"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, capsys, case):
    entry, argv, match = CASES[case]
    before = tree(world)
    one_line_error(capsys, entry, [a.format(t=world) for a in argv], match)
    assert tree(world) == before


def test_the_copy_threshold_follows_the_feature_network():
    from base_model.features import copy_threshold

    assert copy_threshold("thumbnail") == 0.9  # its own: 0.5 would join distinct scenes
    assert copy_threshold("sscd_disc_mixup.torchscript.pt") == 0.5  # the seed paper's, for SSCD
    assert copy_threshold("thumbnail", 0.75) == 0.75  # an explicit flag wins
