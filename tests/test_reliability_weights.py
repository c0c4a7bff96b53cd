"""Trust nothing a user hands us (issue 26): weights files never run code, checkpoints resume and
save robustly.

A weights file is a pickle, and a pickle can call any Python function while it loads. Each test
builds the file a user (or an attacker) could hand over and checks what the user gets: the file
refused with one ``error:`` line naming what it calls and the opt-in, or the published layouts
read without it; ``--resume`` by iteration, refused for another model size; a full disk named.
"""

import errno
import logging
import os
import pickle
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from PIL import Image

from unsam.checkpoint import (
    TRUSTED_WEIGHTS_ENV,
    UnsafeWeightsError,
    UnSAMCheckpointer,
    read_weights,
)
from unsam.data.synthetic import make_shapes_dataset

from .test_reliability import TINY, _checkpointer, _demo_main, _one_error_line


class _RunsCode:
    """What a malicious weights file holds: unpickling it calls ``exec`` (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _malicious(tmp_path, suffix: str, name: str = "evil") -> Path:
    """A checkpoint with tensors, and a payload that creates ``tmp_path/ran`` when unpickled."""
    path = tmp_path / f"{name}{suffix}"
    payload = _RunsCode(tmp_path / "ran")
    if suffix == ".pkl":  # detectron2 model-zoo layout, numpy arrays
        with open(path, "wb") as f:
            pickle.dump(
                {
                    "model": {"w": np.zeros(2, np.float32)},
                    "__author__": payload,
                    "matching_heuristics": True,
                },
                f,
            )
    else:
        torch.save({"model": {"w": torch.zeros(2)}, "extra": payload}, path)
    return path


# ----------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_weights_that_run_code_are_refused(tmp_path, monkeypatch, suffix):
    """Was: a .pth ran its payload after one warning, a .pkl with no warning at all."""
    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    evil = _malicious(tmp_path, suffix)
    with pytest.raises(UnsafeWeightsError) as err:
        read_weights(str(evil))
    message = str(err.value)
    assert "\n" not in message and str(evil) in message
    assert "builtins.exec" in message and TRUSTED_WEIGHTS_ENV in message
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_trusted_file_loads_in_full_after_a_warning(tmp_path, monkeypatch, caplog, suffix):
    """The opt-in is per file, by resolved path: another spelling of it counts, a neighbour not."""
    evil = _malicious(tmp_path, suffix)
    neighbour = _malicious(tmp_path, suffix, name="neighbour")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link"
    link.symlink_to(evil)
    monkeypatch.setenv(
        TRUSTED_WEIGHTS_ENV, os.pathsep.join([str(tmp_path / "nothing.pth"), str(link)])
    )
    with pytest.raises(UnsafeWeightsError):
        read_weights(str(neighbour))
    assert not (tmp_path / "ran").exists()
    with caplog.at_level(logging.WARNING):
        checkpoint = read_weights(str(tmp_path / "sub" / ".." / evil.name))
    assert (tmp_path / "ran").exists()  # the user said so for this file
    assert list(checkpoint["model"]) == ["w"]
    assert (
        TRUSTED_WEIGHTS_ENV in caplog.text
        and evil.name in caplog.text
        and "runs code" in caplog.text
    )


def _resnet50_backbone():
    """detectron2's ResNet-50 backbone, as inside a model (names
    ``backbone.res2.0.conv1.weight``)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    model = torch.nn.Module()
    model.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return model


@pytest.mark.parametrize("protocol", [2, 5])
def test_published_detectron2_pkl_loads_without_opt_in(tmp_path, monkeypatch, caplog, protocol):
    """CutLER's DINO ResNet-50 start is a detectron2 .pkl: numpy arrays under backbone names
    without the ``backbone.`` prefix, matched by detectron2's heuristics. Protocol 2 stores bytes
    through ``_codecs.encode``, protocol 5 arrays through ``numpy ... _frombuffer``."""
    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    source = _resnet50_backbone()
    torch.manual_seed(0)
    arrays = {
        k[len("backbone.") :]: torch.randn(v.shape).numpy() for k, v in source.state_dict().items()
    }
    path = tmp_path / "dino_RN50_pretrain_d2_format.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": arrays, "__author__": "DINO", "matching_heuristics": True},
            f,
            protocol=protocol,
        )
    model = _resnet50_backbone()
    with caplog.at_level(logging.WARNING):
        UnSAMCheckpointer(model).load(str(path))
    assert "trust" not in caplog.text.lower() and TRUSTED_WEIGHTS_ENV not in caplog.text
    state = model.state_dict()
    assert all(torch.equal(state[f"backbone.{k}"], torch.from_numpy(v)) for k, v in arrays.items())


def test_public_unsam_pth_layout_loads_without_opt_in(tmp_path, monkeypatch, caplog):
    """The public UnSAM .pth (detectron2 v0.6): model, optimizer, scheduler, iteration. Older
    detectron2 pickled the whole LR scheduler state, fvcore schedulers included: those load."""
    from detectron2.config import get_cfg
    from detectron2.solver import build_lr_scheduler

    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 100, (50,)
    scheduler = build_lr_scheduler(cfg, optimizer)
    whole_scheduler = torch.optim.lr_scheduler.LRScheduler.state_dict(scheduler)  # with _multiplier
    path = tmp_path / "unsam_sa1b_4perc_ckpt_200k.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": whole_scheduler,
            "iteration": 199999,
        },
        path,
    )
    with caplog.at_level(logging.WARNING):
        checkpoint = read_weights(str(path))
    assert not caplog.text
    assert checkpoint["iteration"] == 199999
    assert checkpoint["scheduler"]["_multiplier"](0.7) == pytest.approx(scheduler._multiplier(0.7))
    saved_state = checkpoint["optimizer"]["state"][0]
    assert torch.equal(saved_state["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    loaded = torch.nn.Linear(3, 2)
    UnSAMCheckpointer(loaded).load(str(path))
    assert torch.equal(loaded.weight, model.weight)


# ----------------------------------------------------------------------------- the command lines
def _train(root, out, *opts, resume: bool = False, steps: int = 2) -> int:
    """``train_net.py`` in this process on the tiny config; returns its exit status."""
    from train_net import cli

    try:
        return cli(
            [
                "--config-file",
                TINY,
                *(["--resume"] if resume else []),
                "UNSAM.DATA.SA1B_ROOTS",
                f'("probe:{root}",)',
                "DATASETS.TRAIN",
                '("probe",)',
                "DATASETS.TEST",
                "()",
                "INPUT.IMAGE_SIZE",
                "64",
                "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
                "64",
                "SOLVER.IMS_PER_BATCH",
                "1",
                "SOLVER.MAX_ITER",
                str(steps),
                "SOLVER.CHECKPOINT_PERIOD",
                "1",
                "MODEL.DEVICE",
                "cpu",
                "OUTPUT_DIR",
                str(out),
                "SEED",
                "1",
                *opts,
            ]
        )
    except SystemExit as e:  # raised inside the launched main
        return e.code


@pytest.fixture
def shapes(tmp_path) -> Path:
    return make_shapes_dataset(tmp_path / "sa1b", 2, size=64)


def test_train_net_refuses_weights_that_run_code(tmp_path, shapes, capsys, monkeypatch):
    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    evil = _malicious(tmp_path, ".pkl")
    assert _train(shapes, tmp_path / "out", "MODEL.WEIGHTS", str(evil)) == 2
    _one_error_line(capsys.readouterr().err, str(evil), "builtins.exec", TRUSTED_WEIGHTS_ENV)
    assert not (tmp_path / "ran").exists()


def test_demos_and_app_refuse_weights_that_run_code(tmp_path, capsys, monkeypatch):
    """The whole-image demo and ``python -m unsam.app --opts MODEL.WEIGHTS``: nothing runs."""
    from unsam.app import main as app_main

    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    evil = _malicious(tmp_path, ".pth")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photo.png")
    assert (
        _demo_main(
            [
                "--config-file",
                TINY,
                "--input",
                str(tmp_path / "photo.png"),
                "--output",
                str(tmp_path / "out"),
                "--opts",
                "MODEL.WEIGHTS",
                str(evil),
                "MODEL.DEVICE",
                "cpu",
            ]
        )
        == 2
    )
    _one_error_line(capsys.readouterr().err, str(evil), "builtins.exec", TRUSTED_WEIGHTS_ENV)
    assert (
        app_main(
            ["--config-file", TINY, "--opts", "MODEL.WEIGHTS", str(evil), "MODEL.DEVICE", "cpu"]
        )
        == 2
    )
    _one_error_line(capsys.readouterr().err, str(evil), "builtins.exec", TRUSTED_WEIGHTS_ENV)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("option", ["--divide-weights", "--dino-weights"])
def test_pseudo_refuses_weights_that_run_code(tmp_path, capsys, monkeypatch, option):
    """Was: ``--divide-weights`` ran a .pth payload after a warning (``--dino-weights`` files and
    URLs were read by torch hub's loader, which unpickles in full)."""
    from unsam.pseudo.__main__ import main as pseudo_main

    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    evil = _malicious(tmp_path, ".pth" if option == "--dino-weights" else ".pkl")
    (tmp_path / "in").mkdir()
    assert (
        pseudo_main(
            [
                "--recipe",
                "unsam",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "o"),
                "--quiet",
                option,
                str(evil),
            ]
        )
        == 2
    )
    _one_error_line(
        capsys.readouterr().err, str(evil), "builtins.exec", TRUSTED_WEIGHTS_ENV, option
    )
    assert not (tmp_path / "ran").exists()


def test_sam_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    from unsam.evaluation.prompt import EvaluationInputError, build_sam_predictor

    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    evil = _malicious(tmp_path, ".pth")
    with pytest.raises(EvaluationInputError, match="builtins.exec.*" + TRUSTED_WEIGHTS_ENV):
        build_sam_predictor(str(evil), "vit_b", "cpu")
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- --resume
def test_resume_falls_back_by_iteration_not_file_time(tmp_path, caplog):
    """Was: after ``cp -r`` (file times rewritten), a damaged last checkpoint made --resume take
    the file with the newest time, iteration 4, though iteration 6 read fine."""
    for iteration in (4, 6):
        _checkpointer(tmp_path, float(iteration)).save(f"model_{iteration:07d}")
    _checkpointer(tmp_path, 9.0).save("model_final")
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:100])  # damaged
    for age, name in enumerate(["model_0000004.pth", "model_final.pth", "model_0000006.pth"]):
        os.utime(tmp_path / name, (1e9 - age * 100, 1e9 - age * 100))  # iteration 4 looks newest
    resumed = _checkpointer(tmp_path, 0.0)
    with caplog.at_level(logging.WARNING):
        resumed.resume_or_load("", resume=True)
    assert resumed.resumed_from.endswith("model_0000006.pth")
    assert torch.all(resumed.model.weight == 6.0)


def test_resume_does_not_skip_a_file_that_would_run_code(tmp_path, monkeypatch):
    """Refused for safety is not damaged: falling back to an older file would hide the refusal."""
    monkeypatch.delenv(TRUSTED_WEIGHTS_ENV, raising=False)
    _checkpointer(tmp_path, 1.0).save("model_0000001")
    evil = _malicious(tmp_path, ".pth")
    os.replace(evil, tmp_path / "model_0000002.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")
    with pytest.raises(UnsafeWeightsError, match="model_0000002.pth"):
        _checkpointer(tmp_path, 0.0).resume_or_load("", resume=True)
    assert not (tmp_path / "ran").exists()


def test_resume_with_another_model_width_is_one_error(tmp_path, shapes, capsys):
    """Was: 103/171 tensors loaded, then a traceback in the scheduler."""
    out = tmp_path / "out"
    assert _train(shapes, out) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.pth")}
    capsys.readouterr()
    assert _train(shapes, out, "MODEL.MASK_FORMER.HIDDEN_DIM", "32", resume=True, steps=4) == 2
    _one_error_line(
        capsys.readouterr().err,
        "--resume",
        str(out / "model_final.pth"),
        "103/171 tensors",
        "other shapes",
        "sem_seg_head.",
    )
    assert {p.name: p.read_bytes() for p in out.glob("*.pth")} == before


# ----------------------------------------------------------------------------- saving
def _full_disk_after(monkeypatch, saves: int) -> None:
    """``torch.save`` writes ``saves`` files, then the disk is full (after a part is written)."""
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > saves:
            f.write(b"PK" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from unsam.engine.checkpointer import CheckpointError

    _checkpointer(tmp_path, 1.0).save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(CheckpointError) as err:
        _checkpointer(tmp_path, 2.0).save("model_0000002")
    message = str(err.value)
    assert str(tmp_path / "model_0000002.pth") in message and "No space left on device" in message
    assert f"last good checkpoint is '{tmp_path / 'model_0000001.pth'}'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_training_stops_with_one_error_line_when_the_disk_fills(
    tmp_path, shapes, capsys, monkeypatch
):
    """Was: a traceback."""
    out = tmp_path / "out"
    _full_disk_after(monkeypatch, 1)
    assert _train(shapes, out) == 2
    captured = capsys.readouterr()
    _one_error_line(
        captured.err,
        str(out / "model_0000001.pth"),
        "No space left on device",
        str(out / "model_0000000.pth"),
    )
    assert "Traceback" not in captured.out and "Traceback" not in (out / "log.txt").read_text()
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000000.pth"]
