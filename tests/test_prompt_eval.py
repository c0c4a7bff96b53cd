"""The prompt evaluation protocol (unsam.evaluation.prompt) with fake predictors and a tiny SAM."""

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from unsam.data.prompts import farthest_interior_point, mask_to_box, mask_to_mask_input
from unsam.evaluation import prompt as prompt_eval
from unsam.evaluation.prompt import build_sam_predictor, evaluate_prompts, main
from unsam.io.sa1b import mask_to_rle


def _low_res(masks):
    return (
        np.concatenate([mask_to_mask_input(m) for m in masks])
        if len(masks)
        else np.zeros((0, 256, 256))
    )


# ---------------------------------------------------------------------------- GT as prediction


class GroundTruthPredictor:
    """Answers every prompt with the GT mask it was derived from (plus a worse, lower-scored
    output).

    The image is recognised by its pixels, the instance by the protocol's own click / box.
    """

    def __init__(self, gt_json, image_root, image_ids):
        self.coco = COCO(str(gt_json))
        self.by_hash = {}
        for img in self.coco.loadImgs(image_ids):
            pixels = np.asarray(Image.open(image_root / img["file_name"]).convert("RGB"))
            self.by_hash[hashlib.md5(pixels.tobytes()).hexdigest()] = img["id"]
        self.calls = 0

    def set_image(self, image):
        img_id = self.by_hash[hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest()]
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=False))
        self.masks = [self.coco.annToMask(a).astype(bool) for a in anns]
        self.clicks = [farthest_interior_point(m) for m in self.masks]
        self.boxes = [mask_to_box(m) for m in self.masks]

    def predict(
        self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True
    ):
        self.calls += 1
        if box is not None:
            hits = [m for m, b in zip(self.masks, self.boxes) if np.array_equal(b, box)]
        else:
            click = tuple(int(v) for v in point_coords[0])
            hits = [m for m, c in zip(self.masks, self.clicks) if c == click]
        assert hits, "the protocol's prompt matches no GT instance"
        gt = hits[0]
        if not multimask_output:
            return gt[None], np.array([0.9], np.float32), _low_res([gt])
        worse = np.ones_like(gt)
        return np.stack([worse, gt]), np.array([0.2, 0.9], np.float32), _low_res([worse, gt])


def test_ground_truth_as_prediction_gives_one(tiny_val):
    gt_json = tiny_val / "instances.json"
    data = json.loads(gt_json.read_text())
    first = sorted(img["id"] for img in data["images"])[:4]
    expected = sum(1 for a in data["annotations"] if a["image_id"] in first and not a["iscrowd"])
    fake = GroundTruthPredictor(gt_json, tiny_val / "images", first)
    metrics = evaluate_prompts(
        fake, gt_json, tiny_val / "images", num_clicks=2, box=True, max_images=4
    )
    assert metrics["num_instances"] == expected > 0 and metrics["num_images"] == 4
    for key in ("mIoU_max", "mIoU_oracle", "mIoU_box", "mIoU_max@1", "mIoU_max@2", "mIoU_oracle@2"):
        assert metrics[key] == 1.0, key
    assert fake.calls == 2 * expected  # perfect after one click: no refinement call
    assert metrics["seconds_per_image"] >= 0


# ---------------------------------------------------------------------------- known perturbation


# (width of the image, height, rectangles x0, y0, side) — odd sides put the click on the centre
# pixel
SYNTH = [
    (64, 40, [(5, 5, 21), (40, 8, 15)]),
    (30, 20, [(3, 3, 9)]),
]


def _make_synthetic(tmp_path):
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i, (w, h, rects) in enumerate(SYNTH):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for x0, y0, s in rects:
            m = np.zeros((h, w), bool)
            m[y0 : y0 + s, x0 : x0 + s] = True
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": mask_to_rle(m),
                    "area": s * s,
                    "bbox": [x0, y0, s, s],
                }
            )
    # a crowd region the protocol must ignore
    crowd = np.zeros((40, 64), bool)
    crowd[30:38, 0:10] = True
    annotations.append(
        {
            "id": 99,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": mask_to_rle(crowd),
            "area": 80,
            "bbox": [0, 30, 10, 8],
        }
    )
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "gt.json"


class HalvesPredictor:
    """Knows each square; answers a click with the half (left/right) holding it, a box shifted by
    1 px.

    One click → [half with the click (score 0.9), whole square (score 0.1)]. Several clicks → the
    union of the halves that hold a positive click. It checks that refinement passes the accumulated
    clicks and the low-res logits of the mask it chose before.
    """

    def __init__(self):
        self.outputs = []  # low-res logits of every returned mask
        self.refine_calls = 0

    def set_image(self, image):
        h, w = image.shape[:2]
        self.hw = (h, w)
        self.rects = next(r for (W, H, r) in SYNTH if (W, H) == (w, h))

    def _mask(self, x0, x1, y0, y1):
        m = np.zeros(self.hw, bool)
        m[y0:y1, x0:x1] = True
        return m

    def _halves(self, point):
        x, y = point
        for x0, y0, s in self.rects:
            if x0 <= x < x0 + s and y0 <= y < y0 + s:
                mid = x0 + s // 2
                left, right = self._mask(x0, mid, y0, y0 + s), self._mask(mid, x0 + s, y0, y0 + s)
                return (left if x < mid else right), left | right
        raise AssertionError(f"click {point} is in no square")

    def _answer(self, masks, scores):
        low = _low_res(masks)
        self.outputs.extend(low)
        return np.stack(masks), np.array(scores, np.float32), low

    def predict(
        self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True
    ):
        if box is not None:
            assert not multimask_output
            x0, y0, x1, y1 = (int(v) for v in box)
            return self._answer([self._mask(x0 + 1, x1 + 1, y0, y1)], [0.5])
        if len(point_coords) == 1:
            assert mask_input is None and multimask_output
            half, whole = self._halves(point_coords[0])
            return self._answer([half, whole], [0.9, 0.1])
        self.refine_calls += 1
        assert mask_input.shape == (1, 256, 256) and not multimask_output
        assert any(np.array_equal(mask_input[0], o) for o in self.outputs), (
            "mask_input is not a previous output"
        )
        assert len(point_coords) == len(point_labels) and list(point_labels) == [1] * len(
            point_labels
        )
        union = np.zeros(self.hw, bool)
        for p in point_coords:
            union |= self._halves(p)[0]
        return self._answer([union], [0.9])


def test_known_perturbation_values(tmp_path):
    gt_json = _make_synthetic(tmp_path)
    fake = HalvesPredictor()
    m = evaluate_prompts(lambda: fake, gt_json, tmp_path, num_clicks=3, box=True)
    # the click on a square of odd side s lands in its right half, which has s//2 + 1 columns
    first = [11 / 21, 8 / 15, 5 / 9]
    assert m["num_instances"] == 3 and m["num_images"] == 2
    assert m["mIoU_max"] == pytest.approx(np.mean(first), abs=1e-12)
    assert m["mIoU_max@1"] == m["mIoU_max"]
    assert m["mIoU_oracle"] == 1.0 and m["mIoU_oracle@3"] == 1.0
    # the second click goes into the missing left half, whose union with the right is the square
    assert m["mIoU_max@2"] == 1.0 and m["mIoU_max@3"] == 1.0
    assert fake.refine_calls == 3
    # box shifted right by one pixel: IoU (s - 1) / (s + 1)
    assert m["mIoU_box"] == pytest.approx(np.mean([20 / 22, 14 / 16, 8 / 10]), abs=1e-12)


def test_single_click_keys_and_no_box(tmp_path):
    gt_json = _make_synthetic(tmp_path)
    m = evaluate_prompts(
        HalvesPredictor(), json.loads(gt_json.read_text()), tmp_path, box=False, max_images=1
    )
    assert set(m) == {"mIoU_max", "mIoU_oracle", "num_instances", "num_images", "seconds_per_image"}
    assert m["num_instances"] == 2 and m["mIoU_max"] == pytest.approx((11 / 21 + 8 / 15) / 2)


def test_wrong_mask_shape_is_reported(tmp_path):
    gt_json = _make_synthetic(tmp_path)

    class Bad(HalvesPredictor):
        def predict(self, **kw):
            masks, scores, low = super().predict(**kw)
            return masks[:, :-1], scores, low

    with pytest.raises(ValueError, match="masks of shape"):
        evaluate_prompts(Bad(), gt_json, tmp_path)


def test_cli_writes_metrics_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    gt_json = _make_synthetic(tmp_path)
    assert (
        main(
            [
                "--gt",
                str(tmp_path / "missing.json"),
                "--images",
                str(tmp_path),
                "--backend",
                "sam",
                "--sam-checkpoint",
                "x.pth",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "missing.json" in err and err.count("\n") == 1
    assert (
        main(
            [
                "--gt",
                str(gt_json),
                "--images",
                str(tmp_path),
                "--backend",
                "sam",
                "--sam-checkpoint",
                str(tmp_path / "nope.pth"),
            ]
        )
        == 2
    )
    assert "nope.pth" in capsys.readouterr().err

    monkeypatch.setattr(prompt_eval, "build_unsam_predictor", lambda *a, **k: HalvesPredictor())
    out = tmp_path / "sub" / "m.json"
    assert (
        main(
            [
                "--gt",
                str(gt_json),
                "--images",
                str(tmp_path),
                "--out",
                str(out),
                "--clicks",
                "2",
                "--config-file",
                "unused.yaml",
                "--opts",
                "MODEL.WEIGHTS",
                "w.pth",
            ]
        )
        == 0
    )
    written = json.loads(out.read_text())
    assert (
        written["mIoU_oracle"] == 1.0
        and written["mIoU_max@2"] == 1.0
        and written["num_instances"] == 3
    )
    assert "mIoU_max" in capsys.readouterr().out


def test_unsam_backend_modes_and_bad_weights(tmp_path, capsys, caplog):
    """--mode select with a whole-image checkpoint scores; weights of another model exit 2."""
    import logging

    import torchvision
    from detectron2.modeling import build_model

    import unsam.modeling  # noqa: F401
    from unsam.config.loading import load_config

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "unsam_tiny.yaml")
    opts = ["MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", "128"]
    torch.save({"model": build_model(load_config(tiny, opts)).state_dict()}, tmp_path / "whole.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    gt_json = _make_synthetic(tmp_path)
    args = [
        "--gt",
        str(gt_json),
        "--images",
        str(tmp_path),
        "--backend",
        "unsam",
        "--config-file",
        tiny,
        "--device",
        "cpu",
        "--no-box",
    ]
    with caplog.at_level(logging.INFO, logger="unsam.predictor"):
        assert (
            main(
                [
                    *args,
                    "--mode",
                    "select",
                    "--out",
                    str(tmp_path / "m.json"),
                    "--opts",
                    *opts,
                    "MODEL.WEIGHTS",
                    str(tmp_path / "whole.pth"),
                ]
            )
            == 0
        )
    assert any("prompt mode 'select'" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "m.json").read_text())["num_instances"] == 3
    capsys.readouterr()
    assert main([*args, "--opts", *opts, "MODEL.WEIGHTS", str(tmp_path / "resnet18.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "resnet18.pth" in err[0]


# ---------------------------------------------------------------------------- SAM backend


def tiny_sam(dim: int = 32):
    """segment_anything's SAM at 1024 px input with a 1-block, 64-wide ViT and a small decoder."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024,
            patch_size=16,
            embed_dim=64,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@pytest.fixture
def tiny_sam_checkpoint(tmp_path, monkeypatch):
    """A random tiny SAM saved as ``sam_vit_b_tiny.pth``; the registry's vit_b builds that
    architecture."""
    import segment_anything

    monkeypatch.setitem(
        segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam()
    )
    path = tmp_path / "sam_vit_b_tiny.pth"
    reference = tiny_sam()
    torch.save(reference.state_dict(), path)
    return path, reference


def test_sam_backend_loads_checkpoint(tiny_sam_checkpoint):
    path, reference = tiny_sam_checkpoint
    predictor = build_sam_predictor(str(path), device="cpu")  # vit_b inferred from the name
    from segment_anything import SamPredictor

    assert isinstance(predictor, SamPredictor)
    loaded = predictor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())


def test_sam_backend_rejects_mismatching_checkpoint(tmp_path, tiny_sam_checkpoint):
    wrong = tmp_path / "other.pth"
    torch.save(tiny_sam(dim=16).state_dict(), wrong)
    with pytest.raises(prompt_eval.EvaluationInputError, match="does not fit model 'vit_b'"):
        build_sam_predictor(str(wrong), "vit_b", "cpu")


def test_sam_backend_cli_end_to_end(tiny_val, tiny_sam_checkpoint, tmp_path, capsys):
    path, _ = tiny_sam_checkpoint
    out = tmp_path / "m.json"
    rc = main(
        [
            "--gt",
            str(tiny_val / "instances.json"),
            "--images",
            str(tiny_val / "images"),
            "--out",
            str(out),
            "--backend",
            "sam",
            "--sam-checkpoint",
            str(path),
            "--sam-model",
            "vit_b",
            "--clicks",
            "2",
            "--max-images",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    for key in ("mIoU_max", "mIoU_oracle", "mIoU_box", "mIoU_max@2", "mIoU_oracle@2"):
        assert 0.0 <= m[key] <= 1.0, key
    assert (
        m["mIoU_oracle"] >= m["mIoU_max"] and m["num_instances"] > 0 and m["seconds_per_image"] > 0
    )


def test_refine_multimask_keeps_each_tracks_rule(tmp_path):
    gt_json = _make_synthetic(tmp_path)

    class Multi(HalvesPredictor):
        def predict(
            self,
            point_coords=None,
            point_labels=None,
            box=None,
            mask_input=None,
            multimask_output=True,
        ):
            if box is not None or len(point_coords) == 1:
                return super().predict(
                    point_coords, point_labels, box, mask_input, multimask_output
                )
            assert multimask_output and mask_input.shape == (1, 256, 256)
            self.refine_calls += 1
            first, whole = self._halves(point_coords[0])
            return self._answer([first, whole], [0.9, 0.1])  # the top score stays on the wrong half

    fake = Multi()
    m = evaluate_prompts(fake, gt_json, tmp_path, num_clicks=3, box=False, refine_multimask=True)
    first = np.mean([11 / 21, 8 / 15, 5 / 9])
    assert m["mIoU_max@3"] == pytest.approx(first) and m["mIoU_oracle@3"] == 1.0
    assert fake.refine_calls == 2 * 3  # max track only: the oracle track starts perfect
