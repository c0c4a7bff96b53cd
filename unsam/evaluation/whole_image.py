"""Class-agnostic COCO evaluation of whole-image ("segment everything") masks.

All instances count as one class (``useCats=0``); recall is measured at 1/10/100/1000 detections
per image, AP/AP50 at 1000 detections. Metrics are fractions in [0, 1] with the keys of
:data:`METRIC_KEYS`, the ``--out`` convention shared by every evaluation CLI of the project.

Standalone::

    python -m unsam.evaluation.whole_image --gt instances.json --pred results.json --out m.json

where ``results.json`` is in the COCO results format (``image_id``, RLE ``segmentation``,
``score``). Predictions are checked before evaluating: an unknown ``image_id``, a missing or
non-finite ``score`` or an RLE whose size differs from its GT image would otherwise be dropped,
mis-ranked or scored as misses without a word, so they are a :class:`PredictionError` (the CLI:
one ``error:`` line, exit status 2), as is an empty prediction list on the command line. An
empty list passed to :func:`coco_eval_agnostic` is legitimate (a model that detects nothing
yet) and gives zeros with a warning. Uncompressed RLEs (``counts`` a list of ints, valid COCO) are
compressed before pycocotools sees them.

A ground-truth file is checked as well (:func:`check_coco_gt`): duplicate annotation ids
(pycocotools keeps one of each, silently), no non-crowd annotation (nothing to recall: every
metric would be 0) and undecodable segmentations are a :class:`GroundTruthError`, and a results
list or a pseudo-label file or folder given as ``--gt`` is named as a likely swap of ``--gt`` and
``--pred``. ``--out`` names the metrics file; a folder there is refused before any work
(:func:`check_out_path`).

In training, :class:`ClassAgnosticEvaluator` is the detectron2 evaluator; it RLE-encodes each
image's masks as it goes, so full-resolution masks are never accumulated.
"""

import argparse
import contextlib
import copy
import io
import itertools
import json
import logging
import math
import os
import sys
from collections import Counter, OrderedDict
from typing import Callable, Dict, List, Optional

import unsam.compat  # noqa: F401

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..io.sa1b import mask_to_rle, validate_rle
from ..utils.files import OutputError, atomic_write

logger = logging.getLogger(__name__)

MAX_DETS = (1, 10, 100, 1000)
METRIC_KEYS = (
    "AR@1",
    "AR@10",
    "AR@100",
    "AR@1000",
    "AP",
    "AP50",
    "ARs@1000",
    "ARm@1000",
    "ARl@1000",
)


SWAP_HINT = "did you swap --gt and --pred?"


class PredictionError(ValueError):
    """Predictions that cannot be evaluated; the message counts them and names the first."""


class GroundTruthError(ValueError):
    """A ground truth that cannot give meaningful metrics; the message names the file and the
    problem."""


# ----------------------------------------------------------------------------- ground truth
def read_gt_json(path) -> Dict:
    """The JSON of a ground-truth file, refusing what is plainly not a COCO instances file.

    The shapes of prediction inputs (a results list, a pseudo-label file or folder) get a hint
    that ``--gt`` and ``--pred`` were swapped: that is the likely mistake, and pycocotools would
    answer it with an ``AssertionError`` or a ``KeyError``.
    """
    if os.path.isdir(path):
        raise GroundTruthError(
            f"ground truth '{path}' is a folder (of pseudo labels?), not a COCO instances "
            f"JSON file; {SWAP_HINT}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground-truth file '{path}' not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise GroundTruthError(f"ground-truth file '{path}' is not JSON: {e}") from None
    if isinstance(data, list):
        raise GroundTruthError(
            f"ground-truth file '{path}' is a JSON list (COCO results?), not a COCO "
            f"instances dict; {SWAP_HINT}"
        )
    if isinstance(data, dict) and "image" in data and "images" not in data:
        raise GroundTruthError(
            f"ground-truth file '{path}' is an SA-1B pseudo-label file, not a COCO "
            f"instances JSON; {SWAP_HINT}"
        )
    return data


def _segmentation_problem(seg, size) -> Optional[str]:
    """Why pycocotools cannot decode one GT segmentation (polygons or RLE), or None.

    pycocotools raises ``IndexError`` for ``[]`` and fails on a first polygon of fewer than 6
    numbers (it takes 4 for a box); it decodes shorter polygons after the first as empty, as the
    official COCO evaluation does, so those are accepted. An RLE must cover its image exactly.
    """
    if isinstance(seg, dict):
        try:
            validate_rle(seg, size)
        except ValueError as e:
            return str(e)
        return None
    if not isinstance(seg, list) or not seg:
        return f"segmentation {seg!r} is empty or not polygons/RLE"
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
        ):
            return f"polygon {k} is not a list of numbers"
    if len(seg[0]) < 6:
        return "polygon 0 is not a list of at least 6 numbers (3 points)"
    return None


def _image_sizes(images, source: str) -> Dict:
    """``{image id: (height, width)}``; refuses image records pycocotools cannot decode masks
    for."""
    sizes = {}
    for i, im in enumerate(images):
        try:
            sizes[im["id"]] = (int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError):
            raise GroundTruthError(
                f"{source}: image record {i} needs 'id' and integer 'height' and 'width'"
            ) from None
    return sizes


def _check_unique_ids(annotations: List[Dict], source: str) -> None:
    """pycocotools indexes annotations by id: a duplicate silently replaces the first one."""
    counts = Counter(ann["id"] for ann in annotations)
    duplicated = [(i, n) for i, n in counts.items() if n > 1]
    if duplicated:
        i, n = duplicated[0]
        raise GroundTruthError(
            f"{source}: annotation id {i!r} occurs {n} times ({len(duplicated)} duplicated "
            f"id(s)); annotation ids must be unique"
        )


def check_coco_gt(data, source: str) -> None:
    """Raise :class:`GroundTruthError`, naming ``source``, unless ``data`` is a COCO ground truth
    that can give meaningful metrics (see the module docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise GroundTruthError(f"{source}: no 'images' list; not a COCO instances JSON")
    sizes = _image_sizes(data["images"], source)
    if "annotations" not in data:
        raise GroundTruthError(
            f"{source}: no non-crowd annotations (no 'annotations' key): nothing to recall"
        )
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise GroundTruthError(f"{source}: 'annotations' is not a list")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
            raise GroundTruthError(f"{source}: annotation {i} needs 'id' and 'image_id'")
        problem = _segmentation_problem(ann.get("segmentation"), sizes.get(ann["image_id"]))
        if problem:
            raise GroundTruthError(f"{source}: annotation id {ann['id']!r}: {problem}")
    _check_unique_ids(annotations, source)
    if all(ann.get("iscrowd", 0) for ann in annotations):
        raise GroundTruthError(
            f"{source}: no non-crowd annotations ({len(annotations)} annotation(s), all "
            f"iscrowd=1): nothing to recall"
        )


# ----------------------------------------------------------------------------- predictions


def _prediction_problem(coco_gt: COCO, p) -> Optional[str]:
    """Why one COCO result cannot be evaluated against ``coco_gt``, or None."""
    if not isinstance(p, dict):
        return "not a JSON object"
    image = coco_gt.imgs.get(p.get("image_id"))
    if image is None:
        return f"image_id {p.get('image_id')!r} is not an image of the ground truth"
    score = p.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"score {score!r} is not a finite number"
    try:
        validate_rle(p.get("segmentation"), (image["height"], image["width"]))
    except ValueError as e:
        return f"segmentation of image {p['image_id']}: {e}"
    return None


def check_predictions(coco_gt: COCO, predictions, source: str = "predictions") -> None:
    """Raise :class:`PredictionError` unless every prediction can be evaluated against
    ``coco_gt``."""
    if not isinstance(predictions, list):
        raise PredictionError(f"{source}: expected a JSON list of COCO results")
    bad = []
    for i, p in enumerate(predictions):
        problem = _prediction_problem(coco_gt, p)
        if problem:
            bad.append((i, problem))
    if bad:
        i, problem = bad[0]
        raise PredictionError(
            f"{source}: {len(bad)} of {len(predictions)} predictions cannot be evaluated; "
            f"first: prediction {i}: {problem}"
        )


def _compressed_rle(rle: Dict) -> Dict:
    """A compressed RLE for pycocotools' ``loadRes``, which cannot take list ``counts``."""
    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return rle


def _mean_valid(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(x.mean()) if x.size else 0.0


def coco_eval_agnostic(
    coco_gt: COCO, predictions: List[Dict], image_ids=None, source: str = "predictions"
) -> Dict[str, float]:
    """Run pycocotools' segm evaluation with ``useCats=0`` and return :data:`METRIC_KEYS`.

    ``predictions``: COCO results (``image_id``, ``segmentation`` RLE, ``score``); category ids
    are ignored. ``image_ids`` restricts evaluation (default: every GT image). Raises
    :class:`PredictionError`, naming ``source``, for predictions that cannot be evaluated (see
    the module docstring).
    """
    if image_ids is None:
        image_ids = sorted(coco_gt.getImgIds())
    if not predictions:
        logger.warning("no predictions on %d images: every metric is 0", len(image_ids))
        return {k: 0.0 for k in METRIC_KEYS}
    check_predictions(coco_gt, predictions, source)
    category = coco_gt.getCatIds()[0] if coco_gt.getCatIds() else 1
    preds = []
    for p in predictions:
        q = dict(p, category_id=category, segmentation=_compressed_rle(p["segmentation"]))
        q.pop("bbox", None)  # loadRes derives boxes from the RLE
        preds.append(q)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = 0
        ev.params.maxDets = list(MAX_DETS)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # T×R×K×A×M
    recall = ev.eval["recall"]  # T×K×A×M
    areas = {name: i for i, name in enumerate(ev.params.areaRngLbl)}  # all, small, medium, large
    last = len(MAX_DETS) - 1
    metrics = {
        f"AR@{d}": _mean_valid(recall[:, :, areas["all"], m]) for m, d in enumerate(MAX_DETS)
    }
    metrics["AP"] = _mean_valid(precision[:, :, :, areas["all"], last])
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    metrics["AP50"] = _mean_valid(precision[iou50, :, :, areas["all"], last])
    for short, name in (("s", "small"), ("m", "medium"), ("l", "large")):
        metrics[f"AR{short}@1000"] = _mean_valid(recall[:, :, areas[name], last])
    return {k: metrics[k] for k in METRIC_KEYS}


def load_coco_gt(gt, check: bool = False) -> COCO:
    """A pycocotools COCO object from a path or an already-built COCO dict (quietly).

    A file, which a user hands us, is always checked (:func:`check_coco_gt`); a dict only with
    ``check``: the program builds those (e.g. per-level subsets that may lack non-crowd masks).
    """
    if isinstance(gt, (str, os.PathLike)):
        data = read_gt_json(gt)
        check_coco_gt(data, str(gt))
    else:
        if check:
            check_coco_gt(gt, "ground truth")
        data = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def evaluate_coco_json(gt, predictions: List[Dict], image_ids=None) -> Dict[str, float]:
    """Evaluate COCO-results ``predictions`` against ``gt`` (path or COCO dict)."""
    return coco_eval_agnostic(load_coco_gt(gt), predictions, image_ids)


def write_metrics_json(path, metrics: Dict[str, float]) -> None:
    """Write the flat ``--out`` JSON (keys of :data:`METRIC_KEYS` and any extras) atomically."""
    with atomic_write(path) as f:
        json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2)


def report_metrics(metrics: Dict[str, float], out: Optional[str] = None) -> None:
    """What every evaluation CLI ends with: ``--out`` if given, then the metrics line on stdout
    (in that order, so a write that fails prints no table that looks like success)."""
    if out:
        write_metrics_json(out, metrics)
    print(format_metrics(metrics))


def check_out_path(out: Optional[str]) -> None:
    """Refuse an ``--out`` that cannot be written as a file, before any (slow) evaluation.

    ``--out`` names the metrics file itself: a folder is refused rather than guessing a file
    name inside it, and so is a path under an existing file (no folder can be made there).
    """
    if not out:
        return
    if os.path.isdir(out):
        raise OutputError(
            f"--out '{out}' is a folder; give the metrics file, e.g. "
            f"'{os.path.join(out, 'metrics.json')}'"
        )
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"--out '{out}' cannot be written: '{parent}' is a file, not a folder")


def evaluation_cli(compute: Callable[[], Dict[str, float]], out: Optional[str] = None) -> int:
    """Run ``compute`` and report its metrics (exit status 0), or print its bad-input error as one
    ``error:`` line (exit status 2)."""
    try:
        check_out_path(out)
        report_metrics(compute(), out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def read_results_json(path) -> List[Dict]:
    """The non-empty COCO results list of ``--pred``; a COCO ground truth there is named as a
    likely swap of ``--gt`` and ``--pred``."""
    try:
        with open(path) as f:
            predictions = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise PredictionError(f"{path}: not JSON: {e}") from None
    if isinstance(predictions, dict) and "images" in predictions:
        raise PredictionError(
            f"{path}: is a COCO ground truth (it has 'images'), not a list of COCO results; "
            f"{SWAP_HINT}"
        )
    if not isinstance(predictions, list) or not predictions:
        raise PredictionError(f"{path}: expected a non-empty JSON list of COCO results")
    return predictions


# what format_metrics shows in percent: the quality fractions of every evaluator of the project
PERCENT_PREFIXES = ("AR", "AP", "mIoU")


def format_metrics(metrics: Dict[str, float]) -> str:
    """The one metrics line of every evaluator (whole-image, prompt, pseudo labels, trainer).

    ``key value`` pairs two spaces apart, in the dict's order. A quality fraction, a key that
    starts with ``AR``, ``AP`` or ``mIoU`` (:data:`METRIC_KEYS`, the prompt evaluator's
    ``mIoU_max`` / ``mIoU_oracle`` / ``mIoU_box`` and their ``@k``), is shown in percent with
    one decimal (0.4567 → ``45.7``); any other key (counts, seconds) with three significant
    digits (``num_images 40``, ``seconds_per_image 0.123``). ``--out`` files keep fractions.
    """
    return "  ".join(
        f"{k} {100 * v:.1f}" if k.startswith(PERCENT_PREFIXES) else f"{k} {v:.3g}"
        for k, v in metrics.items()
    )


def dataset_dicts_to_coco(dicts: List[Dict]) -> Dict:
    """Class-agnostic COCO GT dict from detectron2 dataset dicts (polygon or RLE masks)."""
    images, annotations = [], []
    for d in dicts:
        images.append(
            {
                "id": d["image_id"],
                "width": d["width"],
                "height": d["height"],
                "file_name": os.path.basename(d["file_name"]),
            }
        )
        for ann in d.get("annotations", []):
            seg = ann["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
                seg = dict(seg, counts=seg["counts"].decode("ascii"))
            bbox = BoxMode.convert(
                list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": d["image_id"],
                    "category_id": 1,
                    "segmentation": seg,
                    "bbox": [float(b) for b in bbox],
                    "area": float(ann.get("area") or bbox[2] * bbox[3]),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }


def instances_to_coco_results(instances, image_id) -> List[Dict]:
    """detectron2 ``Instances`` (``pred_masks`` bool H×W, ``scores``) → COCO result dicts."""
    if len(instances) == 0:
        return []
    scores = instances.scores.tolist()
    results = []
    for k in range(len(instances)):
        mask = instances.pred_masks[k].cpu().numpy()
        results.append(
            {
                "image_id": image_id,
                "category_id": 1,
                "segmentation": mask_to_rle(mask),
                "score": float(scores[k]),
            }
        )
    return results


class ClassAgnosticEvaluator(DatasetEvaluator):
    """detectron2 evaluator for class-agnostic AR/AP on any registered instance dataset.

    The GT comes from the dataset metadata's ``json_file`` when it has one, else it is built
    from the dataset dicts. Results are gathered over ranks; rank 0 returns ``{"segm": metrics}``.
    """

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.distributed = distributed
        self._predictions: List[Dict] = []
        self._image_ids: List = []

    def reset(self):
        self._predictions = []
        self._image_ids = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._image_ids.append(inp["image_id"])
            self._predictions.extend(
                instances_to_coco_results(out["instances"].to("cpu"), inp["image_id"])
            )

    def _ground_truth(self) -> COCO:
        meta = MetadataCatalog.get(self.dataset_name)
        json_file = getattr(meta, "json_file", None)
        if json_file:
            return load_coco_gt(json_file)
        return load_coco_gt(dataset_dicts_to_coco(DatasetCatalog.get(self.dataset_name)))

    def evaluate(self):
        predictions, image_ids = self._predictions, self._image_ids
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather((predictions, image_ids), dst=0)
            if not comm.is_main_process():
                return {}
            predictions = list(itertools.chain(*(g[0] for g in gathered)))
            image_ids = list(itertools.chain(*(g[1] for g in gathered)))
        if self.output_dir:
            with atomic_write(os.path.join(self.output_dir, "coco_instances_results.json")) as f:
                json.dump(predictions, f)
        coco_gt = self._ground_truth()
        # images with no prediction still count: evaluate every image that was processed
        metrics = coco_eval_agnostic(coco_gt, predictions, sorted(set(image_ids)) or None)
        logger.info(
            "class-agnostic evaluation on %s: %s", self.dataset_name, format_metrics(metrics)
        )
        if self.output_dir:
            write_metrics_json(os.path.join(self.output_dir, "metrics_agnostic.json"), metrics)
        return OrderedDict(segm=metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unsam.evaluation.whole_image",
        description="Class-agnostic COCO AR/AP of predicted masks (COCO results JSON with RLE).",
    )
    parser.add_argument("--gt", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument(
        "--pred", required=True, help="COCO results JSON: image_id, segmentation (RLE), score"
    )
    parser.add_argument("--out", help="write the metrics as flat JSON here")
    args = parser.parse_args(argv)

    def compute() -> Dict[str, float]:
        coco_gt = load_coco_gt(args.gt)
        return coco_eval_agnostic(coco_gt, read_results_json(args.pred), source=args.pred)

    return evaluation_cli(compute, args.out)


if __name__ == "__main__":
    sys.exit(main())
