"""scripts/gpu_check.py (issue 16): the CPU-sized run of every step passes, its JSON is the only
thing on stdout, and failures are recorded with their error and a non-zero exit."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout,
    )


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run(["--device", "cpu", "--quick", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # the JSON alone: logs went to stderr
    assert json.loads(out.read_text()) == report
    assert report["ok"] and report["failures"] == [] and report["mode"] == "quick"
    steps = report["steps"]
    assert set(steps) == {"data", "train", "inference", "prompt", "pseudo", "multiproc"}
    assert all(steps[s]["ok"] for s in steps)

    for name in ("r50", "swinL"):
        t = steps["train"][name]
        assert t["iterations_run"] == t["iterations"] >= 2
        assert math.isfinite(t["total_loss_last"]) and t["s_per_iter"] > 0
        assert t["visa"] and t["ats"] and t["ats_adaptive_at_end"]
        assert t["amp"] is False  # AMP is switched off on the CPU
    assert steps["train"]["swinL"]["fits"] is True

    inf = steps["inference"]
    assert inf["fp32"]["num_detections"] == inf["detections"]
    assert "skipped" in inf["amp"]
    assert inf["logits_vs_cpu"]["max_abs_diff"] <= inf["logits_vs_cpu"]["tolerance"]

    for mode in ("learned", "select"):
        p = steps["prompt"][mode]
        assert p["mode"] == mode and p["predict_point"]["n"] == steps["prompt"]["clicks"]

    for recipe in ("classical", "unsam"):
        r = steps["pseudo"][recipe]
        assert r["done"] == steps["pseudo"]["images"] and r["failed"] == 0 and r["s_per_image"] > 0
    assert steps["pseudo"]["classical"]["masks"] > 0

    mp = steps["multiproc"]
    assert mp["world_size"] == 2 and mp["backend"] == "gloo" and mp["prompt_path"] and mp["ats"]
    assert mp["identical_parameters"] and mp["identical_buffers"]
    # ranks trained different task mixes in some iteration: the mixed-batch collective ran
    assert mp["iterations_with_different_task_mix"] >= 1


def test_failures_are_recorded_not_raised():
    mod = _module()

    def broken():
        raise RuntimeError("boom\nsecond line")

    res = mod.guarded("x", broken)
    assert res["ok"] is False and res["error"] == "RuntimeError: boom" and "seconds" in res
    tree = {"a": {"ok": True, "b": res}, "c": {"ok": False, "error": "bad"}}
    assert mod.failures(tree) == ["a.b: RuntimeError: boom", "c: bad"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_fails_with_json():
    proc = _run(["--steps", "inference"], timeout=300)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False and "no GPU" in report["error"]


def test_unknown_step_is_a_usage_error():
    proc = _run(["--steps", "train,bogus"], timeout=300)
    assert proc.returncode == 2 and "bogus" in proc.stderr
