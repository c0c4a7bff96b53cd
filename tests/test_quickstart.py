"""A cut-down `make quickstart` end to end: pseudo labels → training → evaluation → demo →
report."""

import math
import os
import re
import subprocess
import sys

from .conftest import REPO_ROOT


def test_quickstart_cut_down(tmp_path, tiny_train, tiny_val):
    out = tmp_path / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "quickstart.py"),
        "--output",
        str(out),
        "--iters",
        "2",
        "--max-train-images",
        "3",
        "--max-val-images",
        "2",
        "--max-prompt-images",
        "1",
        "--workers",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-3000:] + (out / "quickstart.log").read_text()[-3000:]
    report = (out / "REPORT.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        values = [float(c) for c in cells]  # a missing figure ("–") would fail here
        assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values)
    assert re.search(r"mIoU, top-scored mask: \d+\.\d", report)
    overlays = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(overlays) == 3  # two whole-image overlays, one point-prompt overlay
    assert all((out / p).is_file() for p in overlays)
    # a second run resumes: nothing is recomputed, training is not repeated
    again = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=REPO_ROOT
    )
    assert again.returncode == 0
    assert (
        "train_net.py --config-file configs/tiny/unsam_quickstart.yaml --resume"
        not in (out / "REPORT.md").read_text().split("## Commands")[1]
    )
