"""``python -m unsam.data.index ROOT [ROOT ...]``: build or update dataset indexes (see --help)."""

import argparse
import logging
import sys

from ...utils.files import OutputError

DESCRIPTION = """\
Build or update the index of each dataset ROOT, so that training opens it in seconds with
~100 bytes of memory per image instead of reading every JSON.

A ROOT (flat, or one level of shard sub-folders) may hold, mixed:
  <name>.json + image   SA-1B JSON per image (pseudo-label engine output, extracted SA-1B); the
                        image beside it (same stem) or at image.file_name
  *.tar                 SA-1B as released (sa_N.jpg + sa_N.json members), read without extracting
  *.tsv [+ .lineidx]    published UnSAM / Semantic-SAM shards: name<TAB>json<TAB>base64 image

The index goes to ROOT/.unsam_index/, or with --cache-dir DIR to DIR/<root name>-<hash> (for
data on a read-only mount; pass the same DIR when training). Rerunning is cheap: only new or
changed sources (size or mtime) are indexed, removed ones are dropped, and an interrupted build
continues with the parts still missing. Records that cannot be indexed (unreadable JSON, missing
image, truncated tar, bad lineidx) are named in warnings, counted in the summary and listed in
the index's skipped.txt.

examples:
  python -m unsam.data.index /datasets/sa1b --workers 16
  python -m unsam.data.index /ro/sa1b_pseudo --cache-dir outputs/index
  python -m unsam.data.index /data/my_pseudo --to-tsv /data/my_tsv --images-per-shard 10000
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m unsam.data.index",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("roots", nargs="+", metavar="ROOT", help="dataset root folder(s)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="indexing processes (default: the CPUs this process may use)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="write the index under this folder, not beside the data"
    )
    p.add_argument(
        "--rebuild", action="store_true", help="index everything again (drop kept chunks)"
    )
    p.add_argument(
        "--to-tsv",
        metavar="OUT",
        default=None,
        help="then write all images of the roots as published-layout TSV shards into OUT",
    )
    p.add_argument(
        "--images-per-shard", type=int, default=1000, help="images per TSV shard (with --to-tsv)"
    )
    p.add_argument(
        "--prefix", default="train", help="TSV shard names: OUT/<prefix>-K.tsv (with --to-tsv)"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars; warnings and the summary only"
    )
    p.add_argument("--verbose", action="store_true", help="also log progress messages")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.images_per_shard < 1:
        p.error("--images-per-shard must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from ...io.sa1b import DatasetError, SA1BFormatError
    from .build import build_index
    from .dataset import IndexedDataset
    from .tsv import write_tsv_shards

    try:
        import os

        for root in args.roots:
            if not os.path.isdir(root):
                raise DatasetError(f"dataset root '{root}' is not a folder")
        if args.to_tsv:
            out = os.path.realpath(args.to_tsv)
            for root in args.roots:
                if os.path.dirname(out) == os.path.realpath(root) or out == os.path.realpath(root):
                    raise DatasetError(
                        f"--to-tsv folder '{args.to_tsv}' is inside dataset root '{root}': its "
                        "shards would be indexed as part of that root (choose a folder outside it)"
                    )
        empty = []
        for root in args.roots:
            summary = build_index(
                root,
                args.cache_dir,
                workers=args.workers,
                rebuild=args.rebuild,
                progress=not args.quiet,
            )
            print(summary.line(), flush=True)
            if summary.images == 0:
                empty.append(summary)
        if empty:
            first = (
                f"; first skipped: {empty[0].first_skipped[0]}" if empty[0].first_skipped else ""
            )
            raise DatasetError(
                f"dataset root '{empty[0].root}' has no usable image ({empty[0].skipped} "
                f"records skipped{first})"
            )
        if args.to_tsv:
            datasets = [IndexedDataset(root, args.cache_dir) for root in args.roots]
            print(
                write_tsv_shards(
                    datasets,
                    args.to_tsv,
                    args.images_per_shard,
                    args.prefix,
                    progress=not args.quiet,
                ).line(),
                flush=True,
            )
    except (DatasetError, OutputError, SA1BFormatError) as e:
        print(f"error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted; finished parts are kept, run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
