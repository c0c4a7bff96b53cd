"""Prompt evaluation: 1-click (and k-click) mIoU and box-prompt mIoU on COCO-format ground truth.

The protocol is model-independent: any object with the ``segment_anything.SamPredictor``
interface can be measured, so UnSAM and SAM are compared on identical prompts::

    predictor.set_image(image)                     # H×W×3 uint8 RGB
    masks, iou_predictions, low_res_logits = predictor.predict(
        point_coords=N×2 float (x, y) | None, point_labels=N | None, box=4 | None,
        mask_input=1×256×256 | None, multimask_output=bool)
    # masks C×H×W bool, iou_predictions C, low_res_logits C×256×256

For every non-crowd, non-empty instance (class-agnostic):

- **1 click** at the interior point farthest from the boundary, ``multimask_output=True``;
  ``mIoU_max`` scores the output with the highest predicted IoU, ``mIoU_oracle`` the best output.
- **k clicks** (``num_clicks > 1``): the next click goes to the largest error region of the current
  mask (:func:`unsam.data.prompts.next_click`); clicks accumulate and the low-res logits of the
  current mask are passed back as ``mask_input``, as in SAM's interactive protocol. The "max" track
  continues from the top-scored first mask, the "oracle" track from the best one. Later clicks use
  ``multimask_output=False`` (SAM's advice for unambiguous multi-point prompts) unless
  ``refine_multimask``, in which case each track keeps picking by its own rule.
  Keys ``mIoU_max@k`` / ``mIoU_oracle@k`` for k = 1..K.
- **box** (``box=True``): the tight box of the GT mask, ``multimask_output=False`` → ``mIoU_box``.

Command line::

    python -m unsam.evaluation.prompt --gt instances.json --images DIR --out m.json \\
        --backend unsam --config-file cfg.yaml [--mode auto|learned|select] [--opts KEY VALUE ...]
    python -m unsam.evaluation.prompt --gt instances.json --images DIR --out m.json \\
        --backend sam --sam-checkpoint sam_vit_b_01ec64.pth --sam-model vit_b --clicks 5

Metrics are fractions in [0, 1]; ``seconds_per_image`` is predictor time (``set_image`` and every
``predict``) per evaluated image.
"""

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from ..data.prompts import farthest_interior_point, mask_to_box, next_click
from ..utils.device import DeviceError, check_device
from ..utils.files import OutputError
from ..utils.images import UnsupportedImageError, read_rgb
from .whole_image import (
    GroundTruthError,
    check_out_path,
    format_metrics,
    load_coco_gt,
    write_metrics_json,
)

logger = logging.getLogger(__name__)

SAM_MODELS = ("vit_b", "vit_l", "vit_h")


class EvaluationInputError(ValueError):
    """Missing/unreadable ground truth, image or checkpoint; the message is one line."""


# ----------------------------------------------------------------------------------------------
# inputs


def _load_gt(gt) -> COCO:
    """pycocotools COCO from a path or a COCO-format dict, checked like every evaluator's ground
    truth (:func:`unsam.evaluation.whole_image.check_coco_gt`: duplicate ids, no non-crowd
    instance, undecodable masks); a dict too, since any caller of :func:`evaluate_prompts` may
    hand one in."""
    if isinstance(gt, (str, os.PathLike)) and not os.path.exists(gt):
        raise EvaluationInputError(f"ground-truth file '{gt}' not found")
    return load_coco_gt(gt, check=True)


def _read_image(path: Path) -> np.ndarray:
    """H×W×3 uint8 RGB, read by the project's one reader (:func:`unsam.utils.images.read_rgb`:
    EXIF orientation applied, 16-bit scaled to 8), as the whole-image evaluator's mapper and the
    demos read it, so both evaluations see the same pixels of a photo."""
    if not path.is_file():
        raise EvaluationInputError(f"image '{path}' not found")
    try:
        return read_rgb(path)
    except (OSError, UnsupportedImageError) as e:
        raise EvaluationInputError(f"cannot read image '{path}': {e}") from None


def _instances(coco: COCO, img: Dict) -> List[np.ndarray]:
    """H×W bool masks of the image's non-crowd, non-empty annotations (in annotation id order)."""
    masks = []
    for ann in sorted(coco.loadAnns(coco.getAnnIds(imgIds=img["id"])), key=lambda a: a["id"]):
        if ann.get("iscrowd", 0):
            continue
        mask = coco.annToMask(ann).astype(bool)
        if mask.any():
            masks.append(mask)
        else:
            logger.debug(
                "annotation %s of image %s has an empty mask: skipped", ann["id"], img["id"]
            )
    return masks


# ----------------------------------------------------------------------------------------------
# protocol


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.count_nonzero(pred | gt)
    return float(np.count_nonzero(pred & gt)) / union if union else 1.0


class _Timed:
    """Wraps a predictor, normalising its outputs to numpy and adding up the time it takes."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.seconds = 0.0
        self.hw: Tuple[int, int] = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        self.hw = image.shape[:2]
        start = time.perf_counter()
        self.predictor.set_image(image)
        self.seconds += time.perf_counter() - start

    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask=True):
        """→ (masks C×H×W bool, scores C float, low-res logits C×h×w float32), all numpy."""
        start = time.perf_counter()
        masks, scores, low_res = self.predictor.predict(
            point_coords=points,
            point_labels=labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask,
        )
        self.seconds += time.perf_counter() - start
        masks, scores, low_res = _numpy(masks), _numpy(scores).reshape(-1), _numpy(low_res)
        if (
            masks.ndim != 3
            or masks.shape[1:] != tuple(self.hw)
            or len(masks) != len(scores)
            or not len(masks)
        ):
            raise ValueError(
                f"predictor returned masks of shape {masks.shape} and {len(scores)} scores "
                f"for a {self.hw[0]}x{self.hw[1]} image (expected C×H×W, C ≥ 1)"
            )
        return (
            masks.astype(bool, copy=False),
            scores.astype(np.float64),
            low_res.astype(np.float32, copy=False),
        )


def _refine(
    pred: _Timed, gt, click, first_mask, first_logits, first_iou, num_clicks, rule, multimask
) -> List[float]:
    """IoU after clicks 1..K of one track (``rule`` "max" or "oracle" picks among the outputs)."""
    points, labels = [click], [1]
    mask, logits, curve = first_mask, first_logits, [first_iou]
    for _ in range(2, num_clicks + 1):
        nxt = next_click(mask, gt)
        if nxt is None:  # already perfect: nothing left to click on
            curve.append(curve[-1])
            continue
        points.append(nxt[0])
        labels.append(nxt[1])
        masks, scores, low_res = pred.predict(
            np.asarray(points, np.float32),
            np.asarray(labels, np.int64),
            None,
            logits[None],
            multimask,
        )
        ious = [_iou(m, gt) for m in masks]
        j = int(np.argmax(scores)) if rule == "max" else int(np.argmax(ious))
        mask, logits = masks[j], low_res[j]
        curve.append(ious[j])
    return curve


def _evaluate_instance(
    pred: _Timed, gt: np.ndarray, num_clicks: int, box: bool, refine_multimask: bool
) -> Dict:
    click = farthest_interior_point(gt)
    masks, scores, low_res = pred.predict(
        np.asarray([click], np.float32), np.asarray([1], np.int64), None, None, True
    )
    ious = [_iou(m, gt) for m in masks]
    i_max, i_oracle = int(np.argmax(scores)), int(np.argmax(ious))
    out = {"max": [ious[i_max]], "oracle": [ious[i_oracle]]}
    if num_clicks > 1:
        out["max"] = _refine(
            pred,
            gt,
            click,
            masks[i_max],
            low_res[i_max],
            ious[i_max],
            num_clicks,
            "max",
            refine_multimask,
        )
        if i_oracle == i_max and not refine_multimask:
            out["oracle"] = list(out["max"])  # same start, single outputs: the same track
        else:
            out["oracle"] = _refine(
                pred,
                gt,
                click,
                masks[i_oracle],
                low_res[i_oracle],
                ious[i_oracle],
                num_clicks,
                "oracle",
                refine_multimask,
            )
    if box:
        masks, scores, _ = pred.predict(None, None, mask_to_box(gt), None, False)
        out["box"] = _iou(masks[int(np.argmax(scores))], gt)
    return out


@dataclass
class _PromptTally:
    """What the click/box protocol gathered over the evaluated images: per instance the IoU curve
    (clicks 1..K) of the "max" and of the "oracle" track, its box-prompt IoU (when boxes are
    prompted), and the number of images that had an instance to prompt."""

    per_click: Dict[str, List[List[float]]] = field(
        default_factory=lambda: {"max": [], "oracle": []}
    )
    box_ious: List[float] = field(default_factory=list)
    num_images: int = 0

    def add(self, res: Dict) -> None:
        """Record one instance's result from :func:`_evaluate_instance`."""
        self.per_click["max"].append(res["max"])
        self.per_click["oracle"].append(res["oracle"])
        if "box" in res:  # present exactly when boxes are prompted
            self.box_ious.append(res["box"])


def _resolve_predictor(predictor_factory_or_predictor):
    """Takes :func:`evaluate_prompts`' first argument; returns the predictor: the argument itself
    when it has ``set_image``/``predict`` and is not a class, else what calling it builds
    (``TypeError`` when it is neither)."""
    predictor = predictor_factory_or_predictor
    # a class has set_image/predict too, but is a factory
    if isinstance(predictor, type) or not (
        hasattr(predictor, "set_image") and hasattr(predictor, "predict")
    ):
        if not callable(predictor):
            raise TypeError(
                "expected a predictor with set_image/predict or a callable building one"
            )
        predictor = predictor()
    return predictor


def _set_image(timed: _Timed, coco: COCO, img: Dict, image_root: Path) -> List[np.ndarray]:
    """Takes one COCO image entry; returns its instance masks (:func:`_instances`) after reading
    the image and handing it to the predictor, or ``[]`` without reading it when it has none.
    Raises :class:`EvaluationInputError` when the image's size is not its annotations' size."""
    gts = _instances(coco, img)
    if not gts:
        return gts
    image = _read_image(image_root / img["file_name"])
    if image.shape[:2] != gts[0].shape:
        raise EvaluationInputError(
            f"image '{img['file_name']}' is {image.shape[1]}x{image.shape[0]} but its "
            f"annotations are {gts[0].shape[1]}x{gts[0].shape[0]}"
        )
    timed.set_image(image)
    return gts


def _prompt_images(
    timed: _Timed,
    coco: COCO,
    images: List[Dict],
    image_root: Path,
    num_clicks: int,
    box: bool,
    refine_multimask: bool,
) -> _PromptTally:
    """Takes the predictor, the ground truth and the image entries to evaluate (in order);
    prompts every instance of every image (images without one are skipped) and returns the
    :class:`_PromptTally` of the results."""
    tally = _PromptTally()
    with torch.no_grad():
        for img in tqdm(images, desc="prompt eval", unit="img", disable=None):
            gts = _set_image(timed, coco, img, image_root)
            if not gts:
                continue
            tally.num_images += 1
            for gt in gts:
                tally.add(_evaluate_instance(timed, gt, num_clicks, box, refine_multimask))
    return tally


def _prompt_metrics(
    tally: _PromptTally, num_clicks: int, box: bool, seconds: float
) -> Dict[str, float]:
    """Takes a non-empty :class:`_PromptTally` and the predictor's total time; returns the flat
    metrics of :func:`evaluate_prompts` (means over instances, time per evaluated image)."""
    n = len(tally.per_click["max"])

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else 0.0

    curves = {k: np.asarray(v, dtype=np.float64).reshape(n, -1) for k, v in tally.per_click.items()}
    metrics: Dict[str, float] = {
        "mIoU_max": mean(curves["max"][:, 0]),
        "mIoU_oracle": mean(curves["oracle"][:, 0]),
    }
    if box:
        metrics["mIoU_box"] = mean(tally.box_ious)
    if num_clicks > 1:
        for k in range(1, num_clicks + 1):
            metrics[f"mIoU_max@{k}"] = mean(curves["max"][:, k - 1])
            metrics[f"mIoU_oracle@{k}"] = mean(curves["oracle"][:, k - 1])
    metrics["num_instances"] = n
    metrics["num_images"] = tally.num_images
    metrics["seconds_per_image"] = seconds / tally.num_images if tally.num_images else 0.0
    return metrics


def evaluate_prompts(
    predictor_factory_or_predictor,
    gt_json,
    image_root,
    num_clicks: int = 1,
    box: bool = True,
    max_images: Optional[int] = None,
    refine_multimask: bool = False,
) -> Dict[str, float]:
    """Run the click/box protocol of this module over a COCO-format set; return flat metrics.

    ``predictor_factory_or_predictor``: an object with ``set_image``/``predict`` (SamPredictor
    interface) or a no-argument callable returning one. ``gt_json``: path or COCO dict;
    ``image_root``: folder of its ``file_name`` s. Images are taken in image-id order, the first
    ``max_images`` of them; images without a usable instance are skipped.
    Returns ``mIoU_max``, ``mIoU_oracle``, ``mIoU_box`` (when ``box``), ``mIoU_max@k`` and
    ``mIoU_oracle@k`` for k = 1..``num_clicks`` (when ``num_clicks > 1``), ``num_instances``,
    ``num_images`` and ``seconds_per_image``.

    Stages: :func:`_resolve_predictor`, :func:`_prompt_images` (per image :func:`_set_image`, per
    instance :func:`_evaluate_instance`), :func:`_prompt_metrics`.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    if max_images is not None and int(max_images) < 1:
        raise ValueError(f"max_images must be >= 1 (None: all images), got {max_images}")
    timed = _Timed(_resolve_predictor(predictor_factory_or_predictor))
    coco = _load_gt(gt_json)
    images = coco.loadImgs(sorted(coco.getImgIds()))
    if max_images is not None:
        images = images[: int(max_images)]

    tally = _prompt_images(timed, coco, images, Path(image_root), num_clicks, box, refine_multimask)
    if not tally.per_click["max"]:  # the GT has instances, but not on the first max_images images
        source = gt_json if isinstance(gt_json, (str, os.PathLike)) else "the ground truth"
        raise EvaluationInputError(
            f"{source}: no non-crowd, non-empty instance on the {len(images)} evaluated "
            f"image(s): nothing to prompt"
        )
    metrics = _prompt_metrics(tally, num_clicks, box, timed.seconds)
    logger.info("prompt evaluation: %s", format_metrics(metrics))
    return metrics


# ----------------------------------------------------------------------------------------------
# backends


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _infer_sam_model(checkpoint: str) -> str:
    """``sam_vit_b_01ec64.pth`` → ``vit_b``; default ``vit_h`` (SAM's own default)."""
    name = os.path.basename(checkpoint).lower()
    for model in SAM_MODELS:
        if model in name:
            return model
    return "vit_h"


def build_sam_predictor(
    checkpoint: str, model_type: Optional[str] = None, device: Optional[str] = None
):
    """``segment_anything.SamPredictor`` for a SAM checkpoint (``vit_b``/``vit_l``/``vit_h``).

    The model is built by ``sam_model_registry[model_type]`` and the state_dict loaded here with
    ``map_location`` (the registry's own loader has none, so GPU-saved checkpoints would fail on a
    CPU machine). Raises :class:`EvaluationInputError` for a missing or mismatching checkpoint.
    """
    if not checkpoint or not os.path.isfile(checkpoint):
        raise EvaluationInputError(f"SAM checkpoint '{checkpoint}' not found")
    import segment_anything

    model_type = model_type or _infer_sam_model(checkpoint)
    if model_type not in segment_anything.sam_model_registry:
        raise EvaluationInputError(
            f"unknown SAM model '{model_type}' (choose from {', '.join(SAM_MODELS)})"
        )
    device = device or _default_device()
    sam = segment_anything.sam_model_registry[model_type]()
    try:
        from ..checkpoint import read_pickled_weights  # the one weights reader: no pickle code runs

        state = read_pickled_weights(checkpoint, what="--sam-checkpoint")
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        sam.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluationInputError(
            f"SAM checkpoint '{checkpoint}' does not fit model '{model_type}' "
            f"(set --sam-model): {first}"
        ) from None
    except Exception as e:  # unpickling errors come in many types
        raise EvaluationInputError(f"cannot load SAM checkpoint '{checkpoint}': {e}") from None
    sam.to(device).eval()
    logger.info("SAM %s loaded from %s on %s", model_type, checkpoint, device)
    return segment_anything.SamPredictor(sam)


def build_unsam_predictor(
    config_file: Optional[str],
    opts: Sequence[str] = (),
    device: Optional[str] = None,
    mode: Optional[str] = None,
):
    """``unsam.predictor.PromptPredictor`` from a config (``MODEL.WEIGHTS`` names the checkpoint);
    ``mode`` (auto / learned / select) overrides ``UNSAM.PROMPT.MODE``."""
    from ..config.loading import load_config
    from ..predictor import PromptPredictor

    if not config_file:
        raise EvaluationInputError("--backend unsam needs --config-file")
    cfg = load_config(config_file, opts, freeze=False)
    cfg.MODEL.DEVICE = device or _default_device()
    if mode:
        cfg.UNSAM.PROMPT.MODE = mode
    cfg.freeze()
    return PromptPredictor.from_config(cfg)


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unsam.evaluation.prompt",
        description="1-click / k-click / box-prompt mIoU on COCO-format ground truth "
        "(class-agnostic).",
    )
    parser.add_argument("--gt", required=True, help="COCO instances JSON")
    parser.add_argument("--images", required=True, help="folder of the JSON's images")
    parser.add_argument("--out", help="write the metrics here (flat JSON, fractions)")
    parser.add_argument("--backend", choices=("unsam", "sam"), default="unsam")
    parser.add_argument("--config-file", help="UnSAM config (--backend unsam)")
    parser.add_argument(
        "--mode",
        choices=("auto", "learned", "select"),
        help="UnSAM prompt mode (default: the config's UNSAM.PROMPT.MODE, 'auto': the learned "
        "prompt head when the weights have one, else selection among the whole-image queries)",
    )
    parser.add_argument("--sam-checkpoint", help="SAM checkpoint (--backend sam)")
    parser.add_argument(
        "--sam-model",
        choices=SAM_MODELS,
        help="SAM architecture (default: from the checkpoint name, else vit_h)",
    )
    parser.add_argument(
        "--clicks", type=int, default=1, help="clicks per instance (k-click refinement)"
    )
    parser.add_argument(
        "--refine-multimask",
        action="store_true",
        help="keep multimask output after the first click",
    )
    parser.add_argument("--no-box", action="store_true", help="skip the box-prompt evaluation")
    parser.add_argument(
        "--max-images", type=int, help="evaluate only the first N images (N >= 1; default: all)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides KEY VALUE ... (last on the command line)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from ..checkpoint import WeightsError
    from ..config.loading import ConfigError

    if args.clicks < 1:
        print("error: --clicks must be >= 1", file=sys.stderr)
        return 2
    if args.max_images is not None and args.max_images < 1:
        print(
            f"error: --max-images must be >= 1 (omit it for all images), got {args.max_images}",
            file=sys.stderr,
        )
        return 2
    try:
        if args.device:
            check_device(args.device, "--device")
        check_out_path(args.out)
        if args.backend == "sam":
            if not args.sam_checkpoint:
                raise EvaluationInputError("--backend sam needs --sam-checkpoint")

            def factory():
                return build_sam_predictor(args.sam_checkpoint, args.sam_model, args.device)
        else:

            def factory():
                return build_unsam_predictor(args.config_file, args.opts, args.device, args.mode)

        # inputs are checked before the (possibly slow) model build
        _load_gt(args.gt)
        if not os.path.isdir(args.images):
            raise EvaluationInputError(f"image folder '{args.images}' not found")
        metrics = evaluate_prompts(
            factory(),
            args.gt,
            args.images,
            num_clicks=args.clicks,
            box=not args.no_box,
            max_images=args.max_images,
            refine_multimask=args.refine_multimask,
        )
        if args.out:
            write_metrics_json(args.out, metrics)
    except (
        EvaluationInputError,
        GroundTruthError,
        DeviceError,
        OutputError,
        ConfigError,
        WeightsError,
        OSError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
