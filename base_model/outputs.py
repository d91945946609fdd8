"""Output folders: nothing a user already has is destroyed.

    check_output_dir(path, overwrite, resume)   before a run writes anything (every process may call it)
    check_model_output(path, overwrite)          before a model folder is written (merge, reward models)
    clear_run_files(path)                        --overwrite_output_dir: removes what a run wrote, nothing else
    atomic_folder(path)                          a folder written aside, then renamed into place
    replace_folder(new, path)                    the rename step, for folders several processes write
    write_text(path, text), write_json(path, obj)  one file, written aside and renamed
    png_data_uri(image or figure)                an image embedded in a self-contained HTML report

A run folder holding a finished run (`final/`), an unfinished one (`checkpoint-N/`) or anything else is
refused with one line naming it and the flags that choose what to do, as transformers does:
`--overwrite_output_dir` starts again (the old `final/` stays until the new one replaces it) and
`--resume_from_checkpoint` continues. Files a run did not write are never removed.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil

from .errors import InputError

# What the trainers, the evaluator and the comparison driver write into a run folder.
RUN_FILE = re.compile(r"final|samples|checkpoint-\d+|\.tmp-.+|log\.jsonl|config\.json|result\.json|"
                      r"judged-.+\.json|results\.json|report\.html|wandb")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def check_output_dir(path: str, overwrite: bool = False, resume: str = "") -> None:
    """Raise InputError unless `path` is absent, empty, or the flags say what to do with what it holds."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InputError(f"--output_dir {path!r} exists and is not a folder")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not names or overwrite or resume:
        return
    if "final" in names:
        raise InputError(f"--output_dir {path!r} holds a finished run (final/): pass --overwrite_output_dir to "
                         f"replace it, or give another --output_dir")
    steps = sorted(int(m.group(1)) for n in names if (m := CHECKPOINT.fullmatch(n)))
    if steps:
        raise InputError(f"--output_dir {path!r} holds an unfinished run (checkpoint-{steps[-1]}): "
                         f"--resume_from_checkpoint latest continues it, --overwrite_output_dir starts again")
    raise InputError(f"--output_dir {path!r} is not empty ({', '.join(names[:5])}): give a new or empty folder, "
                     f"or --overwrite_output_dir (it removes only what a run writes)")


def check_model_output(path: str, overwrite: bool = False, flag: str = "--output") -> None:
    """A model folder (config.json + weights) may be written at `path`: absent or empty, or, with
    --overwrite_output_dir, a model folder already (replaced whole by `atomic_folder`)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} exists and is not a folder")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not names:
        return
    if not overwrite:
        raise InputError(f"{flag} {path!r} is not empty: give a new folder, or --overwrite_output_dir to replace "
                         f"the model there")
    if "config.json" not in names:
        raise InputError(f"{flag} {path!r} holds no model (no config.json) but other files ({', '.join(names[:5])}); "
                         f"refusing to replace it: give a new folder")


def clear_run_files(path: str, keep: tuple[str, ...] = ("final",)) -> list[str]:
    """Remove what a run wrote into `path` except `keep` (replaced atomically when the new run ends);
    a user's own files stay. Returns the names removed."""
    if not os.path.isdir(path):
        return []
    removed = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in keep or not RUN_FILE.fullmatch(name):
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
        removed.append(name)
    return removed


def replace_folder(new: str, path: str) -> None:
    """Put folder `new` at `path` by renames: an old `path` is moved aside first and deleted only once
    the new one is in place, so a kill leaves either the old folder or the new one, whole."""
    path = os.path.normpath(path)
    old = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-old-{os.path.basename(path)}")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(path) and not os.path.islink(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield an empty temporary folder beside `path`; when the block succeeds it replaces `path`
    (`replace_folder`), when it raises `path` is untouched and the temporary folder removed."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Written aside and renamed: a kill leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def png_data_uri(array_or_fig) -> str:
    """A uint8 (H, W, 3) image or a matplotlib figure (closed here) as a PNG data URI."""
    buf = io.BytesIO()
    if hasattr(array_or_fig, "savefig"):
        import matplotlib.pyplot as plt

        array_or_fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(array_or_fig)
    else:
        from PIL import Image

        Image.fromarray(array_or_fig).save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
