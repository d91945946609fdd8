"""Bad checkpoints are refused with an InputError naming the file (and the key), and are left as
they were: garbage or mistyped config.json, missing and unknown keys, truncated weights, a
pickled adapter."""

import hashlib
import json
import os

import pytest
import torch

from base_model.adapters import apply_adapter
from base_model.errors import InputError
from base_model.mmdit import MMDiT, preset


def tiny_checkpoint(path) -> str:
    MMDiT(preset("toy", depth=1, hidden=32, heads=2)).save_pretrained(str(path))
    return str(path)


def digests(folder) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def edit_config(path, change):
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    change(cfg)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)


def refused(path, *words):
    """from_pretrained raises an InputError naming each of `words`; the checkpoint's files are unchanged."""
    before = digests(path)
    with pytest.raises(InputError) as err:
        MMDiT.from_pretrained(str(path))
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert "\n" not in str(err.value)
    assert digests(path) == before
    return str(err.value)


def test_garbage_json_names_the_file(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"depth": 1, "hidden": ')
    refused(tmp_path / "ckpt", os.path.join(path, "config.json"), "not valid JSON")
    (tmp_path / "ckpt" / "config.json").write_text("[1, 2]")
    refused(tmp_path / "ckpt", os.path.join(path, "config.json"), "JSON object")


@pytest.mark.parametrize("key, value", [("hidden", "128"), ("depth", 1.5), ("qk_norm", 1), ("heads", True),
                                        ("mlp_ratio", "4"), ("context_dim", None)])
def test_a_wrong_type_names_the_file_and_the_key(tmp_path, key, value):
    path = tiny_checkpoint(tmp_path / "ckpt")
    edit_config(path, lambda cfg: cfg.update({key: value}))
    refused(tmp_path / "ckpt", os.path.join(path, "config.json"), repr(key), repr(value))


@pytest.mark.parametrize("key", ["depth", "heads", "pos_embed_max_size", "qk_norm"])
def test_a_missing_key_is_named_not_defaulted(tmp_path, key):
    path = tiny_checkpoint(tmp_path / "ckpt")
    edit_config(path, lambda cfg: cfg.pop(key))
    message = refused(tmp_path / "ckpt", os.path.join(path, "config.json"), "missing", repr(key))
    assert "divisible" not in message and "must cover" not in message  # no other field blamed


def test_unknown_keys_are_named(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt")
    edit_config(path, lambda cfg: cfg.update(widht=3, dropout=0.1))
    refused(tmp_path / "ckpt", os.path.join(path, "config.json"), "unknown", "'dropout'", "'widht'")


def test_values_that_do_not_fit_name_the_file(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt")
    edit_config(path, lambda cfg: cfg.update(depth=0, heads=0))
    refused(tmp_path / "ckpt", os.path.join(path, "config.json"), "depth", "positive")
    edit_config(path, lambda cfg: cfg.update(depth=1, heads=3))
    refused(tmp_path / "ckpt", os.path.join(path, "config.json"), "divisible")


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5])
def test_truncated_weights_name_the_file(tmp_path, keep):
    path = tiny_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    refused(tmp_path / "ckpt", os.path.join(path, "model.safetensors"))


def test_weights_of_another_shape_name_both_files(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt")
    edit_config(path, lambda cfg: cfg.update(hidden=64))
    refused(tmp_path / "ckpt", os.path.join(path, "model.safetensors"), os.path.join(path, "config.json"))


def test_a_valid_checkpoint_still_loads(tmp_path):
    model = MMDiT(preset("toy", depth=1, hidden=32, heads=2))
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = MMDiT.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_pickled_adapter_is_refused_unread(tmp_path):
    base = tiny_checkpoint(tmp_path / "ckpt")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(b"not read: a pickle could run code")
    with pytest.raises(InputError, match=r"adapter_model\.safetensors") as err:
        apply_adapter(MMDiT.from_pretrained(base), base, str(adapter))
    assert str(adapter) in str(err.value) and "adapter_model.bin" in str(err.value)
