"""benchmarks/gpu_vs_reference.sh --dry-run: the GPU comparison's code path on CPU (tiny models, 2
steps, both sides), so the one-command GPU run does not first fail on the GPU machine."""

import json
import os
import subprocess

import pytest

from tests import REPO


@pytest.mark.slow
def test_gpu_script_dry_run_runs_both_sides(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a GPU box
    out = tmp_path / "vs_reference_dry"
    proc = subprocess.run(["bash", "benchmarks/gpu_vs_reference.sh", "--dry-run", "--loader-workers=1"],
                          cwd=REPO, env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"].split(":")[0] for r in report["train"]] == ["digits"]
    for r in report["train"]:
        assert r["ours_ms"] > 0 and r["ref_ms"] > 0 and r["ratio"] == pytest.approx(r["ours_ms"] / r["ref_ms"])
        assert r["ours_peak_MiB"] > 0
    assert report["machine"]["reference"].startswith(("the authors' patch_flow", "tests/models/torch_dit.py"))
    names = {r["sampler"].split("-")[0] for r in report["sampling"]}
    assert names == {"euler_pf", "dual_loop", "look_ahead"} and {r["cfg"] for r in report["sampling"]} == {1.0, 4.0}
    if report["machine"]["reference"].startswith("the authors'"):
        assert all(r["ratio"] > 0 for r in report["sampling"])
    assert [r["workers"] for r in report["loader"]] == [0, 1] and all(r["images_per_s"] > 0 for r in report["loader"])
    md = out.with_suffix(".md").read_text()
    assert "## Train step" in md and "## Sampling" in md and "## Latent loader" in md
