"""Evaluate pseudo labels against COCO-format ground truth (class-agnostic).

::

    python -m unsam.pseudo.evaluate --gt instances.json --pred DIR --out m.json

Every ``DIR/<stem>.json`` (SA-1B format, as written by ``python -m unsam.pseudo``) is matched to
the GT image whose ``file_name`` has the same stem (``<stem>.jpg``); the image record's own
``file_name`` is used as a fallback key. Each annotation becomes a COCO result with its
``predicted_iou`` as the score (the engine's documented heuristic); all GT instances count as one
class. Metrics (AR@1/10/100/1000, AP, AP50, ARs/m/l@1000) come from
:mod:`unsam.evaluation.whole_image` and are evaluated over the GT images that have a prediction
file (``--all-images`` counts missing files as empty predictions instead).

The ground truth is checked by :func:`unsam.evaluation.whole_image.load_coco_gt`; an annotation
without ``predicted_iou`` is refused with the file and its index (see :func:`_scores`).
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import unsam.compat  # noqa: F401  (compat before detectron2)

logger = logging.getLogger(__name__)


SCORE_KEY = "predicted_iou"


def _scores(path: Path, annotations: List[Dict]) -> List[float]:
    """The ranking score of each annotation of one pseudo-label file.

    AP and AR@k rank the masks by this score. Without it every mask would get the same stand-in
    and the ranking would be the file's order, so the metrics would measure nothing; skipping the
    annotations that lack it would drop masks and change recall without a word. Either way the
    file is refused (``read_sa1b_json`` has already refused non-finite values).
    """
    missing = [i for i, ann in enumerate(annotations) if SCORE_KEY not in ann]
    if missing and len(missing) == len(annotations):
        raise ValueError(f"{path}: no annotation has '{SCORE_KEY}', the score that ranks the masks")
    if missing:
        raise ValueError(
            f"{path}: annotation {missing[0]} has no '{SCORE_KEY}' ({len(missing)} of "
            f"{len(annotations)} annotations lack it)"
        )
    return [float(ann[SCORE_KEY]) for ann in annotations]


def _prediction_files(pred_dir) -> List[Path]:
    """The ``*.json`` files of ``--pred``; a file there (a COCO GT?) is named as a likely swap."""
    from ..evaluation.whole_image import SWAP_HINT

    if Path(pred_dir).is_file():
        raise ValueError(
            f"--pred '{pred_dir}' is a file, not a folder of SA-1B pseudo-label JSON files; "
            f"{SWAP_HINT}"
        )
    files = sorted(Path(pred_dir).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no pseudo-label JSON files in {pred_dir}")
    return files


def load_predictions(gt_images: List[Dict], pred_dir) -> Tuple[List[Dict], List[int], List[str]]:
    """→ (COCO results, matched GT image ids, unmatched prediction files)."""
    from ..io.sa1b import read_sa1b_json

    by_stem = {Path(im["file_name"]).stem: im for im in gt_images}
    results, matched, unmatched = [], [], []
    files = _prediction_files(pred_dir)
    for f in files:
        data = read_sa1b_json(f)
        im = by_stem.get(f.stem) or by_stem.get(Path(str(data["image"].get("file_name", ""))).stem)
        if im is None:
            unmatched.append(f.name)
            continue
        h, w = int(data["image"]["height"]), int(data["image"]["width"])
        if (h, w) != (int(im["height"]), int(im["width"])):
            raise ValueError(
                f"{f}: image size {w}x{h} differs from GT {im['width']}x{im['height']} "
                f"for {im['file_name']}"
            )
        matched.append(int(im["id"]))
        for ann, score in zip(data["annotations"], _scores(f, data["annotations"])):
            results.append(
                {
                    "image_id": int(im["id"]),
                    "segmentation": dict(ann["segmentation"]),
                    "category_id": 1,
                    "score": score,
                }
            )
    return results, matched, unmatched


def evaluate_dir(gt_path, pred_dir, all_images: bool = False) -> Dict[str, float]:
    from ..evaluation.whole_image import coco_eval_agnostic, load_coco_gt

    coco = load_coco_gt(str(gt_path))
    results, matched, unmatched = load_predictions(coco.dataset["images"], pred_dir)
    if unmatched:
        logger.warning(
            "%d prediction files match no GT image (e.g. %s)", len(unmatched), unmatched[0]
        )
    if not matched:
        raise ValueError(f"no file in {pred_dir} matches an image of {gt_path}")
    image_ids = sorted(coco.getImgIds()) if all_images else sorted(set(matched))
    metrics = coco_eval_agnostic(coco, results, image_ids)
    metrics["num_images"] = float(len(image_ids))
    metrics["masks_per_image"] = len(results) / max(1, len(set(matched)))
    return metrics


def main(argv=None) -> int:
    from ..evaluation.whole_image import evaluation_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gt", required=True, help="COCO instances JSON")
    ap.add_argument("--pred", required=True, help="folder of per-image SA-1B JSON files")
    ap.add_argument("--out", default=None, help="write the metrics JSON here")
    ap.add_argument(
        "--all-images",
        action="store_true",
        help="evaluate every GT image (missing prediction files count as empty)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return evaluation_cli(lambda: evaluate_dir(args.gt, args.pred, args.all_images), args.out)


if __name__ == "__main__":
    sys.exit(main())
