"""Nothing silently wrong (issue 14): bad input is named and skipped, or refused with one
``error:`` line and exit status 2; every result file is written atomically.

Each test is one case of the issue's lists; the expected behaviour is the one a user should get.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from PIL import Image

from unsam.data.sa1b import load_sa1b_dicts
from unsam.data.synthetic import make_shapes_dataset
from unsam.io.sa1b import (
    DatasetError,
    SA1BFormatError,
    mask_to_rle,
    read_sa1b_json,
    validate_rle,
    write_sa1b_json,
)
from unsam.utils.files import OutputError, ensure_writable_dir, remove_stale_temps
from unsam.utils.images import UnsupportedImageError, read_rgb

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "unsam_tiny.yaml")
SMALL_PSEUDO = ["--resolution", "96", "--crop-resolution", "64", "--superpixels", "200", "--quiet"]


def _one_error_line(stderr: str, *names: str) -> None:
    """The output a user should get for bad input: an ``error:`` line naming the culprit."""
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    for name in names:
        assert name in errors[0], errors[0]


def _shapes_root(tmp_path, n=2, size=64) -> Path:
    return make_shapes_dataset(tmp_path / "sa1b", n, size=size)


# ----------------------------------------------------------------------------- 16-bit images
def _gradient16(h=48, w=64) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * (65535 // (h * w))).astype(np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    """Was: clipped at 255 (most pixels white) and labelled as if valid."""
    from unsam.data.mapper import UnSAMDatasetMapper
    from unsam.pseudo.runner import read_image

    grey16 = _gradient16()
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(read_rgb(tmp_path / "g16.png"), expected)
    assert np.array_equal(read_image(tmp_path / "g16.png"), expected)  # the pseudo engine's reader
    mapper = UnSAMDatasetMapper(
        is_train=True, augmentations=[], image_format="RGB", max_instances=10
    )
    record = {"file_name": str(tmp_path / "g16.png"), "height": 48, "width": 64}
    assert np.array_equal(mapper.read_image(record), expected)  # the training mapper's reader
    # 16-bit RGB: Pillow keeps the high byte itself; both paths agree
    import cv2

    cv2.imwrite(str(tmp_path / "c16.png"), np.stack([grey16] * 3, -1))
    assert np.array_equal(read_rgb(tmp_path / "c16.png"), expected)


def test_32bit_float_image_refused_by_name(tmp_path):
    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(UnsupportedImageError, match="f32.tif"):
        read_rgb(tmp_path / "f32.tif")


# ----------------------------------------------------------------------------- SA-1B files
@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("counts", "", "empty RLE counts"),
        ("counts", "truncate", "corrupt RLE counts"),
        ("size", None, "is not [height, width]"),
        ("size", [32, 64], "differs from image"),
        ("level", "x", "level 'x' is not a whole number"),
        ("predicted_iou", float("nan"), "predicted_iou nan is not a finite number"),
    ],
)
def test_bad_annotation_named_and_skipped(tmp_path, caplog, field, value, reason):
    """Was (empty counts): decoded to uninitialised memory and trained on; (size null, level
    "x"): a traceback."""
    root = _shapes_root(tmp_path)
    bad = sorted(root.glob("*.json"))[0]
    data = json.loads(bad.read_text())
    ann = data["annotations"][0]
    seg = ann["segmentation"]
    if field == "counts":
        seg["counts"] = seg["counts"][:-2] if value == "truncate" else value
    elif field == "size":
        seg["size"] = value
    else:
        ann[field] = value
    bad.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        dicts = load_sa1b_dicts(root)
    assert len(dicts) == 1
    warned = [r.getMessage() for r in caplog.records if bad.name in r.getMessage()]
    assert len(warned) == 1 and reason in warned[0] and "annotation 0" in warned[0]
    with pytest.raises(SA1BFormatError, match=bad.name):
        read_sa1b_json(bad)


def test_validate_rle_matches_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        rle = mask_to_rle(mask)
        validate_rle(rle, (h, w))
        assert mask_utils.area({"size": [h, w], "counts": rle["counts"].encode()}) == mask.sum()
    with pytest.raises(ValueError, match="covers|cover"):
        validate_rle({"size": [4, 4], "counts": [3, 2]})
    validate_rle({"size": [4, 4], "counts": [3, 2, 11]})  # uncompressed, as COCO crowds


def test_dataset_with_every_file_bad_is_one_error(tmp_path):
    """Was: detectron2's "Dataset 'probe' is empty!" traceback."""
    root = _shapes_root(tmp_path)
    for f in root.glob("*.json"):
        f.write_text("{not json")
    with pytest.raises(DatasetError, match=r"no usable image \(2 JSON files, 2 skipped"):
        load_sa1b_dicts(root)


def test_written_json_is_a_normal_file(tmp_path):
    """Was: mode 0600 (tempfile.mkstemp's)."""
    old = os.umask(0o022)
    try:
        write_sa1b_json(
            tmp_path / "a.json", {"image_id": 0, "width": 1, "height": 1, "file_name": "a.jpg"}, []
        )
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_survives_kill_9(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old and complete")
    script = (
        f"from unsam.utils.files import atomic_write\nimport os, signal\n"
        f"with atomic_write({str(target)!r}) as f:\n"
        f"    f.write('half of the new'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=REPO_ROOT)
    assert res.returncode == -signal.SIGKILL
    assert target.read_text() == "old and complete"
    temps = [p.name for p in tmp_path.iterdir() if p.name != "result.json"]
    assert len(temps) == 1 and temps[0].startswith(".result.json.") and temps[0].endswith(".tmp")
    (tmp_path / ".other.json.abc.tmp").write_text("another writer's")
    assert remove_stale_temps(tmp_path, {"result.json"}.__contains__) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.abc.tmp", "result.json"]


def test_output_folder_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is an existing file"):
        ensure_writable_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot write"):
        ensure_writable_dir(tmp_path / "file" / "sub")
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(OutputError, match="cannot write"):
            ensure_writable_dir(ro)


# ----------------------------------------------------------------------------- pseudo engine
@pytest.fixture
def two_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"img_{i}.png"
        )
    return folder


def test_pseudo_bad_output_refused_before_labelling(two_images, tmp_path, capsys, monkeypatch):
    """Was: a traceback after every image had been computed."""
    from unsam.pseudo import runner
    from unsam.pseudo.__main__ import main as pseudo_main

    monkeypatch.setattr(runner, "_label_all", lambda *a, **k: pytest.fail("labelling started"))
    (tmp_path / "taken").write_text("a file")
    assert (
        pseudo_main(
            ["--input", str(two_images), "--output", str(tmp_path / "taken")] + SMALL_PSEUDO
        )
        == 2
    )
    _one_error_line(capsys.readouterr().err, "taken")


def test_pseudo_input_matching_no_image(tmp_path, capsys):
    """Was: exit 0 after creating an empty output folder."""
    from unsam.pseudo.__main__ import main as pseudo_main

    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "empty"), str(tmp_path / "*.nothing")):
        assert pseudo_main(["--input", spec, "--output", str(tmp_path / "out")] + SMALL_PSEUDO) == 2
        _one_error_line(capsys.readouterr().err, "no image")
    assert not (tmp_path / "out").exists()


def test_pseudo_rerun_cleans_stale_temps_and_writes_0644(two_images, tmp_path):
    """Was: temporary files of a killed write stayed forever; outputs were mode 0600."""
    from unsam.pseudo.__main__ import main as pseudo_main

    out = tmp_path / "out"
    out.mkdir()
    (out / ".img_1.json.k1ll3d.tmp").write_text('{"image": {"ima')  # a killed write of img_1
    (out / ".img_7.json.other.tmp").write_text("another shard's, still writing")
    Image.fromarray(_gradient16()).save(two_images / "img_16bit.png")
    assert pseudo_main(["--input", str(two_images), "--output", str(out)] + SMALL_PSEUDO) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".img_7.json.other.tmp",
        "img_0.json",
        "img_1.json",
        "img_16bit.json",
        "pseudo_settings.txt",
    ]
    assert all((out / n).stat().st_mode & 0o777 == 0o666 & ~_umask() for n in names[1:])
    assert read_sa1b_json(out / "img_16bit.json")["annotations"]  # a real picture, not a white page


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_pseudo_evaluate_refuses_nan_score(two_images, tmp_path, capsys):
    """Was: NaN predicted_iou accepted (and mis-ranked)."""
    from unsam.pseudo.evaluate import main as eval_main

    pred = tmp_path / "pred"
    masks = np.zeros((48, 64), bool)
    masks[10:30, 10:40] = True
    ann = {"id": 0, "segmentation": mask_to_rle(masks), "predicted_iou": float("nan")}
    write_sa1b_json(
        pred / "img_0.json",
        {"image_id": 0, "width": 64, "height": 48, "file_name": "img_0.png"},
        [ann],
    )
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_gt_dict(masks)))
    assert eval_main(["--gt", str(gt), "--pred", str(pred)]) == 2
    _one_error_line(capsys.readouterr().err, "img_0.json", "predicted_iou")


# ----------------------------------------------------------------------------- evaluators
def _gt_dict(mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {
        "images": [{"id": 1, "file_name": "img_0.png", "height": h, "width": w}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": int(mask.sum()),
                "segmentation": mask_to_rle(mask),
                "bbox": [10, 10, 30, 20],
            }
        ],
        "categories": [{"id": 1, "name": "object"}],
    }


def _bad_predictions(case: str, mask: np.ndarray):
    good = {"image_id": 1, "segmentation": mask_to_rle(mask), "score": 0.9}
    if case == "nan score":
        return [good, dict(good, score=float("nan"))]
    if case == "missing score":
        return [{k: v for k, v in good.items() if k != "score"}]
    if case == "unknown image id":
        return [dict(good, image_id=99)]
    if case == "swapped size":
        return [dict(good, segmentation=mask_to_rle(mask.T))]
    if case == "empty list":
        return []
    return [good]


@pytest.mark.parametrize(
    "case,named",
    [
        ("nan score", "score nan"),
        ("missing score", "score None"),
        ("unknown image id", "image_id 99"),
        ("swapped size", "differs from image 48x64"),
        ("empty list", "non-empty"),
    ],
)
def test_whole_image_evaluator_refuses_bad_predictions(tmp_path, capsys, case, named):
    """Was: NaN scores lowered AP silently, wrong-size RLEs and [] gave all-zero metrics, unknown
    ids and a missing score gave tracebacks."""
    from unsam.evaluation.whole_image import main as eval_main

    mask = np.zeros((48, 64), bool)
    mask[10:30, 10:40] = True
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt.write_text(json.dumps(_gt_dict(mask)))
    pred.write_text(json.dumps(_bad_predictions(case, mask)))
    assert eval_main(["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "m.json")]) == 2
    _one_error_line(capsys.readouterr().err, "pred.json", named)
    assert not (tmp_path / "m.json").exists()
    pred.write_text(json.dumps(_bad_predictions("good", mask)))
    assert eval_main(["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["AP"] == pytest.approx(1.0)


def test_no_predictions_in_training_eval_is_a_warning(caplog):
    """A model that detects nothing yet is legitimate in training: zeros, with a warning."""
    from unsam.evaluation.whole_image import coco_eval_agnostic, load_coco_gt

    mask = np.zeros((48, 64), bool)
    mask[10:30, 10:40] = True
    with caplog.at_level(logging.WARNING):
        metrics = coco_eval_agnostic(load_coco_gt(_gt_dict(mask)), [])
    assert set(metrics.values()) == {0.0} and "no predictions" in caplog.text


# ----------------------------------------------------------------------------- configs
def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    """Was: a yaml.scanner traceback."""
    from train_net import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{TINY}"\nSOLVER:\n  MAX_ITER: [1,\n BASE_LR: 0.1\n')
    assert cli(["--config-file", str(bad)]) == 2
    _one_error_line(capsys.readouterr().err, "bad.yaml:", "YAML syntax error")


# ----------------------------------------------------------------------------- checkpoints
def _checkpointer(save_dir, value: float):
    from unsam.engine.checkpointer import TrainingCheckpointer

    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    return TrainingCheckpointer(model, str(save_dir))


def test_checkpoint_save_survives_kill_9(tmp_path):
    """Was: a checkpoint killed mid-write stayed truncated (model_final.pth at 0 bytes)."""
    _checkpointer(tmp_path, 1.0).save("model_final")
    good = (tmp_path / "model_final.pth").read_bytes()
    script = (
        "import os, signal, torch\nimport unsam\n"
        "from unsam.engine.checkpointer import TrainingCheckpointer\n"
        "def killed_save(obj, f, *a, **k):\n"
        "    f.write(b'PK' * 100); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed_save\n"
        f"TrainingCheckpointer(torch.nn.Linear(2, 2), {str(tmp_path)!r}).save('model_final')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert any(p.name.startswith(".model_final.pth.") for p in tmp_path.iterdir())
    _checkpointer(tmp_path, 0.0)  # the next run's checkpointer removes the killed save's temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]


def test_resume_falls_back_to_newest_readable_checkpoint(tmp_path, caplog):
    """Was: a truncated last checkpoint made --resume die with a traceback."""
    from unsam.engine.checkpointer import CheckpointError

    _checkpointer(tmp_path, 1.0).save("model_0000001")
    _checkpointer(tmp_path, 3.0).save("model_0000003")
    last = tmp_path / "model_0000003.pth"
    last.write_bytes(last.read_bytes()[:100])  # killed mid-write by an older version
    resumed = _checkpointer(tmp_path, 0.0)
    with caplog.at_level(logging.WARNING):
        resumed.resume_or_load("", resume=True)
    assert resumed.resumed_from.endswith("model_0000001.pth")
    assert torch.all(resumed.model.weight == 1.0)
    assert "resuming from" in caplog.text and "model_0000003.pth" in caplog.text
    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        _checkpointer(tmp_path, 0.0).resume_or_load("", resume=True)


# ----------------------------------------------------------------------------- training
def _train(root, out, resume: bool = False) -> int:
    """``train_net.py`` in this process; returns what its exit status would be."""
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
                "2",
                "SOLVER.CHECKPOINT_PERIOD",
                "1",
                "MODEL.DEVICE",
                "cpu",
                "OUTPUT_DIR",
                str(out),
                "SEED",
                "1",
            ]
        )
    except SystemExit as e:  # raised inside the launched main, as in every process of a group
        return e.code


def test_training_skips_wrong_size_image_and_resume_rewrites_lost_final(tmp_path):
    """Was: an image whose size differs from its JSON killed training at iteration 0; a lost
    model_final.pth was never rewritten by --resume."""
    root = _shapes_root(tmp_path, n=2, size=64)
    wrong = sorted(root.glob("*.png"))[0]
    Image.open(wrong).resize((48, 64)).save(wrong)
    out = tmp_path / "out"
    assert _train(root, out) == 0
    log = (out / "log.txt").read_text()  # detectron2's loggers do not propagate to pytest's
    assert f"skipping training image {wrong} (1 skipped" in log
    # killed while model_final.pth was written: atomic saves leave the earlier files only
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    assert _train(root, out, resume=True) == 0
    assert (
        "model_final.pth is missing or unreadable; writing it from model_0000001.pth"
        in (out / "log.txt").read_text()
    )
    assert (out / "model_final.pth").is_file()


def test_test_image_of_wrong_size_is_a_dataset_error(tmp_path):
    """At test time a skipped image would change the metrics: an error naming it (train_net: one
    ``error:`` line, exit 2) instead of detectron2's traceback."""
    from unsam.data.mapper import UnSAMDatasetMapper

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    mapper = UnSAMDatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", max_instances=10
    )
    with pytest.raises(DatasetError, match="a.png.*Mismatched image shape"):
        mapper({"file_name": str(tmp_path / "a.png"), "height": 64, "width": 48})


def test_training_on_dataset_with_every_file_bad_is_one_error(tmp_path, capsys):
    root = _shapes_root(tmp_path, n=1)
    for f in root.glob("*.json"):
        f.write_text("[]")
    assert _train(root, tmp_path / "out") == 2
    _one_error_line(capsys.readouterr().err, str(root), "no usable image")


# ----------------------------------------------------------------------------- demos
def _demo_main(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo_whole_image", REPO_ROOT / "whole_image_segmentation" / "demo_whole_image.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.main(argv)


def test_demo_output_that_is_a_file_refused_before_model_load(two_images, tmp_path, capsys):
    """Was: a traceback (after loading the model)."""
    (tmp_path / "taken").write_text("a file")
    assert (
        _demo_main(
            [
                "--config-file",
                TINY,
                "--input",
                str(two_images),
                "--output",
                str(tmp_path / "taken"),
                "--opts",
                "MODEL.WEIGHTS",
                str(tmp_path / "not_loaded_yet.pth"),
            ]
        )
        == 2
    )
    _one_error_line(capsys.readouterr().err, "taken")


def test_demo_folder_skips_unreadable_image(two_images, tmp_path, caplog):
    """Was: the demo stopped at the first bad image of a folder."""
    from .test_demo_whole_image import _tiny_checkpoint

    ckpt = tmp_path / "tiny.pth"
    _tiny_checkpoint(ckpt)
    (two_images / "img_1.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert (
            _demo_main(
                [
                    "--config-file",
                    TINY,
                    "--input",
                    str(two_images),
                    "--output",
                    str(out),
                    "--opts",
                    "MODEL.WEIGHTS",
                    str(ckpt),
                    "MODEL.DEVICE",
                    "cpu",
                    "INPUT.MIN_SIZE_TEST",
                    "64",
                    "INPUT.MAX_SIZE_TEST",
                    "64",
                ]
            )
            == 0
        )
    assert sorted(p.name for p in out.iterdir()) == ["img_0.png"]
    assert "img_1.png" in caplog.text and "1 of 2 inputs skipped" in caplog.text
