"""Issue 26, training input: what a user hands ``train_net.py`` (pseudo labels, dataset names,
config numbers) is either trained on, named and skipped with a count, or refused with one
``error:`` line and exit status 2 — never a traceback, never a silent zero loss."""

import json
import logging
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
from PIL import Image

from unsam.io.sa1b import annotation_from_mask, write_sa1b_json

from .test_reliability import TINY, _one_error_line, _shapes_root

# a long thin strip: at the tiny sizes below LSJ scales its short side to 20 * 64 / 20000 px,
# which detectron2 rounds to 0 ("height and width must be > 0")
STRIP_W, STRIP_H = 20000, 20


def _cli(root, out, *extra: str) -> int:
    """``train_net.py`` in this process on SA-1B root ``root`` (dataset ``probe``); the exit
    status."""
    from train_net import cli

    roots = f'("probe:{root}",)' if root is not None else "()"
    try:
        return cli(
            [
                "--config-file",
                TINY,
                "UNSAM.DATA.SA1B_ROOTS",
                roots,
                "DATASETS.TRAIN",
                '("probe",)',
                "DATASETS.TEST",
                "()",
                "INPUT.IMAGE_SIZE",
                "64",
                "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
                "64",
                "SOLVER.IMS_PER_BATCH",
                "2",
                "SOLVER.MAX_ITER",
                "2",
                "SOLVER.CHECKPOINT_PERIOD",
                "100",
                "MODEL.DEVICE",
                "cpu",
                "OUTPUT_DIR",
                str(out),
                "SEED",
                "1",
                *extra,
            ]
        )
    except SystemExit as e:  # raised inside the launched main
        return e.code


def _write_image(root: Path, name: str, image: np.ndarray, masks) -> Path:
    """One SA-1B pair ``<name>.png`` + ``<name>.json`` with ``masks`` as its annotations."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / f"{name}.png")
    h, w = image.shape[:2]
    write_sa1b_json(
        root / f"{name}.json",
        {"image_id": name, "width": w, "height": h, "file_name": f"{name}.png"},
        [annotation_from_mask(m, i) for i, m in enumerate(masks)],
    )
    return root / f"{name}.png"


def _strip(root: Path, name: str = "strip", h: int = STRIP_H, w: int = STRIP_W) -> Path:
    """A thin strip image whose one mask covers its middle third (lengthwise)."""
    mask = np.zeros((h, w), bool)
    if w >= h:
        mask[:, w // 3 : 2 * w // 3] = True
    else:
        mask[h // 3 : 2 * h // 3, :] = True
    image = np.full((h, w, 3), 90, np.uint8)
    image[mask] = (200, 40, 40)
    return _write_image(root, name, image, [mask])


# -------------------------------------------------------------------------- 1. extreme aspect ratio
@pytest.mark.parametrize("h,w", [(STRIP_H, STRIP_W), (STRIP_W, STRIP_H)])
def test_mapper_keeps_a_strip_at_least_one_pixel_wide(tmp_path, h, w):
    """Was: ``ValueError: height and width must be > 0`` in LSJ's resize, killing the run."""
    from unsam.data.mapper import UnSAMDatasetMapper, build_lsj_augmentation
    from unsam.data.sa1b import load_sa1b_dicts

    path = _strip(tmp_path, h=h, w=w)
    record = load_sa1b_dicts(tmp_path)[0]
    mapper = UnSAMDatasetMapper(
        is_train=True,
        augmentations=build_lsj_augmentation(64, 0.5, 1.5, flip=False),
        image_format="RGB",
        max_instances=10,
    )
    for _ in range(3):
        out = mapper(record)
        assert out["image"].shape == (3, 64, 64)
        assert out["instances"].gt_masks.tensor.shape[1:] == (64, 64)
        assert out["instances"].gt_masks.tensor.any()  # the strip's mask survives, one pixel wide
    assert mapper.num_degenerate == 3
    assert mapper.degenerate_images == {str(path)}


def test_test_mapper_keeps_a_strip_at_least_one_pixel_wide(tmp_path):
    """At test time the short side of a 40000×20 image scaled to the long-side cap rounds to 0."""
    from detectron2.data import transforms as T

    from unsam.data.mapper import UnSAMDatasetMapper

    path = _strip(tmp_path, h=20, w=40000)
    mapper = UnSAMDatasetMapper(
        is_train=False,
        augmentations=[T.ResizeShortestEdge(256, 512)],
        image_format="RGB",
        max_instances=10,
    )
    out = mapper({"file_name": str(path), "height": 20, "width": 40000, "image_id": 0})
    assert out["image"].shape == (3, 1, 512)


def test_training_on_a_strip_completes_and_names_it(tmp_path):
    """A root of one normal image and a 20000×20 strip, batch 2: the strip is drawn at every
    iteration; training completes and the strip is named once in the log, with its count."""
    root = _shapes_root(tmp_path, n=1, size=64)
    strip = _strip(root)
    out = tmp_path / "out"
    assert _cli(root, out) == 0
    assert (out / "model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    named = [line for line in log.splitlines() if str(strip) in line]
    assert len(named) == 1, named
    assert "20000x20" in named[0] and "1 such image" in named[0]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m.get("data/degenerate_resizes", 0) for m in metrics) >= 1  # in EventStorage too


# ----------------------------------------------------------------------------- 2. no mask anywhere
@pytest.mark.parametrize("empty", ["empty_masks", "no_annotations"])
@pytest.mark.parametrize("filter_empty", ["False", "True"])
def test_training_with_no_mask_at_all_is_refused(tmp_path, capsys, empty, filter_empty):
    """Was: trained to the end with loss_mask 0 (empty masks, or no annotations kept), or
    detectron2's "No valid data found" assertion (no annotations, filtered)."""
    root = tmp_path / "sa1b"
    for i in range(2):
        masks = [np.zeros((32, 32), bool)] * 2 if empty == "empty_masks" else []
        _write_image(root, f"img{i}", np.zeros((32, 32, 3), np.uint8), masks)
    assert _cli(root, tmp_path / "out", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", filter_empty) == 2
    _one_error_line(capsys.readouterr().err, "'probe'", str(root), "no image has a non-empty mask")
    assert not (tmp_path / "out" / "model_final.pth").exists()


@pytest.mark.parametrize("filter_empty,verb", [("True", "left out"), ("False", "kept")])
def test_images_without_a_mask_are_counted_and_handled_per_config(tmp_path, filter_empty, verb):
    """Some images with masks, two with none (one only empty masks, one no annotation): the load
    log counts the empty masks dropped, the training log says how many images have none and
    whether they were left out or kept."""
    from detectron2.data import DatasetCatalog

    from unsam.config.loading import load_config
    from unsam.engine.trainer import load_train_dicts, register_datasets

    root = _shapes_root(tmp_path, n=2, size=32)
    _write_image(
        root, "blank_masks", np.zeros((32, 32, 3), np.uint8), [np.zeros((32, 32), bool)] * 3
    )
    _write_image(root, "blank", np.zeros((32, 32, 3), np.uint8), [])
    cfg = load_config(
        TINY,
        [
            "UNSAM.DATA.SA1B_ROOTS",
            f'("probe:{root}",)',
            "DATASETS.TRAIN",
            '("probe",)',
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
            filter_empty,
        ],
    )
    register_datasets(cfg)
    record = [d for d in DatasetCatalog.get("probe") if d["image_id"] == "blank_masks"][0]
    assert record["annotations"] == []  # empty masks are dropped at load time
    messages = []

    class Keep(logging.Handler):
        def emit(self, rec):
            messages.append(rec.getMessage())

    handler = Keep(logging.INFO)
    for name in ("unsam", "detectron2"):
        logging.getLogger(name).addHandler(handler)
    try:
        dicts = load_train_dicts(cfg)
    finally:
        for name in ("unsam", "detectron2"):
            logging.getLogger(name).removeHandler(handler)
    assert len(dicts) == (2 if filter_empty == "True" else 4)
    assert any("3 empty masks dropped" in m for m in messages), messages
    assert any(f"2 of 4 training images have no non-empty mask: {verb}" in m for m in messages), (
        messages
    )


# ----------------------------------------------------------------------------- 3./4. dataset names
def test_unregistered_training_set_is_one_error(tmp_path, capsys):
    """Was: detectron2's KeyError traceback ("Dataset 'nope' is not registered!")."""
    root = _shapes_root(tmp_path, n=1, size=32)
    assert _cli(root, tmp_path / "out", "DATASETS.TRAIN", '("nope",)') == 2
    _one_error_line(
        capsys.readouterr().err, "DATASETS.TRAIN", "'nope'", "probe", "UNSAM.DATA.SA1B_ROOTS"
    )


def test_unregistered_test_set_is_one_error(tmp_path, capsys):
    """Was: trained to the end, then a KeyError traceback in the final evaluation."""
    root = _shapes_root(tmp_path, n=1, size=32)
    assert _cli(root, tmp_path / "out", "DATASETS.TEST", '("nope_val",)') == 2
    _one_error_line(capsys.readouterr().err, "DATASETS.TEST", "'nope_val'")


def test_test_set_with_missing_files_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """Was: the whole run trained, then the final evaluation stopped on a FileNotFoundError
    traceback (the built-in COCO val2017 set without $DETECTRON2_DATASETS/coco)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    root = _shapes_root(tmp_path, n=1, size=32)
    assert _cli(root, tmp_path / "out", "DATASETS.TEST", '("coco_2017_val_agnostic",)') == 2
    _one_error_line(
        capsys.readouterr().err,
        "DATASETS.TEST",
        "'coco_2017_val_agnostic'",
        str(tmp_path / "datasets" / "coco" / "annotations" / "instances_val2017.json"),
    )
    assert not (tmp_path / "out" / "model_final.pth").exists()


@pytest.mark.parametrize("entry", ["nocolon", ":/data/x", "name:"])
def test_sa1b_root_entry_without_name_or_path_is_one_error(tmp_path, capsys, entry):
    """Was: a ValueError traceback."""
    from train_net import cli

    try:
        status = cli(
            [
                "--config-file",
                TINY,
                "UNSAM.DATA.SA1B_ROOTS",
                f'("{entry}",)',
                "MODEL.DEVICE",
                "cpu",
                "OUTPUT_DIR",
                str(tmp_path / "out"),
            ]
        )
    except SystemExit as e:
        status = e.code
    assert status == 2
    _one_error_line(capsys.readouterr().err, "UNSAM.DATA.SA1B_ROOTS", f"'{entry}'", "name:path")


def test_coco_set_entry_of_wrong_length_is_one_error(tmp_path, capsys):
    assert _cli(None, tmp_path / "out", "UNSAM.DATA.COCO_SETS", '[["only_a_name"]]') == 2
    _one_error_line(
        capsys.readouterr().err,
        "UNSAM.DATA.COCO_SETS",
        "only_a_name",
        "[name, json_file, image_root]",
    )


# ----------------------------------------------------------------------------- 5. numbers
@pytest.mark.parametrize(
    "key,value",
    [
        ("SOLVER.IMS_PER_BATCH", "0"),
        ("SOLVER.IMS_PER_BATCH", "-2"),
        ("SOLVER.MAX_ITER", "0"),
        ("SOLVER.MAX_ITER", "-5"),
        ("SOLVER.BASE_LR", "-0.1"),
        ("SOLVER.BASE_LR", "1e999"),
        ("INPUT.IMAGE_SIZE", "0"),
        ("INPUT.MIN_SCALE", "0.0"),
        ("INPUT.MAX_SCALE", "0.25"),
        ("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "0"),
        ("MODEL.MASK_FORMER.HIDDEN_DIM", "-64"),
        ("MODEL.MASK_FORMER.NHEADS", "3"),
        ("MODEL.MASK_FORMER.DEC_LAYERS", "0"),
        ("MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "0"),
        ("INPUT.MAX_INSTANCES_PER_IMAGE", "0"),
        ("SOLVER.CHECKPOINT_PERIOD", "0"),
        ("DATALOADER.NUM_WORKERS", "-1"),
        ("SOLVER.WEIGHT_DECAY", "-1.0"),
        ("TEST.DETECTIONS_PER_IMAGE", "0"),
        ("INPUT.MIN_SIZE_TEST", "0"),
    ],
)
def test_nonsense_number_is_one_error(tmp_path, capsys, key, value):
    """Was: a traceback (IMS_PER_BATCH 0: detectron2's batch assertion; NHEADS 3: attention's
    "embed_dim must be divisible"; CHECKPOINT_PERIOD 0: ZeroDivisionError), a NaN-loss stop that
    blames the loss (BASE_LR inf, TRAIN_NUM_POINTS 0), or a run that completed (MAX_SCALE below
    MIN_SCALE, MAX_INSTANCES_PER_IMAGE 0, WEIGHT_DECAY < 0)."""
    root = _shapes_root(tmp_path, n=1, size=32)
    assert _cli(root, tmp_path / "out", key, value) == 2
    _one_error_line(capsys.readouterr().err, key)
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_batch_not_divisible_by_processes_is_refused():
    from unsam.config.loading import ConfigError, load_config
    from unsam.engine.trainer import validate_config

    cfg = load_config(TINY, ["SOLVER.IMS_PER_BATCH", "3"])
    validate_config(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH 3: .*2 processes"):
        validate_config(cfg, world_size=2)
