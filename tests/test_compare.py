"""align.compare on a tiny random base: runs each method per seed, caches results, best-of-N at
equal reward calls, the gain's CI, and the reward-hacking audit (diversity, FD, proxy)."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import yaml

from align import compare
from reward.imagetext import ImageTextConfig, ImageTextModel
from tests.conftest import save_tiny_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gain_ci_by_hand():
    base = np.zeros(8)
    same = compare.gain_ci(base, [np.ones(8)] * 3, k=2)
    assert same["mean"] == 1.0 and same["ci95"] == [1.0, 1.0] and same["per_seed"] == [1.0] * 3
    mixed = compare.gain_ci(base, [np.ones(8), np.zeros(8)], k=2)  # seeds disagree: the CI spans them
    assert mixed["mean"] == 0.5 and mixed["ci95"][0] == 0.0 and mixed["ci95"][1] == 1.0


def test_best_of_curve_and_break_even_by_hand():
    scores = [[0.2, 0.9, 0.5], [0.7, 0.7, 0.1]]  # image 1: a tie between its first two candidates
    correct = [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    np.testing.assert_array_equal(compare.best_of_curve(scores, correct), [[0, 1], [1, 1], [1, 1]])
    # 900 calls gaining 0.25: best-of-2 gains 0.2, best-of-3 0.3 → n* = 3, cheaper beyond 900 / 3 images
    assert compare.break_even_images(900, 0.25, [0.0, 0.2, 0.3]) == 300
    assert compare.break_even_images(900, 0.2, [0.0, 0.2, 0.3]) == 450  # best-of-2 reaches it exactly
    assert compare.break_even_images(900, 0.4, [0.0, 0.2, 0.3]) is None
    assert compare.break_even_images(900, -0.1, [0.0, 0.2, 0.3]) == float("inf")  # no better than the base


def test_pooled_gain_ci_by_hand():
    # base A: both seeds gain 1 on every prompt; base B: both gain 0. Mean 0.5 over bases; resampling bases spans 0 … 1
    a, b = np.ones((2, 4)), np.zeros((2, 4))
    pooled = compare.pooled_gain_ci([a, b])
    assert pooled["mean"] == 0.5 and pooled["ci95"] == [0.0, 1.0]
    assert pooled["per_base"] == [1.0, 0.0] and pooled["per_seed"] == [[1.0, 1.0], [0.0, 0.0]]
    # bases of unequal seed counts weigh equally: (1 + 1/3) / 2, not the mean over all 4 seeds (0.5)
    assert compare.pooled_gain_ci([np.ones((1, 4)), np.array([[1.0] * 4, [0.0] * 4, [0.0] * 4])])["mean"] == \
        pytest.approx((1 + 1 / 3) / 2)
    # one base: exactly gain_ci's numbers (the same draws)
    rng = np.random.default_rng(1)
    base, runs = rng.integers(0, 2, 40).astype(float), [rng.integers(0, 2, 40).astype(float) for _ in range(3)]
    one = compare.gain_ci(base, runs, k=4)
    diffs = np.stack([r - base for r in runs]).reshape(3, -1, 4).mean(2)
    assert compare.pooled_gain_ci([diffs])["ci95"] == one["ci95"]


def test_geneval_overall_gain_by_hand():
    # k = 2; prompts 0 and 1 are task a, prompt 2 task b. The run gets prompts 0 and 2 right, the base nothing:
    # task a gains 0.5, task b 1, overall (the unweighted task mean) 0.75 where the per-image mean is 2/3
    tasks, base, run = ["a"] * 4 + ["b"] * 2, np.zeros(6), np.array([1.0, 1, 0, 0, 1, 1])
    assert compare.geneval_overall(run, tasks) == 0.75 and compare.gain_ci(base, [run], k=2)["mean"] == 2 / 3
    g = compare.task_gain_ci(base, [run, run], tasks, k=2)
    assert g["mean"] == 0.75 and g["per_seed"] == [0.75, 0.75]
    assert g["ci95"] == [0.5, 1.0]  # task a's two prompts resampled: 0, 0.5 or 1; task b always 1
    assert g["tasks"]["a"] == {"gain": 0.5, "ci95": [0.0, 1.0], "prompts": 2}
    assert g["tasks"]["b"] == {"gain": 1.0, "ci95": [1.0, 1.0], "prompts": 1}


def test_audit_copies_by_hand():
    run = {"proxy": [1.0], "diversity": [0.5], "fd": 0.1, "strict": [1.0]}
    a = compare.audit_summary([{**run, "copy_cos": [0.95, 0.2, 0.1, 0.1]}, {**run, "copy_cos": [0.9, 0.9, 0.0, 0.0]}],
                              k=2, copy_at=0.9)
    assert a["copies"]["mean"] == 3 / 8 and a["copies"]["n"] == 8 and a["copies"]["threshold"] == 0.9
    lo, hi = a["copies"]["ci95"]  # prompt 0 holds every copy (3 of 4), prompt 1 none: resampling prompts spans 0 … 0.75
    assert lo == 0.0 and hi == 0.75
    assert "copies" not in compare.audit_summary([run], k=2, copy_at=0.9)


def test_config_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base": "b", "methods": {"x": {"config": "c.yaml"}}}))
    with pytest.raises(ValueError, match=r"c.yaml: methods.x needs 'module'"):
        compare.load_config(str(path), {})
    path.write_text(yaml.safe_dump({"base": "b", "methods": {}, "typo": 1}))
    with pytest.raises(ValueError, match=r"c.yaml: .*typo"):
        compare.load_config(str(path), {})
    path.write_text(yaml.safe_dump({"base": "b", "methods": {"bon": {"best_of_n": "nope"}}}))
    with pytest.raises(ValueError, match=r"best_of_n names 'nope'"):
        compare.load_config(str(path), {})


@pytest.mark.slow
def test_compare_runs_seeds_caches_and_audits(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = save_tiny_base(str(tmp_path / "base"))
    audit = str(tmp_path / "imagetext")
    ImageTextModel(ImageTextConfig(width=8, embed_dim=16, text_width=16, text_heads=2, text_depth=1)).save_pretrained(audit)
    small = {"prompts_per_round": 2, "k": 2, "rounds": 1, "steps_per_round": 1, "per_device_train_batch_size": 2,
             "sample_steps": 2, "num_samples": 2, "lora_r": 2, "lora_alpha": 2, "report_to": "none",
             "reward": "py:tests.test_online:redness"}
    cfg = {"base": base, "output_dir": str(tmp_path / "cmp"), "seeds": [0, 1], "splits": ["val"], "n_prompts": 3,
           "n_per_prompt": 2, "audit_model": audit, "train_num_images": 64,
           "methods": {"raft": {"module": "align.online", "flags": {**small, "method": "raft", "raft_threshold": -9.0}},
                       "bon": {"best_of_n": "raft"}}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    compare.main(["--config", str(path)])
    res = json.load(open(tmp_path / "cmp" / "compare.json"))
    raft, bon = res["methods"]["raft"], res["methods"]["bon"]
    assert raft["reward_calls"] == 4 and len(raft["splits"]["val"]["gain"]["per_seed"]) == 2
    assert bon["best_of"] == 2  # 4 reward calls over 6 images → at least 2 candidates each
    curve = bon["splits"]["val"]["curve"]  # best-of-1 and best-of-2 from the same candidates
    assert [c["n"] for c in curve] == [1, 2] and curve[-1]["accuracy"] == bon["splits"]["val"]["accuracy"]
    overall = raft["splits"]["val"]["geneval"]
    assert 0 <= overall["overall"] <= 1 and set(overall["gain"]["tasks"]) <= {"single_object", "two_object", "counting",
                                                                                 "colors", "position", "color_attr"}
    audit_row = raft["splits"]["val"]["audit"]
    assert {"proxy", "diversity", "fd", "flags", "proxy_gain"} <= set(audit_row) and audit_row["fd"] >= 0
    assert audit_row["copies"]["n"] == 2 * 3 * 2 and 0 <= audit_row["copies"]["mean"] <= 1  # seeds × prompts × k
    assert os.path.isfile(tmp_path / "cmp" / "compare.html")
    done = tmp_path / "cmp" / "raft" / "seed-0" / "result.json"
    stamp = os.path.getmtime(done)
    compare.main(["--config", str(path)])  # everything cached: no run again
    assert os.path.getmtime(done) == stamp
    compare.main(["--config", str(path), "--methods", "raft"])  # one method again: the other rows are kept
    again = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert list(again["methods"]) == list(res["methods"]) and again["methods"]["bon"] == res["methods"]["bon"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "compare", "*.yaml"))))
def test_every_compare_config_loads_and_names_real_flags(path):
    """A typo in a method's flags would only surface as a parser error minutes into a comparison."""
    from align.dpo import DPOConfig
    from align.online import OnlineConfig

    fields = {m: {f.name for f in dataclasses.fields(c)} for m, c in (("align.online", OnlineConfig),
                                                                      ("align.dpo", DPOConfig))}
    cfg = compare.load_config(path, {})
    for name, m in cfg.methods.items():
        if "best_of_n" in m:
            continue
        unknown = set(m.get("flags", {})) - fields[m["module"]]
        assert not unknown, f"{path}: {name} {unknown}"
        if m.get("config"):
            assert os.path.exists(os.path.join(ROOT, m["config"])), f"{path}: {name}: {m['config']}"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "online", "*.yaml")))
                         + [os.path.join(ROOT, "configs", "demo", f) for f in ("nft.yaml", "raft.yaml")])
def test_every_online_preset_parses(path):
    from align.online import OnlineConfig
    from base_model.cli import parse

    assert parse(OnlineConfig, ["--config", path]).rounds > 0


def test_the_recommended_online_preset_is_its_comparison_row(monkeypatch):
    """configs/online/toy_nft.yaml says it is configs/compare/toy.yaml's row nft_r4_cos3_p16_s6_r56_cr written out:
    the preset and the row's command parse to the same config (only the output folder differs)."""
    from align.online import OnlineConfig
    from base_model.cli import parse
    from base_model.runs import command

    monkeypatch.chdir(ROOT)
    row = compare.load_config("configs/compare/toy.yaml", {}).methods["nft_r4_cos3_p16_s6_r56_cr"]
    argv = command("align.online", row["config"], {**row["flags"], "output_dir": "out"})
    assert argv[1:3] == ["-m", "align.online"]
    preset = parse(OnlineConfig, ["--config", "configs/online/toy_nft.yaml", "--output_dir", "out"])
    assert parse(OnlineConfig, argv[3:]) == preset
    assert preset != parse(OnlineConfig, ["--config", "configs/online/toy.yaml", "--output_dir", "out"])
