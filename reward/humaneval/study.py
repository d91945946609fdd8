"""A study's life outside the server: create it (sample both models), invite annotators, export.

Models are named on the command line; the first is A (the reference), the second B, and every win
rate is B's over A. Both draw each item from the same prompt and the same seed.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter

import numpy as np

from base_model.errors import InputError

from . import db

QUESTIONS = {  # key → the question an annotator answers; "overall" is the preference exported
    "overall": "Which image do you prefer overall?",
    "adherence": "Which image follows the prompt better?",
    "quality": "Which image has the better visual quality?",
}


def sample_images(spec: str, prompts: list[str], seeds: list[int], sampler: dict) -> list[np.ndarray]:
    """One uint8 (H, W, 3) image per (prompt, seed) from a model spec (see base_model.adapters);
    `sampler`: solver, steps, guidance, shift."""
    from base_model.adapters import load
    from base_model.shapes import to_uint8

    gen = load(spec, sample_shift=sampler["shift"])
    images = gen.generate(prompts, seeds, sampler["steps"], sampler["guidance"], solver=sampler["solver"])
    return [to_uint8(x) for x in images]


def create_study(db_path: str, images: str, models: dict[str, str], items: list[tuple], votes_per_item: int = 3,
                 info: dict | None = None) -> str:
    """Write a new study: `models` {name: spec} (A first, then B), `items` (prompt, seed, image_a,
    image_b) with uint8 (H, W, 3) images, saved as PNG under `images`. Returns the admin token."""
    from PIL import Image

    if len(models) != 2:
        raise InputError(f"a study compares two models, got {len(models)}: {list(models)}")
    if votes_per_item < 1:
        raise InputError("--votes_per_item must be ≥ 1")
    if os.path.exists(db_path):
        raise InputError(f"--db {db_path!r} exists; a study is created once (pick another --db)")
    os.makedirs(images, exist_ok=True)
    rows = []
    for prompt, seed, image_a, image_b in items:
        names = [f"{secrets.token_hex(8)}.png" for _ in range(2)]
        for name, image in zip(names, (image_a, image_b)):
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(os.path.join(images, name))
        rows.append((prompt, int(seed), *names))
    admin = secrets.token_urlsafe(24)
    conn = db.init(db_path)
    with db.write(conn):
        conn.executemany("INSERT INTO items (prompt, seed, image_a, image_b) VALUES (?, ?, ?, ?)", rows)
        (a, spec_a), (b, spec_b) = models.items()
        db.put(conn, "models", {"A": {"name": a, "spec": spec_a}, "B": {"name": b, "spec": spec_b}})
        db.put(conn, "images", os.path.relpath(os.path.abspath(images), os.path.dirname(os.path.abspath(db_path))))
        db.put(conn, "votes_per_item", votes_per_item)
        db.put(conn, "admin_token_sha256", db.token_hash(admin))
        db.put(conn, "created_at", time.time())
        db.put(conn, "info", info or {})
    conn.close()
    return admin


def create(db_path: str, images: str, models: dict[str, str], prompts: list[str], sampler: dict,
           n_per_prompt: int = 2, votes_per_item: int = 3, seed: int = 0) -> str:
    """Sample both models on every prompt with seeds seed + p·n_per_prompt + j, then `create_study`.
    `sampler`: solver, steps, guidance, shift (the CLI's defaults are the shapes world's)."""
    if os.path.exists(db_path):  # fail before minutes of sampling, not after
        raise InputError(f"--db {db_path!r} exists; a study is created once (pick another --db)")
    captions = [p for p in prompts for _ in range(n_per_prompt)]
    seeds = [seed + i for i in range(len(captions))]
    a, b = (sample_images(spec, captions, seeds, sampler) for spec in models.values())
    info = {**sampler, "seed": seed, "n_per_prompt": n_per_prompt}
    return create_study(db_path, images, models, list(zip(captions, seeds, a, b)), votes_per_item, info)


def invite(db_path: str, n: int, prefix: str = "annotator") -> list[tuple[str, str]]:
    """n new annotators → [(name, token)]. Tokens are shown once: only their hashes are stored."""
    conn = db.open_study(db_path)
    out = []
    with db.write(conn):
        start = conn.execute("SELECT COUNT(*) FROM annotators").fetchone()[0]
        for i in range(n):
            name, token = f"{prefix}-{start + i + 1}", secrets.token_urlsafe(24)
            conn.execute("INSERT INTO annotators (name, token_sha256, created_at) VALUES (?, ?, ?)",
                         (name, db.token_hash(token), time.time()))
            out.append((name, token))
    conn.close()
    return out


def new_admin_token(db_path: str) -> str:
    """Replace the admin token (the old one stops working)."""
    conn = db.open_study(db_path)
    token = secrets.token_urlsafe(24)
    with db.write(conn):
        db.put(conn, "admin_token_sha256", db.token_hash(token))
    conn.close()
    return token


def majority(choices: list[str]) -> tuple[float, float]:
    """(label_0, label_1) for model A, B from one item's votes: the plurality choice wins; a
    plurality of ties, or two choices level at the top, is a tie (0.5, 0.5)."""
    top = Counter(choices).most_common()
    if (len(top) > 1 and top[0][1] == top[1][1]) or top[0][0] == "tie":
        return 0.5, 0.5
    return (1.0, 0.0) if top[0][0] == "A" else (0.0, 1.0)


def export(db_path: str, output: str, question: str = "overall", overwrite: bool = False) -> dict:
    """Per item with votes on `question`: the majority label, as a Pick-a-Pic-schema `datasets`
    folder (jpg_0 = model A's image, jpg_1 = model B's; PNG bytes). Returns a summary."""
    from base_model.pickapic import check_replaceable, write_pairs

    check_replaceable(os.path.normpath(output), overwrite)
    if question not in QUESTIONS:
        raise InputError(f"--question {question!r}: choose from {list(QUESTIONS)}")
    conn = db.open_study(db_path)
    models, folder = db.get(conn, "models"), db.images_dir(conn, db_path)
    votes: dict[int, list[str]] = {}
    for r in conn.execute("SELECT item_id, choice FROM votes WHERE question = ? ORDER BY item_id", (question,)):
        votes.setdefault(r["item_id"], []).append(r["choice"])
    rows = []
    for item in conn.execute("SELECT * FROM items ORDER BY id"):
        if item["id"] not in votes:
            continue
        label_0, label_1 = majority(votes[item["id"]])
        jpg = []
        for col in ("image_a", "image_b"):
            with open(db.image_file(folder, item[col]), "rb") as f:
                jpg.append(f.read())
        n = Counter(votes[item["id"]])
        rows.append({"caption": item["prompt"], "jpg_0": jpg[0], "jpg_1": jpg[1], "label_0": label_0,
                     "label_1": label_1, "model_0": models["A"]["spec"], "model_1": models["B"]["spec"],
                     "ranking_id": item["id"], "image_0_uid": item["image_a"], "image_1_uid": item["image_b"],
                     "best_image_uid": {1.0: item["image_a"], 0.0: item["image_b"]}.get(label_0, ""),
                     "seed": item["seed"], "votes_0": n["A"], "votes_1": n["B"], "votes_tie": n["tie"]})
    conn.close()
    if not rows:
        raise InputError(f"{db_path!r}: no item has a vote on {question!r} yet; nothing to export")
    summary = {"items": len(rows), "question": question, "a_wins": sum(r["label_0"] == 1.0 for r in rows),
               "b_wins": sum(r["label_1"] == 1.0 for r in rows), "ties": sum(r["label_0"] == 0.5 for r in rows)}
    write_pairs(rows, output, {"summary": summary, "models": models, "db": os.path.abspath(db_path)}, overwrite)
    return summary
