#!/usr/bin/env python
"""Training-mapper benchmark at SA-1B scale: seconds per sample and peak RSS, against decoding
every mask at full resolution before transforming (the mapper's previous path).

Writes one synthetic SA-1B record — a 1500×2250 photo-like image with ``--masks`` nested RLE masks
(roots split into parts, parts into sub-parts, as the pseudo-label engine writes them) — and maps
it ``--repeat`` times with the training mapper of the R50 LSJ config (LSJ at 1024, scale
0.1–2.0, flip), in two child processes so that each one's peak RSS is its own:

* ``mapper``: ``UnSAMDatasetMapper`` as shipped (each mask decoded alone, only what lands in the
  crop gathered, masks cropped away not decoded);
* ``reference``: the same mapper with the masks decoded at 1500×2250 first, then transformed.

Both draw the same augmentations (same seeds) and must give identical masks (a hash per sample
is compared). Run it with nothing else heavy on the machine.

    python benchmarks/data.py                 # 500 masks, 5 samples
    python benchmarks/data.py --masks 200 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HEIGHT, WIDTH = 1500, 2250


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--masks", type=int, default=500, help="pseudo masks in the record")
    p.add_argument(
        "--repeat", type=int, default=5, help="samples mapped per variant (different augmentations)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (loader workers use one each)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", choices=("mapper", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_record(folder: Path, num_masks: int) -> Path:
    """An image and its SA-1B JSON: roots (ellipses) → 3 parts each → sub-parts, ``num_masks`` in
    all."""
    import cv2
    import numpy as np

    from unsam.io.sa1b import annotation_from_mask, write_sa1b_json

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    image = cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    anns = []

    def add(mask, level, parent):
        anns.append(annotation_from_mask(mask, len(anns), level=level, parent_id=parent))
        return len(anns) - 1

    while len(anns) < num_masks:
        root = np.zeros((HEIGHT, WIDTH), np.uint8)
        cx, cy = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        axes = (int(rng.integers(40, 500)), int(rng.integers(40, 400)))
        cv2.ellipse(root, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        root_id = add(root.astype(bool), 0, -1)
        ys, xs = np.nonzero(root)
        for part in range(3):
            if len(anns) >= num_masks:
                break
            cut = (xs - cx) * np.cos(part * 2.1) + (ys - cy) * np.sin(part * 2.1) > 0
            pm = np.zeros((HEIGHT, WIDTH), bool)
            pm[ys[cut], xs[cut]] = True
            part_id = add(pm, 1, root_id)
            if len(anns) < num_masks and pm.any():
                sub = pm & (np.add.outer(np.arange(HEIGHT), np.arange(WIDTH)) % 97 < 48)
                add(sub, 2, part_id)
    cv2.imwrite(str(folder / "sa_1.jpg"), image[:, :, ::-1])
    info = {"image_id": 1, "width": WIDTH, "height": HEIGHT, "file_name": "sa_1.jpg"}
    path = folder / "sa_1.json"
    write_sa1b_json(path, info, anns[:num_masks])
    return path


def run_child(variant: str, record: str, repeat: int, threads: int) -> dict:
    """Map the record ``repeat`` times; seconds per sample, peak RSS, a hash of every output."""
    import unsam.compat  # noqa: F401

    import numpy as np
    import torch
    from detectron2.structures import BitMasks

    from unsam.config.loading import load_config
    from unsam.data import mapper as mapper_module
    from unsam.data.sa1b import load_sa1b_dicts

    torch.set_num_threads(threads)
    if variant == "reference":

        def decode_then_transform(segmentations, height, width, transforms):
            # the mapper's previous path: full-resolution decode, transform, drop empties, boxes
            stack = np.stack(
                [mapper_module.decode_segmentation(s, height, width) for s in segmentations]
            )
            stack = mapper_module.transform_masks(transforms, stack)
            kept = np.flatnonzero(stack.any(axis=(1, 2)))
            stack = stack[kept]
            return (
                stack,
                kept,
                BitMasks(torch.from_numpy(stack)).get_bounding_boxes().tensor.numpy(),
            )

        mapper_module.decode_transformed_masks = decode_then_transform
    cfg = load_config(
        str(REPO / "configs" / "unsam_only_sa-1b_R50_lsj.yaml"),
        ["MODEL.DEVICE", "cpu", "INPUT.MAX_INSTANCES_PER_IMAGE", "100000"],
    )
    mapper = mapper_module.UnSAMDatasetMapper(cfg, is_train=True)
    record = load_sa1b_dicts(Path(record).parent)[0]
    times, hashes, kept = [], [], []
    for i in range(repeat):
        np.random.seed(i)  # detectron2's augmentations draw from numpy's global generator
        start = time.perf_counter()
        out = mapper(record)
        times.append(time.perf_counter() - start)
        masks = out["instances"].gt_masks.tensor.numpy()
        hashes.append(
            hashlib.sha1(np.packbits(masks).tobytes() + str(masks.shape).encode()).hexdigest()
        )
        kept.append(int(masks.shape[0]))
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "seconds_per_sample": sum(times) / len(times),
        "first_s": times[0],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9,
        "masks_kept": kept,
        "hashes": hashes,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.record, args.repeat, args.threads)))
        return 0
    results = {
        "image": f"{HEIGHT}x{WIDTH}",
        "masks": args.masks,
        "samples": args.repeat,
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        record = make_record(Path(tmp), args.masks)
        for variant in ("mapper", "reference"):
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--record",
                    str(record),
                    "--repeat",
                    str(args.repeat),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONWARNINGS="ignore"),
            )
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            results[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    mapper, ref = results["mapper"], results["reference"]
    results["identical_outputs"] = mapper["hashes"] == ref["hashes"]
    results["speedup"] = ref["seconds_per_sample"] / mapper["seconds_per_sample"]
    for variant in ("mapper", "reference"):
        r = results[variant]
        print(
            f"{variant:>10}: {r['seconds_per_sample']:.3f} s/sample, "
            f"peak RSS {r['peak_rss_gb']:.2f} GB, "
            f"masks kept per sample {r['masks_kept']}"
        )
    print(
        f"speed-up {results['speedup']:.1f}x (target >= 5x), "
        f"identical outputs: {results['identical_outputs']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
