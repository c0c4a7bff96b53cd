"""Install, config, SA-1B round trip, mapper and class-agnostic evaluator (issue 3)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from scipy import ndimage

from unsam.config import get_unsam_cfg
from unsam.config.loading import ConfigError, load_config
from unsam.data.coco import load_coco_agnostic
from unsam.data.mapper import UnSAMDatasetMapper, decode_segmentation
from unsam.data.sa1b import load_sa1b_dicts
from unsam.evaluation.whole_image import evaluate_coco_json
from unsam.evaluation.whole_image import main as eval_main
from unsam.io.sa1b import (
    annotation_from_mask,
    mask_to_rle,
    read_sa1b_json,
    rle_to_mask,
    write_sa1b_json,
)

from .conftest import REPO_ROOT


def test_fresh_venv_imports_detectron2():
    out = subprocess.run(
        [sys.executable, "-c", "import unsam, detectron2.engine, detectron2.layers; print('ok')"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_defaults_match_public_unsam_r50():
    cfg = get_unsam_cfg()
    mf = cfg.MODEL.MASK_FORMER
    assert (mf.NUM_OBJECT_QUERIES, mf.DEC_LAYERS, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES) == (
        2000,
        10,
        1,
    )
    assert (mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.NO_OBJECT_WEIGHT) == (
        2.0,
        5.0,
        5.0,
        0.1,
    )
    assert mf.TRAIN_NUM_POINTS == 12544
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 1000
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1024, 2048)


@pytest.mark.parametrize(
    "path",
    [
        "configs/unsam_only_sa-1b_R50.yaml",
        "configs/unsam_only_sa-1b_swinL.yaml",
        "whole_image_segmentation/configs/maskformer2_R50_bs16_50ep.yaml",
        "prompt_segmentation/configs/maskformer2_R50_bs16_50ep.yaml",
    ],
)
def test_shipped_configs_load(path):
    cfg = load_config(str(REPO_ROOT / path))
    assert cfg.MODEL.META_ARCHITECTURE == "UnSAM"


def test_tiny_configs_load():
    tiny = sorted((REPO_ROOT / "configs" / "tiny").glob("*.yaml"))
    assert tiny, "configs/tiny/ has no config"
    for path in tiny:
        load_config(str(path))


def test_misspelt_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        '_BASE_: "{}"\nMODEL:\n  MASK_FORMER:\n    NUM_OBJECT_QUERRIES: 10\n'.format(
            REPO_ROOT / "configs" / "Base-UnSAM.yaml"
        )
    )
    with pytest.raises(ConfigError, match="MODEL.MASK_FORMER.NUM_OBJECT_QUERRIES"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="SOLVER.BASE_LRR"):
        load_config(None, ["SOLVER.BASE_LRR", "0.1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def _random_masks(rng, n, h, w):
    masks = []
    for _ in range(n):
        m = np.zeros((h, w), bool)
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        m[y : y + rng.integers(5, h - y), x : x + rng.integers(5, w - x)] = True
        masks.append(m)
    return masks


def test_sa1b_round_trip_and_bad_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = 48, 64
    masks = _random_masks(rng, 5, h, w)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    anns = [annotation_from_mask(m, i, level=i % 2, parent_id=-1) for i, m in enumerate(masks)]
    write_sa1b_json(
        tmp_path / "a.json", {"image_id": 1, "width": w, "height": h, "file_name": "a.jpg"}, anns
    )
    data = read_sa1b_json(tmp_path / "a.json")
    for m, ann in zip(masks, data["annotations"]):
        assert np.array_equal(rle_to_mask(ann["segmentation"]), m)
        assert ann["area"] == m.sum()

    # an RLE of the wrong size, and a corrupt JSON: both named and skipped, good file kept
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "b.jpg")
    wrong = annotation_from_mask(np.ones((h + 1, w), bool), 0)
    (tmp_path / "b.json").write_text(
        json.dumps(
            {
                "image": {"image_id": 2, "width": w, "height": h, "file_name": "b.jpg"},
                "annotations": [wrong],
            }
        )
    )
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "c.jpg")
    (tmp_path / "c.json").write_text("{not json")
    dicts = load_sa1b_dicts(tmp_path)
    assert [d["image_id"] for d in dicts] == [1]
    assert dicts[0]["annotations"][1]["level"] == 1


def test_sa1b_skip_empty_and_shards(tmp_path):
    from PIL import Image

    for shard, name, n in (("sa_000000", "x", 0), ("sa_000001", "y", 2)):
        folder = tmp_path / shard
        folder.mkdir()
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / f"{name}.jpg")
        anns = [
            annotation_from_mask(m, i)
            for i, m in enumerate(_random_masks(np.random.default_rng(1), n, 20, 20))
        ]
        write_sa1b_json(
            folder / f"{name}.json",
            {"image_id": name, "width": 20, "height": 20, "file_name": f"{name}.jpg"},
            anns,
        )
    assert len(load_sa1b_dicts(tmp_path)) == 2
    assert [d["image_id"] for d in load_sa1b_dicts(tmp_path, skip_empty=True)] == ["y"]


def test_mapper_shapes_on_shared_image(tiny_val):
    dicts = load_coco_agnostic(tiny_val / "instances.json", tiny_val / "images")
    d = next(d for d in dicts if len(d["annotations"]) >= 3)
    cfg = get_unsam_cfg()
    train = UnSAMDatasetMapper(cfg, is_train=True)
    out = train(d)
    assert tuple(out["image"].shape) == (3, 1024, 1024)
    inst = out["instances"]
    assert inst.gt_masks.tensor.shape[1:] == (1024, 1024)
    assert inst.gt_masks.tensor.dtype.is_floating_point is False
    assert len(inst) <= len(d["annotations"]) and (inst.gt_classes == 0).all()
    test = UnSAMDatasetMapper(cfg, is_train=False)(d)
    assert min(test["image"].shape[1:]) == 1024 or max(test["image"].shape[1:]) == 2048
    assert "instances" not in test and (test["height"], test["width"]) == (d["height"], d["width"])


def test_mapper_caps_instances(tiny_val):
    dicts = load_coco_agnostic(tiny_val / "instances.json", tiny_val / "images")
    d = max(dicts, key=lambda d: len(d["annotations"]))
    cfg = get_unsam_cfg()
    cfg.INPUT.MAX_INSTANCES_PER_IMAGE = 2
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 1.0
    assert len(UnSAMDatasetMapper(cfg, is_train=True)(d)["instances"]) <= 2


def _gt_as_results(coco: COCO, transform=None):
    results = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        if ann.get("iscrowd", 0):
            continue
        img = coco.loadImgs(ann["image_id"])[0]
        mask = decode_segmentation(ann["segmentation"], img["height"], img["width"])
        if transform is not None:
            mask = transform(mask)
            if mask is None:
                continue
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": 1,
                "segmentation": mask_to_rle(mask),
                "score": 1.0,
            }
        )
    return results


def test_evaluator_gt_scores_one_and_degrades(tiny_val, tmp_path):
    gt_path = tiny_val / "instances.json"
    coco = COCO(str(gt_path))
    perfect = evaluate_coco_json(str(gt_path), _gt_as_results(coco))
    assert perfect["AR@1000"] == pytest.approx(1.0)
    assert perfect["AP"] == pytest.approx(1.0)

    # removing every other mask removes (about) half of the recall; the exact value is the kept
    # share
    keep = {"i": 0}

    def every_other(mask):
        keep["i"] += 1
        return mask if keep["i"] % 2 else None

    half_results = _gt_as_results(coco, every_other)
    half = evaluate_coco_json(str(gt_path), half_results)
    n_gt = len([a for a in coco.loadAnns(coco.getAnnIds()) if not a.get("iscrowd", 0)])
    assert half["AR@1000"] == pytest.approx(len(half_results) / n_gt, abs=0.03)
    assert half["AR@1000"] < perfect["AR@1000"]

    eroded = evaluate_coco_json(
        str(gt_path), _gt_as_results(coco, lambda m: ndimage.binary_erosion(m, iterations=3))
    )
    assert 0.0 < eroded["AR@1000"] < 1.0

    # the CLI writes the flat --out JSON with the project's keys
    pred = tmp_path / "results.json"
    pred.write_text(json.dumps(half_results))
    out = tmp_path / "m.json"
    assert eval_main(["--gt", str(gt_path), "--pred", str(pred), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written) >= {
        "AR@1",
        "AR@10",
        "AR@100",
        "AR@1000",
        "AP",
        "AP50",
        "ARs@1000",
        "ARm@1000",
        "ARl@1000",
    }
    assert written["AR@1000"] == pytest.approx(half["AR@1000"])
    assert eval_main(["--gt", str(tmp_path / "nope.json"), "--pred", str(pred)]) == 2


def test_transform_masks_matches_per_mask_segmentation_transforms():
    """The mapper's batched mask transform agrees with detectron2's per-mask apply_segmentation:
    exactly for crop / pad / flip, up to nearest-neighbour tie-breaking for resizing."""
    from detectron2.data import transforms as T

    from unsam.data.mapper import transform_masks

    rng = np.random.default_rng(0)
    masks = np.zeros((5, 60, 80), bool)
    for m in masks:
        y, x = rng.integers(0, 40), rng.integers(0, 60)
        m[y : y + 20, x : x + 20] = True
    exact = T.TransformList(
        [
            T.CropTransform(5, 3, 60, 50),
            T.PadTransform(0, 0, 10, 7, seg_pad_value=0),
            T.HFlipTransform(70),
        ]
    )
    want = np.stack([exact.apply_segmentation(m.astype(np.uint8)).astype(bool) for m in masks])
    assert np.array_equal(transform_masks(exact, masks), want)
    resize = T.TransformList([T.ResizeTransform(60, 80, 45, 61)])
    got = transform_masks(resize, masks)
    want = np.stack([resize.apply_segmentation(m.astype(np.uint8)).astype(bool) for m in masks])
    assert got.shape == want.shape == (5, 45, 61)
    assert (got == want).mean() > 0.97
    ious = (got & want).sum((1, 2)) / (got | want).sum((1, 2))
    assert ious.min() > 0.85
