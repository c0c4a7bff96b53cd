"""Write the published UnSAM / Semantic-SAM training shards from any indexed root.

Layout (what the published trainer reads): ``OUT/<prefix>-K.tsv``, one line per image
``name \\t annotation-json \\t base64-image``, and ``OUT/<prefix>-K.lineidx`` with the byte offset
of each line, one decimal number per line. The JSON is SA-1B's, on one line, ``"image"`` first
and with ``image.id`` set (the published mapper reads ``image.id``; ``image_id`` is kept). The
image bytes are copied as they are (JPEG stays JPEG; a PNG pseudo-label source stays PNG, which
the published reader's ``cv2.imdecode`` also reads).

Each shard is written atomically, the ``.tsv`` first and its ``.lineidx`` last, so a shard with
both files is complete: a rerun keeps those and writes the rest (the shard plan depends only on
the index order and ``images_per_shard``; delete ``OUT`` to convert afresh).
"""

import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

import numpy as np
from tqdm import tqdm

from ...io.sa1b import SA1BFormatError
from ...utils.files import atomic_write, ensure_writable_dir, remove_stale_temps
from .dataset import IndexedDataset
from .formats import parse_record

logger = logging.getLogger(__name__)


@dataclass
class ConvertSummary:
    out: str
    images: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    skipped: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        text = (
            f"{self.out}: {self.images} images in {self.shards_written} new shards "
            f"({self.shards_kept} kept), {len(self.skipped)} skipped"
        )
        if self.skipped:
            text += f" (first: {self.skipped[0]})"
        return text + f", {self.seconds:.1f} s"


def tsv_line(name: str, data: dict, image: bytes) -> bytes:
    """One published-layout line (with its newline) for a parsed SA-1B record and image bytes."""
    image_info = dict(data["image"])
    image_info.setdefault("id", image_info.get("image_id", name))
    record = {"image": image_info, "annotations": data["annotations"]}
    record.update((k, v) for k, v in data.items() if k not in record)
    safe = name.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return (
        b"\t".join(
            [
                safe.encode("utf-8"),
                json.dumps(record, separators=(",", ":")).encode("ascii"),
                base64.b64encode(image),
            ]
        )
        + b"\n"
    )


def _name(dataset: IndexedDataset, i: int) -> str:
    row = dataset._row(i)
    key = dataset._string(dataset._keys, dataset._keys_off, row)
    return os.path.splitext(os.path.basename(key))[0] if key.endswith(".json") else key


def write_tsv_shards(
    datasets: Sequence[IndexedDataset],
    out,
    images_per_shard: int = 1000,
    prefix: str = "train",
    progress: bool = True,
) -> ConvertSummary:
    """Write every image of ``datasets`` (in order) into ``OUT/<prefix>-K.tsv`` + ``.lineidx``,
    ``images_per_shard`` index positions per shard. Records that fail validation (or whose image
    cannot be read) are named in a warning, counted and left out."""
    if images_per_shard < 1:
        raise ValueError("images_per_shard must be at least 1")
    start = time.perf_counter()
    out = ensure_writable_dir(out)
    remove_stale_temps(out, lambda name: name.startswith(f"{prefix}-"))
    summary = ConvertSummary(out=str(out))
    starts = np.cumsum([0] + [len(d) for d in datasets])  # global position → (dataset, index)
    total = int(starts[-1])

    def part_of(first: int):
        for g in range(first, min(first + images_per_shard, total)):
            d = int(np.searchsorted(starts, g, side="right")) - 1
            yield datasets[d], g - int(starts[d])

    with tqdm(
        total=total,
        unit="img",
        desc=f"tsv {Path(out).name}",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for k, first in enumerate(range(0, total, images_per_shard)):
            part = list(part_of(first))
            tsv, lineidx = out / f"{prefix}-{k}.tsv", out / f"{prefix}-{k}.lineidx"
            if tsv.is_file() and lineidx.is_file():
                summary.shards_kept += 1
                with open(lineidx) as f:
                    summary.images += sum(1 for line in f if line.strip())
                bar.update(len(part))
                continue
            offsets = []
            with atomic_write(tsv, "wb") as f:
                position = 0
                for dataset, i in part:
                    try:
                        raw, where = dataset.raw_record(i)
                        data, _ = parse_record(raw, where)
                        line = tsv_line(_name(dataset, i), data, dataset.image_bytes(i))
                    except SA1BFormatError as e:
                        summary.skipped.append(str(e))
                        logger.warning("not converted: %s", e)
                        bar.update(1)
                        continue
                    offsets.append(position)
                    f.write(line)
                    position += len(line)
                    bar.update(1)
            with atomic_write(lineidx) as f:
                f.writelines(f"{o}\n" for o in offsets)
            summary.images += len(offsets)
            summary.shards_written += 1
    summary.seconds = time.perf_counter() - start
    logger.info("%s", summary.line())
    return summary
