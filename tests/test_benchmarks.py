"""The GPU benchmarks keep running: each script end to end on the CPU at toy sizes (timings mean nothing here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "result.json"  # before args: train_throughput's --set takes the rest of the line
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--json", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_train_throughput_through_ddpm_fit(tmp_path):
    record, stdout = run("train_throughput.py", tmp_path, "--config", str(ROOT / "experiments" / "quickstart.yaml"),
                         "--variants", "fp32", "bf16-cl-graph", "--diffusers", "bf16-cl", "--warmup", "1",
                         "--steps", "2", "--root", str(tmp_path / "runs"), "--set", "--model.net=tiny",
                         "--data.init_args.image_size=8", "--data.init_args.batch_size=8")
    results = record["results"]
    assert set(results) == {"fp32", "bf16-cl-graph", "diffusers bf16-cl"}
    assert all(r["images_per_s"] > 0 for r in results.values())
    assert results["fp32"]["batch"] == 8 and record["flops_per_train_image"] > 0
    assert "| fp32 |" in stdout and "vs best diffusers" in stdout


def test_sample_throughput_compares_each_fast_path_with_fp32(tmp_path):
    record, _ = run("sample_throughput.py", tmp_path, "--preset", "tiny", "--image_size", "8", "--in_channels", "1",
                    "--batch_size", "4", "--respacing", "3", "--num_batches", "1", "--variants", "fp32", "bf16-cl-graph",
                    "--diffusers", "bf16-cl", "--profile_dir", str(tmp_path))
    results = record["results"]
    assert "Self CPU" in (tmp_path / "profile-sample-fp32.txt").read_text()
    assert results["fp32"]["rel_error"] == 0.0
    assert 0 < results["bf16-cl-graph"]["rel_error"] < 3e-2  # bf16 rounding, not a different function
    assert results["diffusers bf16-cl"]["images_per_s"] > 0


def test_fid_throughput_projects_50k(tmp_path):
    record, stdout = run("fid_throughput.py", tmp_path, "--preset", "tiny", "--image_size", "8", "--in_channels", "1",
                         "--variant", "fp32", "--num_samples", "8", "--batch_size", "4", "--respacing", "3")
    result = record["results"]
    assert result["num_samples"] == 8 and 0 < result["inception_seconds"]
    assert result["seconds_for_50k"] == result["seconds"] * 50_000 / 8
