"""UnSAM+: human masks merged with unsupervised pseudo masks (``python -m unsam.data.merge``).

::

    python -m unsam.data.merge --human SA1B_ROOT --pseudo PSEUDO_ROOT --output DIR [--max-iou 0.02]

The paper's UnSAM+ trains on SA-1B's human masks *plus* the pseudo masks that cover what the
annotators left out (the published training folder is named ``gt_merged_threshold0.02``; the
merge code was never released). For every image of ``--human`` the output keeps **every** human
mask, unchanged and first, and adds each pseudo mask whose IoU with *every* human mask of the
image is **below** ``--max-iou`` (strictly: ``IoU < max_iou``; an image without human masks
takes all its pseudo masks). 0.02 is the published value: a pseudo mask is added only where it
overlaps no human mask by more than a sliver, so the merge adds the unlabelled stuff, parts
and background regions rather than second versions of labelled objects. IoU is pycocotools'
on the RLEs (no decoding).

**Matching.** A human file and a pseudo file belong to the same image when their JSON files
have the same **file stem** (``sa_1.json`` ↔ ``sa_1.json``): SA-1B names each JSON after its
image, and so does ``python -m unsam.pseudo`` (``<image stem>.json``). Both roots may hold the
files directly or one shard folder down (``sa_000000/…``), as the training loader reads them; a
stem that occurs twice in one root is refused (the match would be ambiguous). The pair must
agree on the image size, else the pseudo file was made from another image (a resized copy):
the image is written with its human masks only and counted as a size mismatch. Images with
pseudo labels but no human file are not written (UnSAM+ trains on the human-labelled images);
images with human labels but no pseudo file are written with their human masks. All three kinds
are counted in the summary line and named in ``<output>/merge_unmatched.txt`` (kind, tab, path).

**Output**, readable by the trainer (``UNSAM.DATA.SA1B_ROOTS``): one SA-1B JSON per human
image at the human file's place relative to ``--human`` (shard folders are kept), its
``image.file_name`` the **absolute path** of the image (found as the training loader finds it:
the record's ``file_name``, relative to the JSON's folder, or ``<stem>.jpg`` … beside it), so
images are not copied. Added pseudo masks carry ``"source": "pseudo"`` and new ``id`` s
(their old id plus one more than the largest human id; a ``parent_id`` follows its parent, or
becomes -1 when the parent was not added). ``merge_counts.csv`` lists per image the human, pseudo
and added mask counts and the status; the last line of the run is the summary.

**Resume.** Outputs are written atomically; a rerun skips images whose output exists (their
counts are read back from it), so a killed merge continues where it stopped.
``merge_settings.txt`` records both roots and ``--max-iou``: a rerun into the same folder with
others is refused, as a mix of two merges could not be told apart. Files that cannot be read
(corrupt JSON, an image that is nowhere to be found) are listed in ``merge_failed.txt`` and
retried by the next run. Bad options (a missing root, a root without JSON, ``--max-iou``
outside (0, 1], an output inside or around an input root) are one ``error:`` line, exit 2.
"""

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401  (compat before detectron2)

import numpy as np
from pycocotools import mask as mask_utils

from ..io.sa1b import (
    DatasetError,
    SA1BFormatError,
    _resolve_image,
    find_sa1b_files,
    read_sa1b_json,
    write_sa1b_json,
)
from ..utils.cli import OneLineArgumentParser
from ..utils.files import (
    OutputError,
    atomic_write,
    by_stem,
    ensure_writable_dir,
    remove_stale_temps,
)

logger = logging.getLogger(__name__)

MAX_IOU = 0.02  # the published UnSAM+ threshold (`gt_merged_threshold0.02`)
SETTINGS_FILE = (
    "merge_settings.txt"  # not *.json: the dataset readers take every *.json for a label
)
COUNTS_FILE = "merge_counts.csv"
UNMATCHED_FILE = "merge_unmatched.txt"
FAILED_FILE = "merge_failed.txt"
PSEUDO_SOURCE = "pseudo"


class MergeInputError(ValueError):
    """An input or option the merge cannot work with; the message is one line naming it."""


# ----------------------------------------------------------------------------------- the rule
def _coco_rle(rle: Dict) -> Dict:
    """An RLE pycocotools' ``iou`` takes: uncompressed (list ``counts``, COCO crowds) compressed."""
    if isinstance(rle.get("counts"), list):
        return mask_utils.frPyObjects(rle, *rle["size"])
    return rle


def mask_ious(rles: Sequence[Dict], others: Sequence[Dict]) -> np.ndarray:
    """IoU of every RLE of ``rles`` with every RLE of ``others``: a len(rles)×len(others) array."""
    if not rles or not others:
        return np.zeros((len(rles), len(others)))
    ious = mask_utils.iou(
        [_coco_rle(r) for r in rles], [_coco_rle(r) for r in others], [0] * len(others)
    )
    return np.asarray(ious, dtype=np.float64).reshape(len(rles), len(others))


def merge_annotations(
    base: List[Dict], extra: List[Dict], max_iou: float, source: Optional[str] = None
) -> Tuple[List[Dict], List[int]]:
    """``base`` (all of it, unchanged, first) + each ``extra`` annotation whose mask has IoU
    below ``max_iou`` with every ``base`` mask. Returns (merged annotations, indices of the
    extra annotations kept).

    Kept extras are copies with new ids (old id + one more than the largest base id, so no id
    is used twice), ``parent_id`` mapped the same way (-1 when the parent was not kept) and,
    when ``source`` is given, ``"source": source``. The same rule serves UnSAM+ (base: human
    masks) and self-training (base: the previous round's labels)."""
    ious = mask_ious([a["segmentation"] for a in extra], [a["segmentation"] for a in base])
    kept = [i for i in range(len(extra)) if not base or float(ious[i].max()) < max_iou]
    ids = [int(a["id"]) for a in base if isinstance(a.get("id"), (int, float))]
    offset = max(ids) + 1 if ids else 0
    old_ids = {int(extra[i].get("id", i)) for i in kept}
    added = []
    for i in kept:
        ann = dict(extra[i])
        ann["id"] = offset + int(ann.get("id", i))
        if "parent_id" in ann:
            parent = int(ann["parent_id"])
            ann["parent_id"] = offset + parent if parent >= 0 and parent in old_ids else -1
        if source is not None:
            ann["source"] = source
        added.append(ann)
    return list(base) + added, kept


# ------------------------------------------------------------------------------------ inputs
def index_by_stem(root, option: str) -> Dict[str, Path]:
    """``stem → JSON path`` of every label file of an SA-1B style root (directly or one shard
    folder down). A missing root, one without JSON, or a stem found twice is refused."""
    root = Path(root)
    if not root.exists():
        raise MergeInputError(f"{option} '{root}' not found")
    try:
        files = find_sa1b_files(root)
    except DatasetError as e:
        raise MergeInputError(f"{option}: {e}") from None
    if not files:
        raise MergeInputError(
            f"{option} '{root}' holds no SA-1B JSON file (<name>.json, directly or one folder down)"
        )
    return by_stem(
        files,
        lambda stem, first, second: MergeInputError(
            f"{option}: two label files of one name '{stem}' ({first} and {second}): "
            "images are matched by file name"
        ),
    )


def check_max_iou(value: float, option: str = "--max-iou") -> float:
    """A threshold of the merge rule: in (0, 1] (IoU < 0 keeps nothing; IoU < 1 keeps all but
    copies of a mask)."""
    if not (math.isfinite(value) and 0 < value <= 1):
        raise MergeInputError(f"{option} {value}: must be in (0, 1]")
    return value


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(output: Path, roots: Sequence[Tuple[str, Path]]) -> None:
    """Refuse an output folder that is, lies inside, or holds an input root: its files would
    replace or mix with the user's labels."""
    for option, root in roots:
        if _overlap(output, root):
            raise MergeInputError(
                f"--output '{output}' overlaps {option} '{root}': write the merge "
                f"to a folder of its own"
            )


def plain_differences(recorded: Dict, current: Dict) -> List[str]:
    """``--key OLD -> NEW`` for every recorded setting that differs (a missing one counts as
    null): :func:`unsam.pseudo.runner.record_settings`'s rule for a flat record."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            out.append(
                f"--{key.replace('_', '-')} {json.dumps(recorded.get(key))} -> "
                f"{json.dumps(current.get(key))}"
            )
    return out


# ------------------------------------------------------------------------------------- merge
@dataclass
class ImageCounts:
    name: str
    human: int
    pseudo: int
    added: int
    status: str  # merged | human-only | size-mismatch


@dataclass
class MergeSummary:
    rows: List[ImageCounts] = field(default_factory=list)
    written: int = 0
    skipped: int = 0  # outputs of an earlier run
    pseudo_only: List[Path] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    def line(self, output: Path, max_iou: float) -> str:
        human = sum(r.human for r in self.rows)
        pseudo = sum(r.pseudo for r in self.rows)
        added = sum(r.added for r in self.rows)
        return (
            f"merged {len(self.rows)} images ({self.written} written, {self.skipped} already "
            f"done): {human} human masks kept, {added} of {pseudo} pseudo masks added "
            f"(IoU < {max_iou} with every human mask); {self.count('human-only')} human-only, "
            f"{len(self.pseudo_only)} pseudo-only, {self.count('size-mismatch')} size "
            f"mismatches, {len(self.failures)} failed; per image: {output / COUNTS_FILE}"
        )


def _merge_one(
    name: str, human_json: Path, pseudo_json: Optional[Path], target: Path, max_iou: float
) -> ImageCounts:
    """Merge one image and write ``target``. Raises SA1BFormatError / FileNotFoundError for
    an input that cannot be used (the caller lists it)."""
    human = read_sa1b_json(human_json)
    image = dict(human["image"])
    img_path = _resolve_image(human_json, str(image.get("file_name", "")))
    if img_path is None:
        raise FileNotFoundError(f"{human_json}: image '{image.get('file_name')}' not found")
    image["file_name"] = str(img_path.absolute())
    image.setdefault("image_id", name)
    anns, status, pseudo_n, added = human["annotations"], "human-only", 0, 0
    if pseudo_json is not None:
        pseudo = read_sa1b_json(pseudo_json)
        pseudo_n = len(pseudo["annotations"])
        if _size(pseudo) != _size(human):
            status = "size-mismatch"
            logger.warning(
                "%s: pseudo labels are %dx%d (HxW), the human ones %dx%d: human masks only",
                name,
                *_size(pseudo),
                *_size(human),
            )
        else:
            anns, kept = merge_annotations(anns, pseudo["annotations"], max_iou, PSEUDO_SOURCE)
            status, added = "merged", len(kept)
    write_sa1b_json(target, image, anns)
    return ImageCounts(name, len(human["annotations"]), pseudo_n, added, status)


def _size(record: Dict) -> Tuple[int, int]:
    return int(record["image"]["height"]), int(record["image"]["width"])


def _counts_of_output(name: str, target: Path, pseudo_json: Optional[Path]) -> ImageCounts:
    """The counts of an image merged by an earlier run, read back from its output."""
    merged = read_sa1b_json(target)
    anns = merged["annotations"]
    added = sum(a.get("source") == PSEUDO_SOURCE for a in anns)
    if pseudo_json is None:
        return ImageCounts(name, len(anns), 0, 0, "human-only")
    pseudo = read_sa1b_json(pseudo_json)
    mismatch = _size(pseudo) != _size(merged)
    return ImageCounts(
        name,
        len(anns) - added,
        len(pseudo["annotations"]),
        added,
        "size-mismatch" if mismatch else "merged",
    )


def merge_roots(
    human_root, pseudo_root, output, max_iou: float = MAX_IOU, progress: bool = True
) -> MergeSummary:
    """Merge every image of ``human_root`` with its pseudo labels of ``pseudo_root`` into
    ``output`` (see the module docstring). Raises :class:`MergeInputError`, ``OutputError``,
    :class:`unsam.pseudo.runner.SettingsMismatch`, and :class:`unsam.pseudo.runner.Stopped`
    on SIGTERM / SIGINT (the files of finished images are kept; the lists are written)."""
    from tqdm import tqdm

    from ..pseudo.runner import _stop_on_signals, _writing, record_settings

    check_max_iou(max_iou)
    human_root, pseudo_root, output = Path(human_root), Path(pseudo_root), Path(output)
    human = index_by_stem(human_root, "--human")
    pseudo = index_by_stem(pseudo_root, "--pseudo")
    check_output(output, [("--human", human_root), ("--pseudo", pseudo_root)])
    out = ensure_writable_dir(output)
    record_settings(
        out,
        SETTINGS_FILE,
        {
            "human": str(human_root.resolve()),
            "pseudo": str(pseudo_root.resolve()),
            "max_iou": max_iou,
        },
        plain_differences,
    )
    summary = MergeSummary(pseudo_only=[pseudo[s] for s in sorted(set(pseudo) - set(human))])
    targets = {name: out / path.relative_to(human_root) for name, path in human.items()}
    ours = {t.name for t in targets.values()} | {COUNTS_FILE, UNMATCHED_FILE, FAILED_FILE}
    for folder in {t.parent for t in targets.values()} | {out}:
        remove_stale_temps(folder, ours.__contains__)  # half-written files of a killed merge
    t0 = time.time()
    try:
        with _stop_on_signals():
            for name in tqdm(sorted(human), unit="img", desc="merge", disable=not progress):
                target = targets[name]
                try:
                    if target.exists():
                        summary.rows.append(_counts_of_output(name, target, pseudo.get(name)))
                        summary.skipped += 1
                        continue
                    with _writing(target):
                        summary.rows.append(
                            _merge_one(name, human[name], pseudo.get(name), target, max_iou)
                        )
                    summary.written += 1
                except (SA1BFormatError, FileNotFoundError) as e:
                    summary.failures.append((str(human[name]), str(e)))
                    logger.warning("skipping %s: %s", name, e)
    finally:
        summary.seconds = time.time() - t0
        _write_lists(out, summary, human, pseudo)
    return summary


def _write_lists(
    out: Path, summary: MergeSummary, human: Dict[str, Path], pseudo: Dict[str, Path]
) -> None:
    """``merge_counts.csv``, ``merge_unmatched.txt`` and ``merge_failed.txt`` of the images
    seen so far (the last two removed when empty)."""
    from ..pseudo.runner import _writing

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "human_masks", "pseudo_masks", "pseudo_added", "status"])
    for r in summary.rows:
        writer.writerow([r.name, r.human, r.pseudo, r.added, r.status])
    unmatched = [f"pseudo-only\t{p}" for p in summary.pseudo_only] + [
        f"{r.status}\t{human[r.name]}" for r in summary.rows if r.status != "merged"
    ]
    failed = [f"{p}\t{' '.join(e.split())}" for p, e in summary.failures]
    for name, text in (
        (COUNTS_FILE, buf.getvalue()),
        (UNMATCHED_FILE, unmatched),
        (FAILED_FILE, failed),
    ):
        path = out / name
        if isinstance(text, list):
            if not text:
                path.unlink(missing_ok=True)
                continue
            text = "".join(line + "\n" for line in text)
        with _writing(path), atomic_write(path) as f:
            f.write(text)


# --------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = OneLineArgumentParser(
        prog="python -m unsam.data.merge",
        description="UnSAM+: every human mask plus the pseudo masks that overlap none of them.",
    )
    ap.add_argument(
        "--human", required=True, help="SA-1B root with the human masks (released JSONs + images)"
    )
    ap.add_argument(
        "--pseudo", required=True, help="pseudo-label root (python -m unsam.pseudo output)"
    )
    ap.add_argument("--output", required=True, help="new folder for the merged SA-1B JSONs")
    ap.add_argument(
        "--max-iou",
        type=float,
        default=MAX_IOU,
        help="add a pseudo mask when its IoU with every human mask is below this "
        f"(default {MAX_IOU})",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    from ..pseudo.runner import OutputWriteError, SettingsMismatch, Stopped

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = merge_roots(args.human, args.pseudo, args.output, args.max_iou, progress=not args.quiet)
    except (MergeInputError, OutputError, OutputWriteError, SettingsMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(
            f"stopped by {stop.name}; run the same command again to resume "
            "(merged images are kept)",
            file=sys.stderr,
        )
        return 128 + stop.signum
    if s.pseudo_only or s.count("human-only") or s.count("size-mismatch"):
        logger.info("unmatched images named in %s", Path(args.output) / UNMATCHED_FILE)
    if s.failures:
        logger.warning(
            "%d images could not be merged; listed in %s",
            len(s.failures),
            Path(args.output) / FAILED_FILE,
        )
    print(s.line(Path(args.output), args.max_iou))
    return 1 if s.failures and not s.rows else 0


if __name__ == "__main__":
    sys.exit(main())
