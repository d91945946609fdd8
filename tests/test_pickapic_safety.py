"""write_pairs replaces only what it wrote: a folder of pairs is swapped for the new one, anything else
at the output path (a file, a folder of other files) is refused, untouched, with no temporary left."""

import json
import os

import datasets
import numpy as np
import pytest

from base_model.errors import InputError
from base_model.pickapic import encode_png, write_pairs

IMAGE = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))


def rows(n):
    return [{"caption": f"prompt {i}", "jpg_0": IMAGE, "jpg_1": IMAGE, "label_0": 1.0, "label_1": 0.0}
            for i in range(n)]


def test_writes_then_replaces_its_own_folder_only_when_told(tmp_path):
    out = tmp_path / "pairs"
    write_pairs(rows(2), str(out), {"run": 1})
    with pytest.raises(InputError, match="already holds pairs.*--overwrite_output_dir"):
        write_pairs(rows(3), str(out), {"run": 2})
    assert json.loads((out / "pairs_info.json").read_text()) == {"run": 1}
    write_pairs(rows(3), str(out) + "/", {"run": 2}, overwrite=True)  # its own folder: replaced whole
    assert len(datasets.load_from_disk(str(out))) == 3
    assert json.loads((out / "pairs_info.json").read_text()) == {"run": 2}
    assert os.listdir(tmp_path) == ["pairs"]  # no temporary folder left


def test_an_empty_folder_is_used(tmp_path):
    (tmp_path / "pairs").mkdir()
    write_pairs(rows(1), str(tmp_path / "pairs"), {})
    assert len(datasets.load_from_disk(str(tmp_path / "pairs"))) == 1


@pytest.mark.parametrize("extra", ["notes.txt", "data-00000-of-00001.arrow.bak", "sub/"])
def test_a_folder_holding_other_files_is_refused_untouched(tmp_path, extra):
    out = tmp_path / "pairs"
    write_pairs(rows(2), str(out), {"run": 1})
    if extra.endswith("/"):
        (out / extra).mkdir()
    else:
        (out / extra).write_text("mine")
    before = sorted(os.listdir(out))
    with pytest.raises(InputError, match=f"{out}.*{extra.rstrip('/')}"):
        write_pairs(rows(3), str(out), {"run": 2}, overwrite=True)
    assert sorted(os.listdir(out)) == before and len(datasets.load_from_disk(str(out))) == 2
    assert sorted(os.listdir(tmp_path)) == ["pairs"]


def test_a_folder_without_our_marker_is_refused(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "state.json").write_text("{}")  # a name we write, but not a folder we wrote
    with pytest.raises(InputError, match="results"):
        write_pairs(rows(1), str(out), {})
    assert os.listdir(out) == ["state.json"]


def test_an_existing_file_is_refused_with_no_temporary_left(tmp_path):
    out = tmp_path / "pairs.parquet"
    out.write_text("precious")
    with pytest.raises(InputError, match="pairs.parquet.*not a folder"):
        write_pairs(rows(1), str(out), {})
    assert out.read_text() == "precious" and os.listdir(tmp_path) == ["pairs.parquet"]
