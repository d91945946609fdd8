"""The data cache: precompute (resume after a kill, buckets, pairs, bad rows), the memory-mapped
reader (corrupt shards, other encoders) and the global-batch order (disjoint per process, O(1) resume)."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from base_model import precompute as pc
from base_model.buckets import assign, bucket_table, merge_small
from base_model.cache import Cache, GlobalBatches, check_conditioning, rank_slice
from base_model.cli import parse
from base_model.data import to_model_space
from base_model.errors import InputError
from base_model.pickapic import encode_png, pairs_dataset
from base_model.shapes import make_split, render
from base_model.sources import read_prompts


def config(*flags):
    return parse(pc.PrecomputeConfig, list(flags))


def png(h, w, value=100):
    return encode_png(np.full((h, w, 3), value, np.uint8))


def image_parquet(path, sizes, bad=()):
    import datasets

    rows = [{"image": {"bytes": b"not an image" if i in bad else png(h, w, i % 250), "path": f"img{i}.png"},
             "caption": f"caption {i % 7}"} for i, (h, w) in enumerate(sizes)]
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    return str(path)


def all_rows(cache_dir):
    c = Cache(str(cache_dir))
    return np.concatenate([np.load(os.path.join(cache_dir, s["name"], "rows.npy")) for s in c.shards])


# -- buckets ------------------------------------------------------------------------------------

def test_bucket_table_keeps_the_budget_and_the_multiple():
    table = bucket_table(256 * 256, 32)
    assert table[0] == (256, 256)
    for h, w in table:
        assert h % 32 == 0 and w % 32 == 0 and 0.8 < h * w / 256 ** 2 < 1.2
    assert table[assign(1000, 500, table)][1] > table[assign(1000, 500, table)][0]  # wide → wide bucket


def test_small_bucket_merges_into_nearest_neighbour_never_dropped():
    table = [(32, 32), (24, 40), (40, 24), (24, 48)]
    assert merge_small([10, 3, 8, 2], table, 4) == [0, 1, 2, 1]  # 24x48 → 24x40, now 5 ≥ 4
    assert merge_small([10, 3, 8, 2], table, 8) == [0, 0, 2, 0]  # … and 24x40 (5 < 8) → the square
    assert merge_small([1, 1, 0, 0], table, 8) == [1, 1, 2, 3]  # one bucket left, kept though small


def test_mixed_sizes_land_in_their_buckets_and_a_small_bucket_is_merged(tmp_path):
    sizes = [(32, 32)] * 10 + [(20, 40)] * 9 + [(40, 20)] * 2  # square, wide, and 2 tall ones
    data = image_parquet(tmp_path / "d.parquet", sizes)
    out = pc.precompute(config("--dataset", data, "--min_bucket", "4", "--shard_size", "4",
                               "--output", str(tmp_path / "c")))
    c = Cache(out)
    assert c.manifest["bucket_counts"] == {"32x32": 12, "24x48": 9}  # tall (48x24) folded into the square
    by_bucket = {tuple(c.manifest["buckets"][b]): ids for b, ids in c.buckets().items()}
    assert len(by_bucket[(24, 48)]) == 9 and len(by_bucket[(32, 32)]) == 12
    batch = c.read(by_bucket[(24, 48)][:3])
    assert batch["x"].shape == (3, 3, 24, 48) and batch["context"].shape == (3, 16, 384)
    rows = all_rows(out)
    assert sorted(rows.tolist()) == list(range(21))


# -- precompute ---------------------------------------------------------------------------------

def test_cache_holds_the_images_and_one_text_row_per_distinct_caption(tmp_path):
    out = pc.precompute(config("--num_images", "40", "--shard_size", "16", "--output", str(tmp_path / "c"),
                               "--prompts", "two blue squares"))
    c = Cache(out)
    scenes = make_split("train", 40)
    assert len(c) == 40 and c.manifest["text"]["count"] == len({s.caption for s in scenes} | {"two blue squares"})
    batch = c.read(np.array([5, 30]))
    want = to_model_space(torch.from_numpy(np.stack([render(scenes[5]), render(scenes[30])])).permute(0, 3, 1, 2))
    assert torch.allclose(batch["x"], want, atol=2e-3)
    from base_model.text import TextEmbedder
    context, pooled = TextEmbedder(["minilm"]).encode([scenes[5].caption])
    assert torch.allclose(batch["context"][0], context[0], atol=2e-3)
    assert torch.allclose(c.text(c.text_ids(["two blue squares"]))[1][0],
                          TextEmbedder(["minilm"]).encode(["two blue squares"])[1][0], atol=2e-3)


def test_killed_precompute_resumes_without_duplicates_or_gaps(tmp_path, monkeypatch):
    flags = ["--num_images", "50", "--shard_size", "8", "--min_bucket", "8"]
    ref = pc.precompute(config(*flags, "--output", str(tmp_path / "ref")))
    real, calls = pc.encode_images, {"n": 0}

    def killed_at_third_shard(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(pc, "encode_images", killed_at_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pc.precompute(config(*flags, "--output", str(tmp_path / "run")))
    done = sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("shard-"))
    assert done == ["shard-00000", "shard-00001"]  # the third was never put in place
    monkeypatch.setattr(pc, "encode_images", real)
    written = {d: os.path.getmtime(tmp_path / "run" / d / "x.npy") for d in done}
    pc.precompute(config(*flags, "--output", str(tmp_path / "run")))
    assert {d: os.path.getmtime(tmp_path / "run" / d / "x.npy") for d in done} == written  # not redone
    assert sorted(all_rows(tmp_path / "run").tolist()) == list(range(50))
    a, b = Cache(ref), Cache(str(tmp_path / "run"))
    assert torch.equal(a.read(np.arange(50))["x"], b.read(np.arange(50))["x"])
    with pytest.raises(InputError, match="num_images|inputs"):  # other flags: refused, not mixed in
        pc.precompute(config("--num_images", "60", "--shard_size", "8", "--output", str(tmp_path / "run")))


def test_undecodable_rows_are_skipped_counted_and_named_and_too_many_stop(tmp_path):
    data = image_parquet(tmp_path / "d.parquet", [(32, 32)] * 200, bad=(7,))
    out = pc.precompute(config("--dataset", data, "--output", str(tmp_path / "c"), "--min_bucket", "8"))
    m = Cache(out).manifest
    assert m["skipped"] == 1 and "img7.png" in m["bad"][0] and len(Cache(out)) == 199
    data = image_parquet(tmp_path / "e.parquet", [(32, 32)] * 50, bad=(3, 9))
    with pytest.raises(InputError, match="img3.png.*img9.png"):
        pc.precompute(config("--dataset", data, "--output", str(tmp_path / "e")))


def test_pairs_drop_like_load_pairs_and_take_jpg0s_bucket(tmp_path):
    from align.pairs import load_pairs

    def pair(i, label_0=1.0, **kw):
        return {"caption": f"p{i}", "jpg_0": png(20, 40, 10 * i), "jpg_1": png(40, 40, 200), "label_0": label_0,
                "label_1": 1.0 - label_0, **kw}
    rows = [pair(0), pair(1, 0.0), pair(2, 0.5), pair(3, has_label=False), pair(4, are_different=False),
            pair(5), pair(6)]
    path = str(tmp_path / "p.parquet")
    pairs_dataset(rows).to_parquet(path)
    out = pc.precompute(config("--pairs", path, "--output", str(tmp_path / "c"), "--min_bucket", "1"))
    c = Cache(out)
    assert c.manifest["dropped"] == load_pairs(path, 32).dropped == {"tie": 1, "no_label": 1, "not_different": 1,
                                                                     "bad": 0}
    (bucket, ids), = c.buckets().items()
    assert tuple(c.manifest["buckets"][bucket]) == (24, 48) and len(ids) == 4  # jpg_0 is wide: both images wide
    batch = c.read(ids)
    assert batch["chosen"].shape == batch["rejected"].shape == (4, 3, 24, 48)
    rows_of = np.load(os.path.join(out, c.shards[0]["name"], "rows.npy")).tolist()
    swapped = rows_of.index(1)  # label_0 = 0: jpg_1 (the flat 200) is the winner
    assert batch["chosen"][swapped].mean() == pytest.approx(200 / 127.5 - 1, abs=1e-2)


# -- reading: errors name the shard or the mismatch ---------------------------------------------

def test_corrupt_shard_and_other_encoders_are_named(tmp_path):
    out = pc.precompute(config("--num_images", "20", "--shard_size", "8", "--min_bucket", "4",
                               "--output", str(tmp_path / "c")))
    with pytest.raises(InputError, match=r"made with text encoders \['minilm'\].*uses \['clip:/m'\]"):
        check_conditioning(out, Cache(out).manifest, ["clip:/m"], "pixels")
    with pytest.raises(InputError, match="image space 'pixels'.*'vae:/v'"):
        check_conditioning(out, Cache(out).manifest, ["minilm"], "vae:/v")
    file = os.path.join(out, "shard-00001", "x.npy")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    c = Cache(out)
    c.read(np.arange(8))  # shard 0 is fine
    with pytest.raises(InputError, match="shard-00001"):
        c.read(np.arange(8, 12))
    shutil.rmtree(os.path.join(out, "shard-00002"))
    with pytest.raises(InputError, match="shard-00002"):
        Cache(out).read(np.arange(16, 20))


# -- the global-batch order ---------------------------------------------------------------------

def test_one_prompt_reader_for_splits_and_files(tmp_path):
    """`read_prompts`, used by pairs, the online rounds, eval and the human-eval app: a split gives
    scenes (n of them, after an offset), a file its lines (all when n is None); bad input names the file."""
    captions, scenes = read_prompts("heldout_prompts", 3, offset=2)
    assert scenes == make_split("heldout_prompts", 5)[2:] and captions == [s.caption for s in scenes]
    with pytest.raises(InputError, match="'train' is a shapes-world split"):
        read_prompts("train")
    path = tmp_path / "prompts.txt"
    path.write_text(" a red square\na blue circle\ntwo green triangles\n")
    assert read_prompts(str(path)) == (["a red square", "a blue circle", "two green triangles"], None)
    assert read_prompts(str(path), 1, offset=1)[0] == ["a blue circle"]
    with pytest.raises(InputError, match=r"--prompts '.*prompts.txt': no prompt after line 3"):
        read_prompts(str(path), offset=3)
    path.write_text("a red square\n\na blue circle\n")
    with pytest.raises(InputError, match=r"prompts.txt', line 2: empty prompt"):
        read_prompts(str(path))
    with pytest.raises(FileNotFoundError, match="--dataset 'nowhere.txt': neither a shapes-world split"):
        read_prompts("nowhere.txt", flag="--dataset")


def test_global_batches_are_disjoint_per_process_and_resume_in_o1():
    buckets = {0: np.arange(0, 37), 3: np.arange(37, 60)}
    g = GlobalBatches(buckets, 8, seed=5)
    assert g.per_epoch == 4 + 2
    epoch = [g(k) for k in range(g.per_epoch)]
    seen = np.concatenate([ids for _, ids in epoch])
    assert len(set(seen.tolist())) == len(seen) == 48  # no sample twice in an epoch
    for b, ids in epoch:
        assert set(ids.tolist()) <= set(buckets[b].tolist())  # one bucket per global batch
        parts = [rank_slice(ids, r, 2) for r in range(2)]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert np.array_equal(np.concatenate(parts), ids)  # the union is the global batch
    fresh = GlobalBatches(buckets, 8, seed=5)
    assert np.array_equal(fresh(13)[1], g(13)[1]) and fresh(13)[0] == g(13)[0]  # no replay of 0…12
    assert not np.array_equal(g(0)[1], g(g.per_epoch)[1]) or g(0)[0] != g(g.per_epoch)[0]  # a new epoch reshuffles
    with pytest.raises(InputError, match="min_bucket 8"):
        GlobalBatches({0: np.arange(10), 1: np.arange(10, 15)}, 8, seed=0)


def test_each_process_reads_its_slice_and_the_slices_make_the_global_batch(tmp_path):
    from base_model.cache import loader

    out = pc.precompute(config("--num_images", "40", "--shard_size", "16", "--min_bucket", "8",
                               "--output", str(tmp_path / "c")))
    c = Cache(out)
    batches = GlobalBatches(c.buckets(), 8, seed=1)
    per_rank = [list(loader(Cache(out), batches, r, 2, 3, 7, num_workers=1)) for r in range(2)]
    single = list(loader(Cache(out), batches, 0, 1, 3, 7, num_workers=0))
    for k, (a, b, one) in enumerate(zip(*per_rank, single)):
        assert not set(a["ids"].tolist()) & set(b["ids"].tolist())
        assert torch.cat([a["ids"], b["ids"]]).tolist() == batches(3 + k)[1].tolist() == one["ids"].tolist()
        assert torch.equal(torch.cat([a["x"], b["x"]]), one["x"])


def test_two_processes_write_disjoint_shards_of_the_same_cache(tmp_path):
    import subprocess
    import sys

    flags = ["--num_images", "40", "--shard_size", "8", "--min_bucket", "8"]
    ref = pc.precompute(config(*flags, "--output", str(tmp_path / "one")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "2",
           "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "base_model.precompute", *flags, "--output", str(tmp_path / "two")]
    p = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "precompute (rank 1)" in p.stderr  # both processes encoded
    a, b = Cache(ref), Cache(str(tmp_path / "two"))
    assert torch.equal(a.read(np.arange(40))["x"], b.read(np.arange(40))["x"])
    assert sorted(all_rows(tmp_path / "two").tolist()) == list(range(40))


def test_max_side_keeps_buckets_a_model_can_take(tmp_path):
    data = image_parquet(tmp_path / "d.parquet", [(32, 32)] * 4 + [(20, 40)] * 4)
    out = pc.precompute(config("--dataset", data, "--min_bucket", "1", "--max_side", "32", "--output", str(tmp_path / "c")))
    assert Cache(out).manifest["bucket_counts"] == {"32x32": 8}  # no bucket wider than the position table


def test_webdataset_tar_shards_are_read_by_key_with_txt_or_json_captions(tmp_path):
    """Two shards: members grouped by key; png / jpg / webp images with .txt or .json captions; a
    corrupt image is skipped and named; the pixels match the same images read from parquet."""
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def encoded(h, w, value, fmt):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        return buf.getvalue()

    (tmp_path / "wds").mkdir()
    sizes, kinds = [(32, 32)] * 6 + [(20, 40)] * 4, ["PNG", "JPEG", "WEBP"]
    for shard in range(2):
        with tarfile.open(tmp_path / "wds" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 5, shard * 5 + 5):
                fmt = kinds[i % 3]
                ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
                add(tar, f"s/{i:04d}.{ext}", b"broken" if i == 7 else encoded(*sizes[i], 10 * i, fmt))
                if i % 2:
                    add(tar, f"s/{i:04d}.json", json.dumps({"caption": f"caption {i % 3}", "w": 1}).encode())
                else:
                    add(tar, f"s/{i:04d}.txt", f"caption {i % 3}\n".encode())
    out = pc.precompute(config("--dataset", str(tmp_path / "wds"), "--min_bucket", "2", "--max_bad_fraction", "0.2",
                               "--output", str(tmp_path / "c")))
    c = Cache(out)
    assert len(c) == 9 and c.manifest["bucket_counts"] == {"32x32": 6, "24x48": 3}
    assert c.manifest["text"]["count"] == 3 and len(c.manifest["bad"]) == 1
    assert "00001.tar:s/0007" in c.manifest["bad"][0]
    assert sorted(all_rows(out).tolist()) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    square = c.read(c.buckets()[[b for b, hw in enumerate(c.manifest["buckets"]) if hw == [32, 32]][0]])
    levels = sorted({round(float(v)) for v in ((square["x"] + 1) * 127.5).mean((1, 2, 3))})  # lossy jpg, webp
    assert levels == [0, 10, 20, 30, 40, 50]  # each image decoded, in its own sample
