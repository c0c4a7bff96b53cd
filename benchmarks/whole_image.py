#!/usr/bin/env python
"""Whole-image inference benchmark: seconds per image (split by stage) and peak RSS on CPU.

Builds the UnSAM R50 model (random weights: the cost does not depend on the values), runs one
random image through backbone -> pixel decoder -> query decoder -> post-processing and prints
the time of each stage and the process's peak resident memory, next to the reference figures of
the public Mask2Former code (DESIGN.md: 56 s network, 7.7 GB peak, 2 threads, 800x1067, 2000
queries). As in ``UnSAM.forward``, the last decoder layer's masks are computed only for the kept
queries, inside post-processing (which also includes upsampling the kept masks to image size).
Timings on a shared machine are noisy; peak RSS includes ~0.7 GB for importing torch.

    python benchmarks/whole_image.py                      # 800x1067, 2000 queries, 1000 detections
    python benchmarks/whole_image.py --short-side 1024    # 1024x1365
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# the public Mask2Former/UnSAM code on the same machine, model and settings (2 threads, 2000
# queries, 1000 detections), per image size: DESIGN.md (800x1067, network only: its
# post-processing needs > 19 GB) and issue 15 (384x512, end to end)
REFERENCE = {
    (800, 1067): {
        "network_s": 56.0,
        "backbone_s": 3.0,
        "pixel_decoder_s": 9.0,
        "query_decoder_s": 42.0,
        "peak_rss_gb": 7.7,
    },
    (384, 512): {"total_s": 15.9},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default=str(REPO / "configs" / "unsam_only_sa-1b_R50.yaml"))
    p.add_argument(
        "--short-side", type=int, default=800, help="image short side (long side = 4/3 of it)"
    )
    p.add_argument("--long-side", type=int, default=None, help="override the long side")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--detections", type=int, default=1000)
    p.add_argument("--dec-layers", type=int, default=10, help="MODEL.MASK_FORMER.DEC_LAYERS")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeat", type=int, default=1, help="timed runs (the first run is timed too)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    return p.parse_args(argv)


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def main(argv=None) -> int:
    args = parse_args(argv)
    import unsam.compat  # noqa: F401

    import torch
    from detectron2.modeling import build_model

    import unsam.modeling  # noqa: F401
    from unsam.config import get_unsam_cfg

    torch.set_num_threads(args.threads)
    cfg = get_unsam_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
            args.queries,
            "MODEL.MASK_FORMER.DEC_LAYERS",
            args.dec_layers,
            "TEST.DETECTIONS_PER_IMAGE",
            args.detections,
        ]
        + list(args.opts)
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    h = args.short_side
    w = args.long_side or int(round(h * 4 / 3))
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    inputs = [{"image": image, "height": h, "width": w}]
    rss_model = peak_rss_gb()

    runs = []
    with torch.inference_mode():
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            images = model.preprocess_image(inputs)
            feats = model.backbone(images.tensor)
            t1 = time.perf_counter()
            encoded = model.sem_seg_head.encode(feats)
            t2 = time.perf_counter()
            outputs = model.sem_seg_head.decode(encoded, final_masks=False)
            mask_features = encoded["mask_features"]
            del encoded, feats  # as UnSAM.forward: only the mask features outlive the decoder
            t3 = time.perf_counter()
            result = model.postprocess(outputs, inputs, images, mask_features)[0]["instances"]
            t4 = time.perf_counter()
            runs.append(
                {
                    "backbone_s": t1 - t0,
                    "pixel_decoder_s": t2 - t1,
                    "query_decoder_s": t3 - t2,
                    "postprocess_s": t4 - t3,
                    "network_s": t3 - t0,
                    "total_s": t4 - t0,
                }
            )
            n_det = len(result)
            del outputs, mask_features, result
    best = min(runs, key=lambda r: r["total_s"])
    res = {
        "image": [3, h, w],
        "queries": args.queries,
        "dec_layers": args.dec_layers,
        "detections": n_det,
        "threads": args.threads,
        **{k: round(v, 2) for k, v in best.items()},
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "rss_after_build_gb": round(rss_model, 2),
    }
    same_setting = (args.queries, args.detections, args.dec_layers, args.threads) == (
        2000,
        1000,
        10,
        2,
    )
    reference = REFERENCE.get((h, w), {}) if same_setting else {}
    from unsam.ops import cpu_kernels

    res["cpu_kernels"] = cpu_kernels() is not None
    print(
        f"UnSAM R50 whole-image inference, CPU, {args.threads} threads, image 3x{h}x{w}, "
        f"{args.queries} queries, {res['detections']} detections, compiled CPU kernels: "
        f"{'on' if res['cpu_kernels'] else 'off (pure PyTorch)'}"
    )
    for k in (
        "backbone_s",
        "pixel_decoder_s",
        "query_decoder_s",
        "postprocess_s",
        "network_s",
        "total_s",
    ):
        ref = reference.get(k)
        extra = f"   (reference {ref:.1f} s: {ref / best[k]:.1f}x faster)" if ref else ""
        print(f"  {k:16s} {best[k]:8.2f}{extra}")
    ref_rss = reference.get("peak_rss_gb")
    ref_note = (
        f"reference {ref_rss} GB network only, ratio {res['peak_rss_gb'] / ref_rss:.2f}; "
        if ref_rss
        else ""
    )
    print(
        f"  peak RSS         {res['peak_rss_gb']:8.2f} GB   "
        f"({ref_note}after model build {res['rss_after_build_gb']} GB)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
