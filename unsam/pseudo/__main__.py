"""``python -m unsam.pseudo --input DIR|GLOB --output DIR [options]`` — see :mod:`unsam.pseudo.engine`."""
import argparse
import logging
import sys

import unsam  # noqa: F401  (compat before detectron2)

from .detector import DEFAULT_DIVIDE_CONFIG, DivideError
from .engine import EngineConfig, build_labeler, run
from ..features import FeatureError

logger = logging.getLogger("unsam.pseudo")


def _shard(text: str):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n (e.g. 0/4), got '{text}'")
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    ap = argparse.ArgumentParser(prog="python -m unsam.pseudo",
                                 description="Unsupervised divide-and-conquer pseudo labels (SA-1B JSON per image).")
    ap.add_argument("--input", required=True, help="image folder or glob pattern")
    ap.add_argument("--output", required=True, help="output folder (<stem>.json per image)")
    ap.add_argument("--recipe", choices=("classical", "unsam"), default=d.recipe,
                    help="classical: the offline engine (default); unsam: the published UnSAM "
                         "recipe (CutLER detector divide, DINO keys on each region's crop)")
    ap.add_argument("--features", choices=("classical", "dino"), default=None,
                    help="feature backend (default: classical; recipe unsam: dino when "
                         "--dino-weights is given)")
    ap.add_argument("--dino-weights", default=None, help="DINO checkpoint path or URL (dino backend)")
    ap.add_argument("--dino-arch", default=d.dino_arch,
                    help="vit_base_patch8_224 | vit_small_patch8_224 | vit_base_patch16_224")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--resolution", type=int, default=d.resolution, help="long side of the feature grid input")
    ap.add_argument("--crop-resolution", type=int, default=d.crop_resolution)
    ap.add_argument("--n-divide", type=int, default=d.n_divide, help="MaskCut masks per image")
    ap.add_argument("--tau", type=float, default=d.tau)
    ap.add_argument("--thresholds", type=float, nargs="+", default=list(d.thresholds))
    ap.add_argument("--max-masks", type=int, default=d.max_masks)
    ap.add_argument("--superpixels", type=int, default=d.n_superpixels,
                    help="superpixels per image (the nodes that are merged)")
    ap.add_argument("--dedup-iou", type=float, default=d.dedup_iou,
                    help="drop a mask whose IoU with a better-scored one exceeds this")
    ap.add_argument("--min-patches", type=int, default=d.min_patches,
                    help="smallest reported group, in feature-grid cells")
    ap.add_argument("--refine-top", type=int, default=d.refine_top,
                    help="add a colour-snapped variant of this many best masks (0: off)")
    ap.add_argument("--selective", nargs="*", choices=("features", "colour"), default=list(d.selective),
                    help="selective-search-style hierarchies to add (none: pass the flag alone)")
    g = ap.add_argument_group("recipe unsam")
    g.add_argument("--divide", choices=("detector", "maskcut"), default=None,
                   help="detector (default when --divide-weights is given) or MaskCut on the "
                        "whole image (not the published divide)")
    g.add_argument("--divide-config", default=DEFAULT_DIVIDE_CONFIG, help="detectron2 config of the detector")
    g.add_argument("--divide-weights", default=None,
                   help="detector checkpoint PATH or URL (CutLER's cutler_cascade_final.pth)")
    g.add_argument("--divide-score", type=float, default=d.divide_score,
                   help="detector instances scoring above this are divided regions (detectron2 keeps score > threshold)")
    g.add_argument("--conquer-size", type=int, default=d.conquer_size,
                   help="each region's crop is resized to this square before the features")
    g.add_argument("--refine", action="store_true",
                   help="snap masks to superpixels (the engine's unsupervised refinement; the "
                        "published CascadePSP was trained with human masks)")
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n")
    ap.add_argument("--start-id", type=int, default=0, help="first index into the sorted image list")
    ap.add_argument("--end-id", type=int, default=None, help="one past the last index")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--visualize", action="store_true", help="write overlays to <output>/vis/")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    features, divide = args.features, args.divide
    if args.recipe == "unsam":
        if features is None:
            features = "dino" if args.dino_weights else "classical"
            if features == "classical":
                logger.warning("recipe unsam without --dino-weights: conquering on classical "
                               "features, not the published DINO keys")
        if divide is None:
            divide = "detector" if args.divide_weights else "maskcut"
            if divide == "maskcut":
                logger.warning("recipe unsam without --divide-weights: dividing with MaskCut on "
                               "the whole image, not the published CutLER detector")
        elif divide == "detector" and not args.divide_weights:
            print("error: --divide detector needs --divide-weights PATH|URL", file=sys.stderr)
            return 2
    cfg = EngineConfig(recipe=args.recipe, features=features or "classical", resolution=args.resolution,
                       crop_resolution=args.crop_resolution, n_divide=args.n_divide, tau=args.tau,
                       thresholds=tuple(args.thresholds), max_masks=args.max_masks, seed=args.seed,
                       n_superpixels=args.superpixels, min_patches=args.min_patches,
                       dedup_iou=args.dedup_iou, selective=tuple(args.selective),
                       refine_top=args.refine_top,
                       device=args.device, dino_weights=args.dino_weights, dino_arch=args.dino_arch,
                       divide=divide or "detector", divide_config=args.divide_config,
                       divide_weights=args.divide_weights, divide_score=args.divide_score,
                       conquer_size=args.conquer_size, refine=args.refine)
    labeler = None
    if cfg.recipe == "unsam":
        # fail fast on bad weights / config before any image or worker starts; reused below
        try:
            labeler = build_labeler(cfg)
        except (FeatureError, DivideError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif cfg.features == "dino":
        # fail fast on bad weights before any worker starts
        from ..features import build_features
        try:
            build_features("dino", cfg.resolution, cfg.device, cfg.dino_weights, cfg.dino_arch)
        except FeatureError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        s = run(args.input, args.output, cfg, shard=args.shard, start_id=args.start_id,
                end_id=args.end_id, workers=args.workers, visualize=args.visualize,
                progress=not args.quiet, labeler=labeler)
    except (FileNotFoundError, ValueError, FeatureError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = s.done / s.seconds if s.seconds > 0 else 0.0
    print(f"{s.done} labelled, {s.skipped} already done, {s.failed} failed "
          f"({s.masks} masks, {s.seconds:.1f} s, {rate:.2f} img/s)"
          + (f"; failures listed in {args.output}/failed.txt" if s.failed else ""))
    return 1 if s.failed and not s.done and not s.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
