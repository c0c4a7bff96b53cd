"""MODEL.WEIGHTS that cannot be used are refused with one line naming the file; partial loads are
reported per top-level module (unsam/checkpoint.py)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import unsam.modeling  # noqa: F401
from unsam.checkpoint import UnSAMCheckpointer, WeightsError, read_weights
from unsam.config import get_unsam_cfg

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"


@pytest.fixture(scope="module")
def model():
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture(scope="module")
def good_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "good.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "empty (0 bytes)"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not"),
        ("HALF", "truncated"),
    ],
)
def test_unreadable_weights_are_one_line_errors(good_file, tmp_path, content, needle):
    path = tmp_path / "bad.pth"
    path.write_bytes(
        good_file.read_bytes()[: good_file.stat().st_size // 2] if content == "HALF" else content
    )
    with pytest.raises(WeightsError) as err:
        read_weights(str(path))
    msg = str(err.value)
    assert needle in msg and "bad.pth" in msg and "\n" not in msg, msg


def test_missing_file_and_unreachable_url(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="not found"):
        read_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="could not be downloaded"):
        read_weights("http://127.0.0.1:9/sub/model.pth")  # port 9: nothing listens, refused at once
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not leftovers, leftovers  # no stale download lock


def test_checkpoint_with_numpy_arrays_loads_without_a_warning(model, tmp_path, caplog):
    # numpy arrays (older checkpoints) are on the restricted reader's allow-list (issue 26)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "numpy.pth"
    torch.save({"model": state, "matching_heuristics": False}, path)
    with caplog.at_level(logging.WARNING):
        ckpt = read_weights(str(path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert set(ckpt["model"]) == set(state)


def test_no_tensor_fits_is_an_error_naming_the_reason(model, tmp_path):
    # another architecture: none of the names exist
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, foreign)
    with pytest.raises(WeightsError, match="another architecture") as err:
        UnSAMCheckpointer(model).load(str(foreign))
    assert "foreign.pth" in str(err.value)
    # the same names with other shapes (another model size)
    wider = tmp_path / "wider.pth"
    torch.save(
        {
            "model": {
                k: torch.zeros(v.shape[0] + 1, *v.shape[1:])
                for k, v in model.state_dict().items()
                if v.dim() > 0
            }
        },
        wider,
    )
    with pytest.raises(WeightsError, match="other shapes"):
        UnSAMCheckpointer(model).load(str(wider))


def test_partial_load_is_one_summary_line_per_module(model, tmp_path, caplog):
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    path = tmp_path / "backbone.pth"
    torch.save({"model": backbone}, path)
    with caplog.at_level(logging.INFO, logger="unsam.checkpoint"):
        checkpointer = UnSAMCheckpointer(model)
        checkpointer.load(str(path))
    report = checkpointer.last_report
    assert report.loaded["backbone"] == report.expected["backbone"] == len(backbone)
    assert report.loaded["sem_seg_head"] == 0 and report.missing_in(["sem_seg_head"])
    lines = [r.getMessage() for r in caplog.records if r.name == "unsam.checkpoint"]
    assert (
        len(lines) == 1
        and f"backbone {len(backbone)}/{len(backbone)}" in lines[0]
        and "sem_seg_head 0/" in lines[0]
    )


def test_train_net_refuses_weights_of_another_architecture(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_net.py"),
            "--config-file",
            str(TINY),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(path),
            "MODEL.DEVICE",
            "cpu",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(err) == 1 and "resnet18.pth" in err[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
