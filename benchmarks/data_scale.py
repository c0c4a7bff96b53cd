#!/usr/bin/env python
"""The lazy dataset index at SA-1B scale: build time, size, resident memory and read speed.

For each ``--n`` and each ``--formats`` entry, writes a synthetic dataset root of N images —
``json`` (shard folders of ``<name>.json`` + image), ``tar`` (SA-1B-style ``sa_*.tar`` of
``sa_N.jpg`` + ``sa_N.json``) or ``tsv`` (published-layout ``train-K.tsv`` + ``.lineidx``),
``--per-source`` images per folder / tar / shard — then, per ``--workers`` value:

* index build: seconds, images/s, images/s per worker (files freshly written, so mostly in the
  page cache: this is the CPU cost of indexing, not the disk's);
* index size on disk (the merged generation; the chunk files separately);
* in a fresh process: seconds to open ``IndexedDataset``, RSS growth after opening and after
  ``len()`` + ``--touch`` random ``record()`` calls (bytes per image), records/s, pickled size.

Records are realistic: each holds ``--masks`` annotations (SA-1B's mean is ~100) drawn from the
pseudo labels the engine writes for two shared photos (``python -m unsam.pseudo``, default
classical recipe, 500 masks each, made once into ``--pool``), so JSON sizes and the cost of
parsing are those of real pseudo labels. **The images are small placeholders** (one 64×48 JPEG
for every record, its JSON still says 640×480 / 640×424): fine for the index and start-up
figures, not for anything that decodes images.

    python benchmarks/data_scale.py                         # N = 10 000, all formats, 1 worker
    python benchmarks/data_scale.py --n 10000 100000 --formats json tar --workers 1 2
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_PHOTOS = ["000000005001.jpg", "000000010764.jpg"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10000], help="images per synthetic root")
    p.add_argument("--formats", nargs="+", choices=("json", "tar", "tsv"), default=["json", "tar", "tsv"])
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="index build processes (each measured)")
    p.add_argument("--masks", type=int, default=100, help="annotations per record (SA-1B's mean is ~100)")
    p.add_argument("--per-source", type=int, default=1000, help="images per shard folder / tar / TSV shard")
    p.add_argument("--touch", type=int, default=1000, help="random records read in the memory check")
    p.add_argument("--work", default=str(REPO / "outputs" / "bench_data_scale"),
                   help="folder for the synthetic roots (each deleted after its measurement)")
    p.add_argument("--pool", default=None, help="folder of real pseudo-label JSONs to draw annotations from "
                   "(default: <work>/pool, made by the pseudo-label engine on two shared photos)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic roots")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", nargs=2, metavar=("ROOT", "TOUCH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ data
def make_pool(pool: Path) -> list:
    """Annotation pools ``[(height, width, [annotation JSON text without its id])]`` from real
    pseudo labels (made with the engine on two shared photos when ``pool`` has none)."""
    if not list(pool.glob("*.json")):
        from unsam.data.coco import shared_data_dir

        photos = pool / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        images = Path(shared_data_dir()) / "coco_tiny_val2017" / "images"
        for name in SHARED_PHOTOS:
            shutil.copy(images / name, photos / name)
        print(f"making real pseudo labels for {len(SHARED_PHOTOS)} shared photos into {pool} ...", flush=True)
        subprocess.run([sys.executable, "-m", "unsam.pseudo", "--input", str(photos), "--output", str(pool),
                        "--quiet"], check=True, cwd=REPO)
    pools = []
    for path in sorted(pool.glob("*.json")):
        doc = json.loads(path.read_text())
        texts = []
        for ann in doc["annotations"]:
            ann = {k: v for k, v in ann.items() if k != "id"}
            texts.append(json.dumps(ann)[1:])  # '"segmentation": ...}' — the id is prepended per record
        pools.append((doc["image"]["height"], doc["image"]["width"], texts))
    return pools


def placeholder_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)).save(buf, "JPEG")
    return buf.getvalue()


def records(n: int, pools: list, masks: int, seed: int = 0):
    """``(k, name, JSON text)`` of n synthetic SA-1B records, annotations resampled from ``pools``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for k in range(n):
        height, width, texts = pools[k % len(pools)]
        picks = rng.choice(len(texts), size=min(masks, len(texts)), replace=False)
        anns = ", ".join('{"id": %d, %s' % (j, texts[p]) for j, p in enumerate(picks))
        name = f"sa_{k}"
        head = json.dumps({"image_id": k, "width": width, "height": height, "file_name": f"{name}.jpg"})
        yield k, name, '{"image": %s, "annotations": [%s]}' % (head, anns)


def write_root(root: Path, fmt: str, n: int, pools: list, masks: int, per_source: int) -> None:
    import base64

    image = placeholder_jpeg()
    image_b64 = base64.b64encode(image)
    root.mkdir(parents=True)
    sink = None
    offsets: list = []
    position = 0
    for k, name, text in records(n, pools, masks):
        part = k // per_source
        if k % per_source == 0:
            if sink is not None:
                sink.close()
                if fmt == "tsv":
                    (root / f"train-{part - 1}.lineidx").write_text("".join(f"{o}\n" for o in offsets))
            offsets, position = [], 0
            if fmt == "json":
                sink = None
                (root / f"shard_{part:04d}").mkdir()
            elif fmt == "tar":
                sink = tarfile.open(root / f"sa_{part:06d}.tar", "w", format=tarfile.GNU_FORMAT)
            else:
                sink = open(root / f"train-{part}.tsv", "wb")
        data = text.encode()
        if fmt == "json":
            folder = root / f"shard_{part:04d}"
            (folder / f"{name}.jpg").write_bytes(image)
            (folder / f"{name}.json").write_bytes(data)
        elif fmt == "tar":
            for member, payload in ((f"{name}.jpg", image), (f"{name}.json", data)):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                sink.addfile(info, io.BytesIO(payload))
        else:
            line = b"%s\t%s\t%s\n" % (name.encode(), data, image_b64)
            offsets.append(position)
            sink.write(line)
            position += len(line)
    if sink is not None:
        sink.close()
        if fmt == "tsv":
            (root / f"train-{(n - 1) // per_source}.lineidx").write_text("".join(f"{o}\n" for o in offsets))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ memory (child)
def rss() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields


def mapped_rss(folder: str) -> int:
    """Resident bytes of this process's memory maps of files under ``folder`` (the index)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
                inside = len(parts) >= 6 and parts[5].startswith(folder)
            elif inside and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


def child(root: str, touch: int) -> None:
    """Open the index in this fresh process; print RSS / timing figures as JSON."""
    import gc

    import numpy as np

    from unsam.data.index import IndexedDataset
    from unsam.data.index.dataset import annotation_dict
    from unsam.data.index.formats import parse_record

    # warm up the code a record read runs (JSON, RLE checks) on a record that is not in the index,
    # so that the growth below is the index's and the reads', not the first use of modules
    _, _, (text, *_) = make_pool(Path(os.environ["DATA_SCALE_POOL"]))[0]
    data, _ = parse_record(('{"image": {"height": 480, "width": 640}, "annotations": [{"id": 0, %s]}'
                            % text).encode(), "warm-up")
    annotation_dict(data["annotations"][0], 0)
    gc.collect()
    base = rss()
    t0 = time.perf_counter()
    ds = IndexedDataset(root)
    n = len(ds)
    opened = time.perf_counter() - t0
    after_open = rss()
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n, touch)
    t0 = time.perf_counter()
    masks = 0
    for i in picks:
        masks += len(ds.record(int(i))["annotations"])
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in picks:
        ds.record(int(i), max_instances=50, rng=rng)
    capped = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in picks:
        ds.record(int(i), validate=False)
    unchecked = time.perf_counter() - t0
    gc.collect()
    after_touch = rss()
    print(json.dumps({
        "images": n, "open_s": opened, "pickled_bytes": len(pickle.dumps(ds)),
        "rss_open_bytes": after_open["VmRSS"] - base["VmRSS"],
        "rss_touch_bytes": after_touch["VmRSS"] - base["VmRSS"],
        "anon_touch_bytes": after_touch["RssAnon"] - base["RssAnon"],
        "file_touch_bytes": after_touch["RssFile"] - base["RssFile"],
        "index_mapped_bytes": mapped_rss(ds.index_dir),
        "records_per_s": touch / seconds, "records_per_s_max50": touch / capped,
        "records_per_s_unvalidated": touch / unchecked, "masks_read": masks,
    }))


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    import logging

    from unsam.data.index import build_index

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    pool_dir = Path(args.pool) if args.pool else work / "pool"
    pools = make_pool(pool_dir)
    print(f"records: {args.masks} annotations each, resampled from {sum(len(t) for _, _, t in pools)} real pseudo "
          f"masks of {len(pools)} shared photos; images: one 64x48 placeholder JPEG; "
          f"{args.per_source} images per folder / tar / TSV shard; {os.cpu_count()} CPUs (shared with other jobs)")
    results = []
    for n in args.n:
        for fmt in args.formats:
            root = work / f"{fmt}_{n}"
            if root.exists():
                shutil.rmtree(root)
            t0 = time.perf_counter()
            write_root(root, fmt, n, pools, args.masks, args.per_source)
            made = time.perf_counter() - t0
            data_bytes = folder_bytes(root)
            for workers in args.workers:
                summary = build_index(root, workers=workers, rebuild=True, progress=False)
                assert summary.images == n and summary.skipped == 0, summary.line()
                index_dir = Path(summary.index_dir)
                generation = index_dir / json.loads((index_dir / "CURRENT").read_text())["generation"]
                out = subprocess.run([sys.executable, __file__, "--child", str(root), str(args.touch)],
                                     check=True, capture_output=True, text=True, cwd=REPO,
                                     env={**os.environ, "DATA_SCALE_POOL": str(pool_dir)})
                mem = json.loads(out.stdout.strip().splitlines()[-1])
                rate = n / summary.index_seconds
                result = {"n": n, "format": fmt, "workers": workers, "data_bytes": data_bytes, "write_s": made,
                          "build_s": summary.seconds, "index_s": summary.index_seconds, "images_per_s": rate,
                          "images_per_s_per_worker": rate / workers, "slow_path": summary.slow,
                          "index_bytes": folder_bytes(generation), "chunk_bytes": folder_bytes(index_dir / "chunks"),
                          **mem}
                results.append(result)
                print(f"N={n:>8} {fmt:4} workers={workers}: data {data_bytes / 1e9:.2f} GB (written in {made:.0f} s); "
                      f"build {summary.seconds:.1f} s = {rate:.0f} img/s ({rate / workers:.0f} per worker, "
                      f"{summary.slow} slow-path records); index {result['index_bytes'] / n:.0f} B/img on disk "
                      f"(+ chunks {result['chunk_bytes'] / n:.0f} B/img); open {mem['open_s'] * 1e3:.1f} ms, "
                      f"RSS +{mem['rss_open_bytes'] / n:.0f} B/img after open, +{mem['rss_touch_bytes'] / 1e6:.1f} MB "
                      f"({mem['rss_touch_bytes'] / n:.0f} B/img; anon {mem['anon_touch_bytes'] / 1e6:.1f} MB, "
                      f"file-backed {mem['file_touch_bytes'] / 1e6:.1f} MB, of which index maps "
                      f"{mem['index_mapped_bytes'] / 1e6:.2f} MB) after len + {args.touch} records; "
                      f"record() {mem['records_per_s']:.0f}/s ({mem['records_per_s_max50']:.0f}/s with "
                      f"max_instances=50, {mem['records_per_s_unvalidated']:.0f}/s unvalidated); "
                      f"pickled {mem['pickled_bytes']} B", flush=True)
            if not args.keep:
                shutil.rmtree(root)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
