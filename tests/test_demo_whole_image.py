"""whole_image_segmentation/demo_whole_image.py on a shared image; bad paths exit 2 (issue 4)."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from .conftest import REPO_ROOT

DEMO = str(REPO_ROOT / "whole_image_segmentation" / "demo_whole_image.py")
TINY = str(REPO_ROOT / "configs" / "tiny" / "unsam_tiny.yaml")


def _tiny_checkpoint(path):
    from detectron2.modeling import build_model

    import unsam.modeling  # noqa: F401
    from unsam.config.loading import load_config

    model = build_model(load_config(TINY, ["MODEL.DEVICE", "cpu"]))
    torch.save({"model": model.state_dict()}, path)


def _demo(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, DEMO, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_demo_writes_overlay_and_json(tmp_path, tiny_val):
    ckpt = tmp_path / "tiny.pth"
    _tiny_checkpoint(ckpt)
    image = sorted((tiny_val / "images").glob("*.jpg"))[0]
    out = tmp_path / "out"
    res = _demo(
        "--config-file",
        TINY,
        "--input",
        str(image),
        str(image.parent / "*.nothing*"),
        "--output",
        str(out),
        "--save-json",
        "--confidence-threshold",
        "0.0",
        "--opts",
        "MODEL.WEIGHTS",
        str(ckpt),
        "MODEL.DEVICE",
        "cpu",
    )
    assert (
        res.returncode == 2 and "no file matches" in res.stderr
    )  # an empty glob is an error, not a silent no-op

    res = _demo(
        "--config-file",
        TINY,
        "--input",
        str(image),
        "--output",
        str(out),
        "--save-json",
        "--confidence-threshold",
        "0.0",
        "--opts",
        "MODEL.WEIGHTS",
        str(ckpt),
        "MODEL.DEVICE",
        "cpu",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    overlay = np.asarray(Image.open(out / f"{image.stem}.png"))
    original = np.asarray(Image.open(image).convert("RGB"))
    assert overlay.shape == original.shape and not np.array_equal(overlay, original)
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert (
        len(record["annotations"]) == 50
    )  # TEST.DETECTIONS_PER_IMAGE of the tiny config, threshold 0
    assert record["annotations"][0]["segmentation"]["size"] == list(original.shape[:2])


def test_demo_bad_paths_exit_2(tmp_path, tiny_val):
    image = sorted((tiny_val / "images").glob("*.jpg"))[0]
    missing_image = _demo(
        "--config-file", TINY, "--input", str(tmp_path / "nope.jpg"), "--output", str(tmp_path)
    )
    assert missing_image.returncode == 2 and "nope.jpg" in missing_image.stderr
    assert "Traceback" not in missing_image.stderr
    missing_weights = _demo(
        "--config-file",
        TINY,
        "--input",
        str(image),
        "--output",
        str(tmp_path),
        "--opts",
        "MODEL.WEIGHTS",
        str(tmp_path / "w.pth"),
    )
    assert missing_weights.returncode == 2 and "w.pth" in missing_weights.stderr
    assert "Traceback" not in missing_weights.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    unreadable = _demo("--config-file", TINY, "--input", str(broken), "--output", str(tmp_path))
    assert unreadable.returncode == 2 and "broken.jpg" in unreadable.stderr
