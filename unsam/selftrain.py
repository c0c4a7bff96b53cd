"""Self-training: a trained model's whole-image predictions become the next round's labels.

::

    python -m unsam.selftrain --config-file F --weights W --input DIR|GLOB|DATASET_ROOT \\
        --output DIR [--score-low 0.0 --score-high 1.0] [--dedup-iou 0.9] [--max-masks N] \\
        [--previous DIR --max-iou-with-previous 0.5] [--shard i/n] [--workers N] [--device cpu|cuda]

The UnSAM paper trains a second round on its own model's predictions; the published code has the
pieces of the prediction pass (``DATASETS.SELF_TRAIN``, ``SELF_TRAIN_THRESH_LOW/HIGH``, a mapper
that feeds the training shards to the model) but no code that writes them as labels or trains on
them. This module writes them as labels: one SA-1B JSON per image, exactly as
``python -m unsam.pseudo`` does, so training on ``--output`` (``UNSAM.DATA.SA1B_ROOTS``) is the
next round.

**Inputs.** ``--input`` is a folder of images or a glob (as for ``python -m unsam.pseudo``), or a
dataset root the trainer reads — a folder of SA-1B JSONs, directly or one shard folder down —
whose images are taken from the JSONs (``image.file_name``, found as the training loader finds
it); there the output is named after the JSON (``<json stem>.json``) and keeps its
``image_id``. A folder holding any ``*.json`` is read as a dataset root.

**What becomes a label** (:func:`select_predictions`), for each image, best score first:

* the score band: a prediction is kept when ``score_low < score <= score_high`` — open below,
  closed above, the published rule (upstream's ``MaskFormer.forward`` keeps
  ``scores > SELF_TRAIN_THRESH_LOW`` and ``SELF_TRAIN_THRESH_HIGH >= scores``). Upstream applies
  it to the class probability before the mask-quality factor; here it applies to the score the
  predictor returns and the label records (``predicted_iou``: class probability × mean mask
  probability, Mask2Former's ranking score), so the band can be checked from the labels. With
  the defaults (0, 1] every non-empty prediction scores in the band;
* empty masks are dropped;
* de-duplication: a mask whose IoU with a better-scored kept mask is **above** ``--dedup-iou``
  (0.9) is dropped. 0.9 is the published pseudo-label recipe's NMS threshold (its conquer
  step drops a mask whose IoU with a kept one exceeds 0.9), so a round's labels follow the same
  duplicate rule as the labels the first round trained on; nested masks of different
  granularity (a part and its whole) mostly stay below it and are kept;
* ``--max-masks N``: at most the N best after de-duplication (default: all the model returns,
  ``TEST.DETECTIONS_PER_IMAGE``).

Each label: ``predicted_iou`` = the score, ``level`` 0, ``"source": "model"``,
``stability_score`` 1.0 (not computed: the predictor returns binary masks).

**Merging with the previous round** (``--previous DIR``): every label of ``DIR/<name>.json``
(matched by file stem, one shard folder down allowed) is kept, unchanged and first, and each new
prediction is added when its IoU with every previous label is **below**
``--max-iou-with-previous`` (default 0.5 — COCO's loosest match: a prediction that matches no
old label at IoU 0.5 is an object the old labels missed; one that does is a second version of an
old label). The rule is :func:`unsam.data.merge.merge_annotations`, as for UnSAM+. An image
without previous labels gets the model's labels alone.

**Running** is the pseudo-label runner's (:func:`unsam.pseudo.runner.run_tasks`): ``--shard
i/n`` labels the images ``k % n == i`` of the sorted list, outputs are written atomically and a
rerun skips finished images, failures go to ``failed.txt`` (``failed.shard-i-of-n.txt``),
SIGTERM / Ctrl-C stop the workers first, a failed write stops the run with one line.
``selftrain_settings.txt`` records what decides the labels (the model config's digest, the
weights' path and SHA-256, band, de-duplication, ``--max-masks``, ``--previous``): a rerun into
the folder with others is refused by name. Every labeler runs on one torch thread (outputs do not
depend on the core count; use ``--workers`` = cores on a CPU). Bad input — missing weights or
config, a band outside [0, 1] or ``low >= high``, an output folder that is the input's or the
previous round's — is one ``error:`` line and exit status 2, before any image is read.
"""

import argparse
import functools
import hashlib
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401  (compat before detectron2)

import numpy as np

from .data.merge import (
    MergeInputError,
    index_by_stem,
    mask_ious,
    merge_annotations,
    plain_differences,
)
from .io.sa1b import (
    SA1BFormatError,
    _resolve_image,
    annotation_from_mask,
    find_sa1b_files,
    mask_to_rle,
    read_sa1b_json,
)
from .pseudo.runner import (
    SETTINGS_FILE as PSEUDO_SETTINGS,
)
from .pseudo.runner import (
    RunSummary,
    Task,
    check_run_options,
    list_images,
    record_settings,
    run_tasks,
    select,
)
from .utils.cli import OneLineArgumentParser
from .utils.files import by_stem

logger = logging.getLogger("unsam.selftrain")

SCORE_LOW, SCORE_HIGH = 0.0, 1.0  # upstream's SELF_TRAIN_THRESH_LOW / _HIGH defaults
DEDUP_IOU = 0.9  # the published pseudo-label recipe's NMS threshold
MAX_IOU_WITH_PREVIOUS = 0.5
SETTINGS_FILE = (
    "selftrain_settings.txt"  # not *.json: the dataset readers take every *.json for a label
)
SOURCE = "model"


class SelfTrainError(ValueError):
    """An option or input the run cannot work with; the message is one line naming it."""


@dataclass(frozen=True)
class SelfTrainConfig:
    """What decides a round's labels (and the model that makes them). Picklable: worker
    processes build their labeler from it."""

    config_file: str
    weights: str
    opts: Tuple[str, ...] = ()
    device: Optional[str] = None  # None: the config's MODEL.DEVICE
    score_low: float = SCORE_LOW
    score_high: float = SCORE_HIGH
    dedup_iou: float = DEDUP_IOU
    max_masks: Optional[int] = None
    previous: Optional[str] = None
    max_iou_with_previous: float = MAX_IOU_WITH_PREVIOUS


def check_config(c: SelfTrainConfig) -> None:
    """:class:`SelfTrainError` for numbers that select nothing meaningful and files that are
    not there (checked before any image is read or weights are loaded)."""
    for name, value in (("--score-low", c.score_low), ("--score-high", c.score_high)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise SelfTrainError(f"{name} {value}: must be in [0, 1] (scores are probabilities)")
    if c.score_low >= c.score_high:
        raise SelfTrainError(
            f"--score-low {c.score_low} must be below --score-high {c.score_high}: the band "
            f"keeps low < score <= high, which no score satisfies"
        )
    if not (math.isfinite(c.dedup_iou) and 0.0 < c.dedup_iou <= 1.0):
        raise SelfTrainError(f"--dedup-iou {c.dedup_iou}: must be in (0, 1]")
    if c.max_masks is not None and c.max_masks < 1:
        raise SelfTrainError(f"--max-masks {c.max_masks}: must be >= 1")
    if not (math.isfinite(c.max_iou_with_previous) and 0.0 < c.max_iou_with_previous <= 1.0):
        raise SelfTrainError(
            f"--max-iou-with-previous {c.max_iou_with_previous}: must be in (0, 1]"
        )
    if c.previous is not None and not Path(c.previous).is_dir():
        raise SelfTrainError(f"--previous '{c.previous}' is not a folder of labels")
    if not Path(c.config_file).is_file():
        raise SelfTrainError(f"--config-file '{c.config_file}' not found")
    if not c.weights:
        raise SelfTrainError("--weights is empty: self-training needs a trained model")
    if not re.match(r"^(https?|detectron2|s3|gs)://", c.weights) and not Path(c.weights).is_file():
        raise SelfTrainError(f"--weights file '{c.weights}' not found")


def build_cfg(c: SelfTrainConfig):
    """The model config: ``--config-file``, ``--opts``, then the weights and device."""
    from .config.loading import load_config

    opts = (
        list(c.opts)
        + ["MODEL.WEIGHTS", c.weights]
        + (["MODEL.DEVICE", c.device] if c.device else [])
    )
    return load_config(c.config_file, opts)


# ------------------------------------------------------------------------------- the labels
def in_band(score: float, low: float, high: float) -> bool:
    """The published self-training band: open below, closed above."""
    return low < score <= high


def select_predictions(
    masks: np.ndarray,
    scores: np.ndarray,
    low: float = SCORE_LOW,
    high: float = SCORE_HIGH,
    dedup_iou: float = DEDUP_IOU,
    max_masks: Optional[int] = None,
) -> List[int]:
    """Indices of the predictions that become labels, best score first (see the module
    docstring): in the band, not empty, IoU with every better kept one at most ``dedup_iou``,
    at most ``max_masks``. ``masks``: N×H×W bool; ``scores``: N."""
    order = sorted(
        range(len(scores)), key=lambda i: -float(scores[i])
    )  # stable: ties keep the model's order
    cands = [i for i in order if in_band(float(scores[i]), low, high) and masks[i].any()]
    rles = [mask_to_rle(masks[i]) for i in cands]
    ious = mask_ious(rles, rles)
    kept: List[int] = []  # positions in cands
    for j in range(len(cands)):
        if kept and float(ious[j, kept].max()) > dedup_iou:
            continue
        kept.append(j)
        if max_masks is not None and len(kept) >= max_masks:
            break
    return [cands[j] for j in kept]


def predictions_to_annotations(instances, c: SelfTrainConfig) -> List[Dict]:
    """A predictor's ``Instances`` → the SA-1B annotations of the kept predictions."""
    masks = np.asarray(
        instances.pred_masks.numpy(), dtype=bool
    )  # no copy: the predictor's masks are bool
    scores = instances.scores.numpy()
    keep = select_predictions(masks, scores, c.score_low, c.score_high, c.dedup_iou, c.max_masks)
    return [
        annotation_from_mask(masks[i], k, predicted_iou=float(scores[i]), level=0, source=SOURCE)
        for k, i in enumerate(keep)
    ]


class SelfTrainLabeler:
    """``labeler.label_task(image, task)`` → the image's labels (merged with its previous
    ones with ``--previous``), for :func:`unsam.pseudo.runner.run_tasks`."""

    def __init__(self, c: SelfTrainConfig):
        from .predictor import WholeImagePredictor

        self.c = c
        self.predictor = WholeImagePredictor.from_config(build_cfg(c))
        self.previous = index_by_stem(c.previous, "--previous") if c.previous else None

    def __call__(self, image: np.ndarray) -> List[Dict]:
        return predictions_to_annotations(self.predictor(image), self.c)

    def label_task(self, image: np.ndarray, task: Task) -> List[Dict]:
        anns = self(image)
        if self.previous is None:
            return anns
        path = self.previous.get(task.stem)
        if path is None:
            logger.debug("%s: no previous labels, the model's alone", task.stem)
            return anns
        previous = read_sa1b_json(path)
        size = (int(previous["image"]["height"]), int(previous["image"]["width"]))
        if size != tuple(image.shape[:2]):
            raise SA1BFormatError(
                f"previous labels {path} are for a {size[1]}x{size[0]} image, this one is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        merged, _ = merge_annotations(
            previous["annotations"], anns, self.c.max_iou_with_previous, SOURCE
        )
        return merged


# ------------------------------------------------------------------------------------ inputs
def _image_record(path: Path) -> Dict:
    """The ``image`` record of an SA-1B JSON, read from the file's start when it comes first
    (as in SA-1B and our writer), so listing a dataset does not parse every mask."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace")
    m = re.match(r'\s*\{\s*"image"\s*:\s*', head)
    if m:
        try:
            record, _ = json.JSONDecoder().raw_decode(head, m.end())
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("image"), dict):
        raise ValueError("no 'image' record")
    return data["image"]


def dataset_label_files(spec: str) -> List[Path]:
    """The label files when ``spec`` is a dataset root (a folder with ``*.json``, directly or
    one folder down), else []."""
    p = Path(spec)
    return find_sa1b_files(p) if p.is_dir() else []


def plan_tasks(
    spec: str,
    out: Path,
    shard=(0, 1),
    start_id: int = 0,
    end_id: Optional[int] = None,
    visualize: bool = False,
) -> Tuple[List[Task], List[Tuple[str, str]]]:
    """The tasks of this run (sorted input list, ``--start-id/--end-id``, shard) and the
    failures found while listing (a dataset label file whose image cannot be found)."""
    labels = dataset_label_files(spec)
    if not labels:
        files = list_images(spec)
        return [
            Task(k, str(path), str(out), visualize)
            for k, path in select(files, start_id, end_id, shard)
        ], []
    by_stem(
        labels,
        lambda stem, first, second: SelfTrainError(
            f"--input: two label files of one name '{stem}' ({first} and {second}): "
            "outputs are named after them"
        ),
    )
    tasks, failures = [], []
    for k, label in select(labels, start_id, end_id, shard):
        try:
            record = _image_record(label)
            image = _resolve_image(label, str(record.get("file_name", "")))
        except (OSError, ValueError) as e:
            failures.append((str(label), f"unreadable label file: {e}"))
            continue
        if image is None:
            failures.append((str(label), f"image '{record.get('file_name')}' not found"))
            continue
        image_id = record.get("image_id")
        image_id = image_id if isinstance(image_id, int) and not isinstance(image_id, bool) else k
        tasks.append(Task(image_id, str(image.absolute()), str(out), visualize, name=label.stem))
    logger.info(
        "--input %s: a dataset root, %d label files; their images are labelled", spec, len(labels)
    )
    return tasks, failures


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(output: Path, c: SelfTrainConfig, input_spec: str) -> None:
    """Nothing a user owns is overwritten or mixed: the output is not (inside, around) the
    previous round's folder or a dataset root input, nor an image folder input, and holds no
    labels of ``python -m unsam.pseudo``."""
    if c.previous is not None and _overlaps(output, Path(c.previous)):
        raise SelfTrainError(
            f"--output '{output}' overlaps --previous '{c.previous}': write each round to a "
            f"folder of its own"
        )
    p = Path(input_spec)
    if p.is_dir() and (
        output.resolve() == p.resolve()
        or (dataset_label_files(input_spec) and _overlaps(output, p))
    ):
        raise SelfTrainError(
            f"--output '{output}' overlaps --input '{input_spec}': write the labels to a folder "
            f"of their own"
        )
    if (output / PSEUDO_SETTINGS).exists():
        raise SelfTrainError(
            f"--output '{output}' holds labels of python -m unsam.pseudo ({PSEUDO_SETTINGS}): "
            f"write the round to a folder of its own"
        )


# ------------------------------------------------------------------------------- the record
def _sha256(path: str) -> Optional[str]:
    if not Path(path).is_file():
        return None  # a URL: its name is recorded
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def label_settings(c: SelfTrainConfig, cfg) -> Dict:
    """What decides the labels, JSON-ready: the model config (a digest of the merged config
    without weights, device and output folder), the weights (absolute path and SHA-256: a model
    retrained under the same name gives other labels), band, de-duplication, cap, previous
    round. Not recorded: ``--workers``, ``--shard``, ``--device``, ``--visualize``."""
    model_cfg = cfg.clone()
    model_cfg.defrost()
    model_cfg.MODEL.WEIGHTS, model_cfg.MODEL.DEVICE, model_cfg.OUTPUT_DIR = "", "", ""
    is_url = re.match(r"^\w+://", c.weights) is not None
    out = {
        "model_config": hashlib.sha256(model_cfg.dump().encode()).hexdigest()[:16],
        "weights": c.weights if is_url else str(Path(c.weights).absolute()),
        "weights_sha256": None if is_url else _sha256(c.weights),
        "score_low": c.score_low,
        "score_high": c.score_high,
        "dedup_iou": c.dedup_iou,
        "max_masks": c.max_masks,
        "previous": str(Path(c.previous).absolute()) if c.previous else None,
    }
    if c.previous:
        out["max_iou_with_previous"] = c.max_iou_with_previous
    return out


def run(
    input_spec: str,
    output_dir,
    c: SelfTrainConfig,
    shard=(0, 1),
    start_id: int = 0,
    end_id: Optional[int] = None,
    workers: int = 1,
    visualize: bool = False,
    progress: bool = True,
    labeler: Optional[SelfTrainLabeler] = None,
) -> RunSummary:
    """Label every selected image that has no output yet with the model's kept predictions.
    ``labeler``: one already built for ``c`` (used when ``workers`` ≤ 1). Raises
    :class:`SelfTrainError` and what :func:`unsam.pseudo.runner.run` raises."""
    from .utils.files import ensure_writable_dir

    check_run_options(shard, start_id, end_id, workers)
    check_config(c)
    output = Path(output_dir)
    check_output(output, c, input_spec)
    cfg = build_cfg(c)
    if not dataset_label_files(input_spec):
        list_images(input_spec)  # a spec matching no image is refused before the folder is made
    out = ensure_writable_dir(output)
    if visualize:
        ensure_writable_dir(out / "vis")
    record_settings(out, SETTINGS_FILE, label_settings(c, cfg), plain_differences)
    tasks, failures = plan_tasks(input_spec, out, shard, start_id, end_id, visualize)
    return run_tasks(
        tasks,
        out,
        functools.partial(SelfTrainLabeler, c),
        shard=shard,
        workers=workers,
        progress=progress,
        labeler=labeler if workers <= 1 else None,
        failures=failures,
        desc="self-training labels",
    )


# --------------------------------------------------------------------------------------- CLI
def _shard(text: str):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n (e.g. 0/4), got '{text}'")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineArgumentParser(
        prog="python -m unsam.selftrain",
        description="A model's whole-image predictions as the next round's SA-1B labels.",
    )
    ap.add_argument("--config-file", required=True, help="the model's config")
    ap.add_argument("--weights", required=True, help="the trained model (path or URL)")
    ap.add_argument(
        "--input", required=True, help="image folder, glob, or a dataset root of SA-1B JSONs"
    )
    ap.add_argument(
        "--output", required=True, help="new folder for the labels (<name>.json per image)"
    )
    ap.add_argument(
        "--score-low", type=float, default=SCORE_LOW, help="keep scores above this (exclusive)"
    )
    ap.add_argument(
        "--score-high", type=float, default=SCORE_HIGH, help="keep scores up to this (inclusive)"
    )
    ap.add_argument(
        "--dedup-iou",
        type=float,
        default=DEDUP_IOU,
        help=f"drop a mask whose IoU with a better kept one is above this (default {DEDUP_IOU})",
    )
    ap.add_argument(
        "--max-masks", type=int, default=None, help="at most N labels per image from the model"
    )
    ap.add_argument(
        "--previous", default=None, help="the previous round's labels: kept, new masks added"
    )
    ap.add_argument(
        "--max-iou-with-previous",
        type=float,
        default=None,
        help=f"add a new mask when its IoU with every previous one is below this "
        f"(default {MAX_IOU_WITH_PREVIOUS}; needs --previous)",
    )
    ap.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: the config's MODEL.DEVICE)"
    )
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n")
    ap.add_argument(
        "--start-id", type=int, default=0, help="first index into the sorted input list"
    )
    ap.add_argument("--end-id", type=int, default=None, help="one past the last index")
    ap.add_argument(
        "--workers", type=int, default=1, help="processes, each with its own model on one thread"
    )
    ap.add_argument("--visualize", action="store_true", help="write overlays to <output>/vis/")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ..."
    )
    return ap


def config_from_args(args) -> SelfTrainConfig:
    if args.max_iou_with_previous is not None and args.previous is None:
        raise SelfTrainError("--max-iou-with-previous needs --previous (the labels to merge with)")
    return SelfTrainConfig(
        config_file=args.config_file,
        weights=args.weights,
        opts=tuple(args.opts),
        device=args.device,
        score_low=args.score_low,
        score_high=args.score_high,
        dedup_iou=args.dedup_iou,
        max_masks=args.max_masks,
        previous=args.previous,
        max_iou_with_previous=(
            MAX_IOU_WITH_PREVIOUS
            if args.max_iou_with_previous is None
            else args.max_iou_with_previous
        ),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import WeightsError
    from .config.loading import ConfigError
    from .pseudo.config import SettingError
    from .pseudo.runner import OutputWriteError, SettingsMismatch, Stopped
    from .utils.device import DeviceError, check_device
    from .utils.files import OutputError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def error(message) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        c = config_from_args(args)
        check_run_options(args.shard, args.start_id, args.end_id, args.workers)
        check_config(c)
        if c.device:
            check_device(c.device, "--device")
        check_output(Path(args.output), c, args.input)
        if not dataset_label_files(args.input):
            list_images(args.input)
        if c.previous:
            index_by_stem(c.previous, "--previous")
        # fail fast on a bad config or weights before the output folder or any worker exists;
        # reused when the images are labelled in this process
        labeler = SelfTrainLabeler(c)
    except (
        SelfTrainError,
        SettingError,
        MergeInputError,
        ConfigError,
        WeightsError,
        DeviceError,
        FileNotFoundError,
        ValueError,
    ) as e:
        return error(e)
    if args.workers > 1:
        labeler = None  # each worker builds its own
    try:
        s = run(
            args.input,
            args.output,
            c,
            shard=args.shard,
            start_id=args.start_id,
            end_id=args.end_id,
            workers=args.workers,
            visualize=args.visualize,
            progress=not args.quiet,
            labeler=labeler,
        )
    except (
        SelfTrainError,
        SettingsMismatch,
        OutputError,
        OutputWriteError,
        FileNotFoundError,
        ValueError,
    ) as e:
        return error(e)
    except Stopped as stop:
        print(stop.message, file=sys.stderr)
        return stop.exit_status
    print(s.line())
    return s.exit_status


if __name__ == "__main__":
    sys.exit(main())
