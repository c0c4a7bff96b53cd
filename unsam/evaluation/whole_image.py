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
yet) and gives zeros with a warning. In training, :class:`ClassAgnosticEvaluator` is the detectron2 evaluator; it
RLE-encodes each image's masks as it goes, so full-resolution masks are never accumulated.
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
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import unsam.compat  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..data.sa1b import mask_to_rle, validate_rle
from ..utils.files import atomic_write

logger = logging.getLogger(__name__)

MAX_DETS = (1, 10, 100, 1000)
METRIC_KEYS = ("AR@1", "AR@10", "AR@100", "AR@1000", "AP", "AP50", "ARs@1000", "ARm@1000", "ARl@1000")


class PredictionError(ValueError):
    """Predictions that cannot be evaluated; the message counts them and names the first."""


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
    """Raise :class:`PredictionError` unless every prediction can be evaluated against ``coco_gt``."""
    if not isinstance(predictions, list):
        raise PredictionError(f"{source}: expected a JSON list of COCO results")
    bad = []
    for i, p in enumerate(predictions):
        problem = _prediction_problem(coco_gt, p)
        if problem:
            bad.append((i, problem))
    if bad:
        i, problem = bad[0]
        raise PredictionError(f"{source}: {len(bad)} of {len(predictions)} predictions cannot be evaluated; "
                              f"first: prediction {i}: {problem}")


def _mean_valid(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(x.mean()) if x.size else 0.0


def coco_eval_agnostic(coco_gt: COCO, predictions: List[Dict], image_ids=None,
                       source: str = "predictions") -> Dict[str, float]:
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
        q = dict(p, category_id=category)
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
    metrics = {f"AR@{d}": _mean_valid(recall[:, :, areas["all"], m]) for m, d in enumerate(MAX_DETS)}
    metrics["AP"] = _mean_valid(precision[:, :, :, areas["all"], last])
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    metrics["AP50"] = _mean_valid(precision[iou50, :, :, areas["all"], last])
    for short, name in (("s", "small"), ("m", "medium"), ("l", "large")):
        metrics[f"AR{short}@1000"] = _mean_valid(recall[:, :, areas[name], last])
    return {k: metrics[k] for k in METRIC_KEYS}


def load_coco_gt(gt) -> COCO:
    """A pycocotools COCO object from a path or an already-built COCO dict (quietly)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, (str, os.PathLike)):
            if not os.path.isfile(gt):
                raise FileNotFoundError(f"ground-truth file '{gt}' not found")
            return COCO(str(gt))
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
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
    """What every evaluation CLI ends with: the metrics line on stdout, and ``--out`` if given."""
    print(format_metrics(metrics))
    if out:
        write_metrics_json(out, metrics)


def evaluation_cli(compute: Callable[[], Dict[str, float]], out: Optional[str] = None) -> int:
    """Run ``compute`` and report its metrics (exit status 0), or print its bad-input error as one
    ``error:`` line (exit status 2)."""
    try:
        metrics = compute()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report_metrics(metrics, out)
    return 0


def format_metrics(metrics: Dict[str, float]) -> str:
    """One log line: AR/AP keys as percentages, any extra key (counts, seconds) as is."""
    return "  ".join(f"{k} {100 * v:.1f}" if k in METRIC_KEYS else f"{k} {v:.3g}" for k, v in metrics.items())


def dataset_dicts_to_coco(dicts: List[Dict]) -> Dict:
    """Class-agnostic COCO GT dict from detectron2 dataset dicts (polygon or RLE masks)."""
    images, annotations = [], []
    for d in dicts:
        images.append({"id": d["image_id"], "width": d["width"], "height": d["height"],
                       "file_name": os.path.basename(d["file_name"])})
        for ann in d.get("annotations", []):
            seg = ann["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
                seg = dict(seg, counts=seg["counts"].decode("ascii"))
            bbox = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS)
            annotations.append({
                "id": len(annotations) + 1, "image_id": d["image_id"], "category_id": 1,
                "segmentation": seg, "bbox": [float(b) for b in bbox],
                "area": float(ann.get("area") or bbox[2] * bbox[3]),
                "iscrowd": int(ann.get("iscrowd", 0)),
            })
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "object"}]}


def instances_to_coco_results(instances, image_id) -> List[Dict]:
    """detectron2 ``Instances`` (``pred_masks`` bool H×W, ``scores``) → COCO result dicts."""
    if len(instances) == 0:
        return []
    scores = instances.scores.tolist()
    results = []
    for k in range(len(instances)):
        mask = instances.pred_masks[k].cpu().numpy()
        results.append({"image_id": image_id, "category_id": 1,
                        "segmentation": mask_to_rle(mask), "score": float(scores[k])})
    return results


class ClassAgnosticEvaluator(DatasetEvaluator):
    """detectron2 evaluator for class-agnostic AR/AP on any registered instance dataset.

    The GT comes from the dataset metadata's ``json_file`` when it has one, else it is built
    from the dataset dicts. Results are gathered over ranks; rank 0 returns ``{"segm": metrics}``.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True):
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
            self._predictions.extend(instances_to_coco_results(out["instances"].to("cpu"), inp["image_id"]))

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
        logger.info("class-agnostic evaluation on %s: %s", self.dataset_name, format_metrics(metrics))
        if self.output_dir:
            write_metrics_json(os.path.join(self.output_dir, "metrics_agnostic.json"), metrics)
        return OrderedDict(segm=metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unsam.evaluation.whole_image",
        description="Class-agnostic COCO AR/AP of predicted masks (COCO results JSON with RLE).",
    )
    parser.add_argument("--gt", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--pred", required=True, help="COCO results JSON: image_id, segmentation (RLE), score")
    parser.add_argument("--out", help="write the metrics as flat JSON here")
    args = parser.parse_args(argv)

    def compute() -> Dict[str, float]:
        coco_gt = load_coco_gt(args.gt)
        with open(args.pred) as f:
            predictions = json.load(f)
        if not isinstance(predictions, list) or not predictions:
            raise PredictionError(f"{args.pred}: expected a non-empty JSON list of COCO results")
        return coco_eval_agnostic(coco_gt, predictions, source=args.pred)

    return evaluation_cli(compute, args.out)


if __name__ == "__main__":
    sys.exit(main())
