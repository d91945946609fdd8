"""The GPU throughput script is prepared for a lent GPU machine; here it runs its CPU smoke size."""

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_throughput_script_runs_and_reports_both_models(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_throughput", os.path.join(ROOT, "benchmarks", "gpu_throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    rows = mod.main(["--device", "cpu", "--hidden", "64", "--heads", "2", "--blocks", "1", "--batch", "2",
                     "--latent", "8", "--context", "4", "--warmup", "1", "--steps", "1", "--windows", "1",
                     "--peak_tflops", "1", "--json", str(out)])
    assert set(rows) == {"flowalign", "diffusers"}
    for r in rows.values():
        assert r["step_ms"] > 0 and math.isfinite(r["tflops"]) and r["mfu"] == r["tflops"]  # peak 1 TFLOP/s
    saved = json.load(open(out))
    assert saved["flops_per_step"] > 0 and saved["results"]["flowalign"]["step_ms"] == rows["flowalign"]["step_ms"]
    assert "| flowalign |" in capsys.readouterr().out
