"""Speed and memory of the pseudo-label engine: seconds/image and peak RSS per backend.

::

    python benchmarks/pseudo.py --input IMAGES [--num 10] [--backends classical dino]
        [--dino-weights PATH_OR_URL] [--threads 2] [--out bench.json]

Each backend runs in a fresh subprocess (so peak RSS is its own) on the first ``--num`` images
at the default engine settings; the first image is a warm-up and is not timed. The dino
backend is skipped when no ``--dino-weights`` is given (there is no offline default for it).
Timings are wall-clock on whatever the machine is doing: on a shared box they are inflated.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import unsam
from unsam.pseudo.classical import ClassicalLabeler, ClassicalSettings
from unsam.pseudo.runner import list_images, read_image
cfg = ClassicalSettings(features={backend!r}, dino_weights={weights!r})
labeler = ClassicalLabeler(cfg)
files = list_images({input!r})[:{num}]
times, masks = [], []
for i, f in enumerate(files):
    img = read_image(f)
    t = time.perf_counter()
    anns = labeler(img)
    if i > 0 or len(files) == 1:
        times.append(time.perf_counter() - t)
        masks.append(len(anns))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({{"backend": {backend!r}, "images": len(times),
                  "seconds_per_image": sum(times) / max(1, len(times)),
                  "max_seconds": max(times) if times else 0.0,
                  "masks_per_image": sum(masks) / max(1, len(masks)), "peak_rss_mb": rss}}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--num", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["classical", "dino"])
    ap.add_argument("--dino-weights", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for backend in args.backends:
        if backend == "dino" and not args.dino_weights:
            print("dino: skipped (no --dino-weights)")
            continue
        code = _CHILD.format(
            root=str(ROOT),
            threads=args.threads,
            backend=backend,
            weights=args.dino_weights,
            input=args.input,
            num=args.num + 1,
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{backend}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(
            f"{backend}: {res['seconds_per_image']:.2f} s/image (max {res['max_seconds']:.2f}), "
            f"{res['masks_per_image']:.0f} masks/image, peak RSS {res['peak_rss_mb']:.0f} MB "
            f"over {res['images']} images, {args.threads} threads"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
