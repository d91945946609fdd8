"""Drivers' runs: a command line of a project CLI, run once and cached by a key.

    cmd = command("base_model.pretrain", "configs/pretrain/toy.yaml", {"seed": 1, "output_dir": folder})
    result = run_cached(cmd, key, folder, collect=lambda: {...}, again=lambda: again_flags(folder))

A run whose `folder/result.json` records the same key is not run again, so a driver (the alignment
comparison, the paper's studies) resumes where it stopped; a run killed half-way continues from its
last checkpoint (`again_flags`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from .outputs import write_json


def command(module: str, config: str | None, flags: dict) -> list[str]:
    """`python -m module [--config config] --flag value ...` (a list value gives several words)."""
    cmd = [sys.executable, "-m", module] + (["--config", config] if config else [])
    for k, v in flags.items():
        cmd += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return cmd


def command_key(cmd: list[str], config: str | None) -> str:
    """A key of a command and the text of its config file."""
    text = json.dumps(cmd[1:]) + (open(config).read() if config else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def again_flags(folder: str) -> list[str]:
    """A folder left by a killed run continues from its checkpoint; one of a finished run whose command
    has changed (or with no checkpoint) starts again."""
    from .training import latest_checkpoint

    if latest_checkpoint(folder) and not os.path.isfile(os.path.join(folder, "result.json")):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir", "true"] if os.path.isdir(folder) and os.listdir(folder) else []


def cached_result(folder: str, key: str) -> dict | None:
    """`folder/result.json` when it records `key`, else None."""
    done = os.path.join(folder, "result.json")
    if os.path.isfile(done):
        with open(done) as f:
            result = json.load(f)
        if result.get("key") == key:
            return result
    return None


def run_cached(cmd: list[str], key: str, folder: str, collect, again=None, tag: str = "run") -> dict:
    """Run `cmd` unless `folder/result.json` records `key`; `collect()` → the result.
    `again()` → flags added when the command runs again over an earlier attempt's output (the
    trainers refuse a used folder without --resume_from_checkpoint or --overwrite_output_dir)."""
    if (result := cached_result(folder, key)) is not None:
        return result
    run = cmd + (again() if again else [])
    print(f"\n[{tag}] {' '.join(run)}", flush=True)
    t0 = time.time()
    subprocess.run(run, check=True)
    result = {"key": key, "command": cmd, "wall_s": time.time() - t0, **collect()}
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "result.json"), result, indent=2)
    return result
