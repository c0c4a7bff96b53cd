"""Trust nothing a user hands the evaluators (issue 26): degenerate ground truth, unranked
predictions, valid-but-unusual RLEs, a folder as ``--out``, swapped ``--gt``/``--pred`` and bad
prompt-evaluator options give one ``error:`` line and exit status 2, or real metrics.

The three CLIs are run in-process on a one-image ground truth whose predictions are perfect, so
any metric below 1 is the evaluator's fault.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unsam.evaluation import prompt as prompt_eval
from unsam.evaluation import whole_image
from unsam.io.sa1b import mask_to_rle
from unsam.pseudo import evaluate as pseudo_eval

from .test_reliability import TINY, _gt_dict, _one_error_line

H, W = 48, 64


def _mask() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[10:30, 10:40] = True
    return mask


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths (starting with zeros) in column-major order."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [H, W], "counts": runs}


def _degenerate(case: str) -> dict:
    gt = _gt_dict(_mask())
    if case == "duplicate ids":
        second = np.zeros((H, W), bool)
        second[35:45, 45:60] = True
        gt["annotations"].append(
            dict(gt["annotations"][0], segmentation=mask_to_rle(second), bbox=[45, 35, 15, 10])
        )
    elif case == "crowd only":
        gt["annotations"][0]["iscrowd"] = 1
    elif case == "no annotations key":
        del gt["annotations"]
    elif case == "empty segmentation":
        gt["annotations"].append(dict(gt["annotations"][0], id=2, segmentation=[]))
    elif case == "4-number polygon":
        gt["annotations"].append(dict(gt["annotations"][0], id=2, segmentation=[[1, 2, 3, 4]]))
    return gt


def _setup(tmp_path: Path, gt: dict, segmentation=None, scores=(0.9,)) -> dict:
    """gt.json, pred.json (COCO results), pred/ (SA-1B pseudo labels) and images/ in ``tmp_path``;
    every prediction is the GT mask (``segmentation`` overrides its RLE), one per score (None: no
    score)."""
    seg = segmentation or mask_to_rle(_mask())
    paths = {name: tmp_path / name for name in ("gt.json", "pred.json", "pred", "images")}
    paths["gt.json"].write_text(json.dumps(gt))
    results = [
        {"image_id": 1, "segmentation": seg, **({} if s is None else {"score": s})} for s in scores
    ]
    paths["pred.json"].write_text(json.dumps(results))
    anns = [
        {
            "id": i,
            "segmentation": seg,
            "area": int(_mask().sum()),
            **({} if s is None else {"predicted_iou": s}),
        }
        for i, s in enumerate(scores)
    ]
    paths["pred"].mkdir()
    (paths["pred"] / "img_0.json").write_text(
        json.dumps(
            {
                "image": {"image_id": 1, "height": H, "width": W, "file_name": "img_0.png"},
                "annotations": anns,
            }
        )
    )
    paths["images"].mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
        paths["images"] / "img_0.png"
    )
    return {k: str(v) for k, v in paths.items()}


def _run(evaluator: str, p: dict, out: str, *extra: str) -> int:
    """One evaluator CLI in-process; the prompt evaluator on the tiny config (CPU, random
    weights)."""
    if evaluator == "whole_image":
        return whole_image.main(
            ["--gt", p["gt.json"], "--pred", p["pred.json"], "--out", out, *extra]
        )
    if evaluator == "pseudo":
        return pseudo_eval.main(["--gt", p["gt.json"], "--pred", p["pred"], "--out", out, *extra])
    return prompt_eval.main(
        [
            "--gt",
            p["gt.json"],
            "--images",
            p["images"],
            "--out",
            out,
            "--config-file",
            TINY,
            *extra,
            "--opts",
            "MODEL.DEVICE",
            "cpu",
            "INPUT.IMAGE_SIZE",
            "64",
        ]
    )


EVALUATORS = ("whole_image", "pseudo", "prompt")


# ----------------------------------------------------------------------------- cases 1, 3, 9
@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(
    "case,named",
    [
        ("duplicate ids", ("annotation id 1", "occurs 2 times")),
        ("crowd only", ("no non-crowd annotations",)),
        ("no annotations key", ("no non-crowd annotations", "'annotations'")),
        ("empty segmentation", ("annotation id 2", "segmentation []")),
    ],
)
def test_degenerate_ground_truth_refused(tmp_path, capsys, evaluator, case, named):
    """Was: perfect predictions scored 0.0 (or 0.5 with a duplicate id), exit 0; ``[]`` and, in the
    prompt evaluator, the degenerate GTs gave tracebacks."""
    p = _setup(tmp_path, _degenerate(case))
    out = tmp_path / "m.json"
    assert _run(evaluator, p, str(out)) == 2
    _one_error_line(capsys.readouterr().err, "gt.json", *named)
    assert not out.exists()


def test_short_polygon_after_the_first_is_accepted_as_pycocotools_does(tmp_path):
    """Real COCO files hold such polygons; pycocotools decodes them as empty, refusing the file
    would not."""
    from unsam.evaluation.whole_image import _segmentation_problem

    assert _segmentation_problem([[10, 10, 30, 10, 30, 30], [1, 2, 3, 4]], (64, 64)) is None
    assert _segmentation_problem([[10, 10, 30, 10, 30, 30], ["x"]], (64, 64)) is not None


def test_polygon_pycocotools_takes_for_a_box_refused(tmp_path, capsys):
    p = _setup(tmp_path, _degenerate("4-number polygon"))
    assert _run("whole_image", p, str(tmp_path / "m.json")) == 2
    _one_error_line(capsys.readouterr().err, "gt.json", "annotation id 2", "polygon 0")


# ----------------------------------------------------------------------------- case 2
@pytest.mark.parametrize(
    "scores,named",
    [
        ((None,), ("no annotation has 'predicted_iou'",)),
        ((0.9, None, 0.5), ("annotation 1 has no 'predicted_iou'", "1 of 3")),
    ],
)
def test_pseudo_labels_without_predicted_iou_refused(tmp_path, capsys, scores, named):
    """Was: a missing predicted_iou became 1.0, so the ranking behind AP and AR@k was the file
    order."""
    p = _setup(tmp_path, _gt_dict(_mask()), scores=scores)
    assert _run("pseudo", p, str(tmp_path / "m.json")) == 2
    _one_error_line(capsys.readouterr().err, "img_0.json", *named)


@pytest.mark.parametrize("scores,named", [((None,), "prediction 0"), ((0.9, None), "prediction 1")])
def test_results_without_score_refused(tmp_path, capsys, scores, named):
    """Already refused before issue 26 (the check of issue 14); kept here as the proof."""
    p = _setup(tmp_path, _gt_dict(_mask()), scores=scores)
    assert _run("whole_image", p, str(tmp_path / "m.json")) == 2
    _one_error_line(capsys.readouterr().err, "pred.json", named, "score None")


# ----------------------------------------------------------------------------- case 4
@pytest.mark.parametrize("evaluator", ("whole_image", "pseudo"))
def test_uncompressed_rle_predictions_evaluated(tmp_path, capsys, evaluator):
    """Was (COCO results): ``TypeError: Expected bytes, got list`` from pycocotools' loadRes."""
    p = _setup(tmp_path, _gt_dict(_mask()), segmentation=_uncompressed(_mask()))
    out = tmp_path / "m.json"
    assert _run(evaluator, p, str(out)) == 0, capsys.readouterr().err
    metrics = json.loads(out.read_text())
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR@1"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- case 5
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_out_folder_refused_before_evaluating(tmp_path, capsys, evaluator):
    """Was: the metrics were computed and printed, then ``IsADirectoryError`` from the rename."""
    p = _setup(tmp_path, _gt_dict(_mask()))
    folder = tmp_path / "results"
    folder.mkdir()
    assert _run(evaluator, p, str(folder)) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, "--out", "results", "is a folder")
    assert "AR@1" not in captured.out and "mIoU" not in captured.out
    assert list(folder.iterdir()) == []


def test_out_under_a_file_refused(tmp_path, capsys):
    p = _setup(tmp_path, _gt_dict(_mask()))
    assert _run("whole_image", p, str(tmp_path / "gt.json" / "m.json")) == 2
    _one_error_line(capsys.readouterr().err, "--out", "gt.json", "is a file")


# ----------------------------------------------------------------------------- case 6
def test_swapped_gt_and_pred_named(tmp_path, capsys):
    """Was: an ``AssertionError`` traceback (whole_image), "ground-truth file ... not found" for a
    folder (pseudo), a ``KeyError`` for a pseudo-label file as GT."""
    p = _setup(tmp_path, _gt_dict(_mask()))
    assert whole_image.main(["--gt", p["pred.json"], "--pred", p["gt.json"]]) == 2
    _one_error_line(
        capsys.readouterr().err, "pred.json", "results", "did you swap --gt and --pred?"
    )
    assert pseudo_eval.main(["--gt", p["pred"], "--pred", p["gt.json"]]) == 2
    _one_error_line(capsys.readouterr().err, "pred", "folder", "did you swap --gt and --pred?")
    assert pseudo_eval.main(["--gt", str(Path(p["pred"]) / "img_0.json"), "--pred", p["pred"]]) == 2
    _one_error_line(
        capsys.readouterr().err, "img_0.json", "pseudo-label", "did you swap --gt and --pred?"
    )
    # only --pred wrong: a GT where results belong
    assert whole_image.main(["--gt", p["gt.json"], "--pred", p["gt.json"]]) == 2
    _one_error_line(
        capsys.readouterr().err, "gt.json", "ground truth", "did you swap --gt and --pred?"
    )
    assert pseudo_eval.main(["--gt", p["gt.json"], "--pred", p["gt.json"]]) == 2
    _one_error_line(
        capsys.readouterr().err, "gt.json", "is a file", "did you swap --gt and --pred?"
    )


# ----------------------------------------------------------------------------- cases 7, 8
@pytest.mark.parametrize("value", ["0", "-1"])
def test_prompt_max_images_below_one_refused(tmp_path, capsys, value):
    """Was: ``--max-images 0`` evaluated nothing and crashed in a reshape. Its help never said
    0 means all (the quickstart passes its own count straight through), so it is refused."""
    p = _setup(tmp_path, _gt_dict(_mask()))
    assert _run("prompt", p, str(tmp_path / "m.json"), "--max-images", value) == 2
    _one_error_line(capsys.readouterr().err, "--max-images", value)
    with pytest.raises(ValueError, match="max_images"):
        prompt_eval.evaluate_prompts(object(), p["gt.json"], p["images"], max_images=int(value))


class _NeverCalled:
    """A predictor the protocol must not reach."""

    def set_image(self, image):
        raise AssertionError("set_image called")

    def predict(self, **kwargs):
        raise AssertionError("predict called")


def test_prompt_no_instance_on_evaluated_images_refused(tmp_path):
    """Was: the same reshape traceback when the first ``max_images`` images hold only crowds."""
    gt = _gt_dict(_mask())
    gt["images"].append(dict(gt["images"][0], id=2, file_name="img_1.png"))
    gt["annotations"][0]["iscrowd"] = 1
    gt["annotations"].append(dict(gt["annotations"][0], id=2, image_id=2, iscrowd=0))
    p = _setup(tmp_path, gt)
    with pytest.raises(prompt_eval.EvaluationInputError, match="gt.json: no non-crowd"):
        prompt_eval.evaluate_prompts(_NeverCalled(), p["gt.json"], p["images"], max_images=1)


def test_prompt_device_without_gpu_refused(tmp_path, capsys, monkeypatch):
    """Was: a traceback from deep inside the model build on a machine without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = _setup(tmp_path, _gt_dict(_mask()))
    assert _run("prompt", p, str(tmp_path / "m.json"), "--device", "cuda") == 2
    _one_error_line(capsys.readouterr().err, "--device", "cuda")
    assert not (tmp_path / "m.json").exists()


def test_prompt_evaluator_still_scores_a_valid_ground_truth(tmp_path, capsys):
    """The control for the refusals above: the same files, tiny model with random weights."""
    p = _setup(tmp_path, _gt_dict(_mask()))
    out = tmp_path / "m.json"
    assert _run("prompt", p, str(out), "--device", "cpu", "--no-box") == 0, capsys.readouterr().err
    metrics = json.loads(out.read_text())
    assert metrics["num_instances"] == 1 and metrics["num_images"] == 1
    assert 0.0 <= metrics["mIoU_max"] <= 1.0


# ----------------------------------------------------------------------------- one image reader
class _Recorder:
    """A predictor that keeps the image it is given and answers with an empty mask."""

    def set_image(self, image):
        self.image = image.copy()

    def predict(
        self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True
    ):
        h, w = self.image.shape[:2]
        n = 3 if multimask_output else 1
        return (
            np.zeros((n, h, w), bool),
            np.zeros(n, np.float32),
            np.zeros((n, 256, 256), np.float32),
        )


def test_prompt_and_whole_image_evaluation_see_the_same_pixels(tmp_path):
    """Was: the prompt evaluator read with raw PIL, so a phone photo stored sideways with an EXIF
    Orientation tag was scored unrotated (and its size refused against the annotations), while
    the whole-image evaluator's mapper applied the tag."""
    from unsam.config.loading import load_config
    from unsam.data.mapper import UnSAMDatasetMapper
    from unsam.utils.images import read_rgb

    stored = np.random.default_rng(0).integers(0, 255, (W, H, 3), dtype=np.uint8)  # sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90° clockwise, H×W as the annotations
    path = tmp_path / "images" / "img_0.png"
    path.parent.mkdir()
    Image.fromarray(stored).save(path, exif=exif)
    shown = np.rot90(stored, k=-1)
    assert shown.shape[:2] == (H, W)
    recorder = _Recorder()
    gt = _gt_dict(_mask())
    prompt_eval.evaluate_prompts(recorder, gt, path.parent, box=False)
    np.testing.assert_array_equal(recorder.image, shown)
    mapper = UnSAMDatasetMapper(load_config(TINY), is_train=False)
    whole = mapper.read_image({"file_name": str(path), "height": H, "width": W})
    np.testing.assert_array_equal(recorder.image, whole)
    np.testing.assert_array_equal(recorder.image, read_rgb(path))


def test_prompt_evaluation_reads_16_bit_images_as_every_path_does(tmp_path):
    from unsam.utils.images import read_rgb

    gray = np.random.default_rng(1).integers(0, 65535, (H, W), dtype=np.uint16)
    path = tmp_path / "images" / "img_0.png"
    path.parent.mkdir()
    Image.fromarray(gray).save(path)
    recorder = _Recorder()
    prompt_eval.evaluate_prompts(recorder, _gt_dict(_mask()), path.parent, box=False)
    np.testing.assert_array_equal(recorder.image, read_rgb(path))
    np.testing.assert_array_equal(recorder.image[..., 0], (gray >> 8).astype(np.uint8))


def test_one_format_metrics_for_every_evaluator():
    """Was: two format_metrics (whole-image: only its nine keys in percent; prompt: mIoU*)."""
    assert prompt_eval.format_metrics is whole_image.format_metrics
    line = whole_image.format_metrics(
        {
            "AR@100": 0.4567,
            "mIoU_max@2": 0.5,
            "AP50": 1.0,
            "num_images": 40,
            "seconds_per_image": 0.1234,
        }
    )
    assert (
        line == "AR@100 45.7  mIoU_max@2 50.0  AP50 100.0  num_images 40  seconds_per_image 0.123"
    )
