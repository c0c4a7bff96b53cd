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

Training figures (issue 27, the trainer on the index):

* ``--training``: per root, in a fresh process, the tiny config's ``Trainer`` on the root
  (``UNSAM.DATA.SA1B_ROOTS``, index already built): seconds from process launch and from
  ``Trainer(cfg)`` to the first training batch, then ``--samples`` more samples drawn through the
  loader with ``--loader-workers`` workers: RSS of the training process and of each loader
  worker at the first batch and after them (``/proc``), and the index's resident pages. The
  placeholder images then have each record's own size (640×480 / 640×424, one flat JPEG each:
  the mapper checks sizes), and ``--masks 2`` keeps a 1 M-image root to a few GB.
* ``--mapper``: the training mapper at SA-1B size (one 1500×2250 record with 500 nested masks,
  ``benchmarks/data.py``'s), today's list path (``load_sa1b_dicts`` once, then the mapper) against
  the index path (one record read per sample, then the mapper), same seeds, one thread,
  interleaved; outputs compared.
* ``--ats N``: the adaptive task sampler at N images × 3 tasks: state bytes per cell, time per
  batch (4 items per rank, a 256-item block drawn every 64 batches, the table synced every batch),
  against drawing a block the previous way (the full distribution and its cumulative sum).

    python benchmarks/data_scale.py --n 10000 1000000 --formats tar --masks 2 --training
    python benchmarks/data_scale.py --n 0 --mapper --ats 1000000
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
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, nargs="+", default=[10000], help="images per synthetic root")
    p.add_argument(
        "--formats", nargs="+", choices=("json", "tar", "tsv"), default=["json", "tar", "tsv"]
    )
    p.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="index build processes (each measured)"
    )
    p.add_argument(
        "--masks", type=int, default=100, help="annotations per record (SA-1B's mean is ~100)"
    )
    p.add_argument(
        "--per-source", type=int, default=1000, help="images per shard folder / tar / TSV shard"
    )
    p.add_argument(
        "--touch", type=int, default=1000, help="random records read in the memory check"
    )
    p.add_argument(
        "--work",
        default=str(REPO / "outputs" / "bench_data_scale"),
        help="folder for the synthetic roots (each deleted after its measurement)",
    )
    p.add_argument(
        "--pool",
        default=None,
        help="folder of real pseudo-label JSONs to draw annotations from "
        "(default: <work>/pool, made by the pseudo-label engine on two shared photos)",
    )
    p.add_argument("--keep", action="store_true", help="keep the synthetic roots")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep a root left by --keep instead of writing it again "
        "(its index is brought up to date, not rebuilt)",
    )
    p.add_argument(
        "--training", action="store_true", help="also: start-up to the first batch, RSS per process"
    )
    p.add_argument(
        "--loader-workers", type=int, default=2, help="DATALOADER.NUM_WORKERS of --training"
    )
    p.add_argument(
        "--samples", type=int, default=2000, help="samples drawn for --training's RSS growth"
    )
    p.add_argument(
        "--mapper",
        action="store_true",
        help="also: mapper s/sample at SA-1B size, list vs index path",
    )
    p.add_argument("--mapper-samples", type=int, default=5, help="samples per path for --mapper")
    p.add_argument(
        "--ats",
        type=int,
        default=0,
        metavar="N",
        help="also: ATS cost per batch at N images x 3 tasks",
    )
    p.add_argument("--child", nargs=2, metavar=("ROOT", "TOUCH"), help=argparse.SUPPRESS)
    p.add_argument(
        "--train-child",
        nargs=4,
        metavar=("ROOT", "WORKERS", "SAMPLES", "LAUNCHED"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--mapper-child", nargs=2, metavar=("FOLDER", "SAMPLES"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ data
def make_pool(pool: Path) -> list:
    """Annotation pools ``[(height, width, [annotation JSON text without its id])]`` from real
    pseudo labels (made with the engine on two shared photos when ``pool`` has none)."""
    if not list(pool.glob("*.json")):
        from unsam.data.coco import shared_data_dir

        photos = pool / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        shared = shared_data_dir(os.environ.get("UNSAM_SHARED") or REPO.parent / "shared")
        if shared is None:
            raise SystemExit(
                "error: the shared photos are missing: set UNSAM_SHARED to the folder "
                "holding data/coco_tiny_val2017"
            )
        images = shared / "coco_tiny_val2017" / "images"
        for name in SHARED_PHOTOS:
            shutil.copy(images / name, photos / name)
        print(
            f"making real pseudo labels for {len(SHARED_PHOTOS)} shared photos into {pool} ...",
            flush=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "unsam.pseudo",
                "--input",
                str(photos),
                "--output",
                str(pool),
                "--quiet",
            ],
            check=True,
            cwd=REPO,
        )
    pools = []
    for path in sorted(pool.glob("*.json")):
        doc = json.loads(path.read_text())
        texts = []
        for ann in doc["annotations"]:
            ann = {k: v for k, v in ann.items() if k != "id"}
            texts.append(
                json.dumps(ann)[1:]
            )  # '"segmentation": ...}' — the id is prepended per record
        pools.append((doc["image"]["height"], doc["image"]["width"], texts))
    return pools


def placeholder_jpeg(height: int = 48, width: int = 64) -> bytes:
    """A small JPEG: 64×48 (the index figures), or a flat one of a record's own size (training)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    if (height, width) == (48, 64):
        image = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    else:
        image = np.full((height, width, 3), 120, np.uint8)
        image[: height // 2, : width // 2] = (200, 60, 40)
    Image.fromarray(image).save(buf, "JPEG")
    return buf.getvalue()


def records(n: int, pools: list, masks: int, seed: int = 0):
    """``(k, name, JSON text)`` of n synthetic SA-1B records, annotations resampled from
    ``pools``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for k in range(n):
        height, width, texts = pools[k % len(pools)]
        picks = rng.choice(len(texts), size=min(masks, len(texts)), replace=False)
        anns = ", ".join('{"id": %d, %s' % (j, texts[p]) for j, p in enumerate(picks))
        name = f"sa_{k}"
        head = json.dumps(
            {"image_id": k, "width": width, "height": height, "file_name": f"{name}.jpg"}
        )
        yield k, name, '{"image": %s, "annotations": [%s]}' % (head, anns)


def write_root(
    root: Path, fmt: str, n: int, pools: list, masks: int, per_source: int, real_size: bool = False
) -> None:
    """``real_size``: each record's placeholder image has the record's size (else one 64×48)."""
    import base64

    from tqdm import tqdm

    sized = {
        (h, w): placeholder_jpeg(h, w) if real_size else placeholder_jpeg() for h, w, _ in pools
    }
    sized_b64 = {k: base64.b64encode(v) for k, v in sized.items()}
    root.mkdir(parents=True)
    sink = None
    offsets: list = []
    position = 0
    for k, name, text in tqdm(
        records(n, pools, masks),
        total=n,
        desc=f"write {root.name}",
        unit="img",
        mininterval=10,
        disable=n < 100000,
    ):
        height, width, _ = pools[k % len(pools)]
        image, image_b64 = sized[(height, width)], sized_b64[(height, width)]
        part = k // per_source
        if k % per_source == 0:
            if sink is not None:
                sink.close()
                if fmt == "tsv":
                    (root / f"train-{part - 1}.lineidx").write_text(
                        "".join(f"{o}\n" for o in offsets)
                    )
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
            (root / f"train-{(n - 1) // per_source}.lineidx").write_text(
                "".join(f"{o}\n" for o in offsets)
            )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ memory (child)
def rss(pid="self") -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields


def mapped_rss(folder: str, pid="self") -> int:
    """Resident bytes of a process's memory maps of files under ``folder`` (the index)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
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
    data, _ = parse_record(
        ('{"image": {"height": 480, "width": 640}, "annotations": [{"id": 0, %s]}' % text).encode(),
        "warm-up",
    )
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
    print(
        json.dumps(
            {
                "images": n,
                "open_s": opened,
                "pickled_bytes": len(pickle.dumps(ds)),
                "rss_open_bytes": after_open["VmRSS"] - base["VmRSS"],
                "rss_touch_bytes": after_touch["VmRSS"] - base["VmRSS"],
                "anon_touch_bytes": after_touch["RssAnon"] - base["RssAnon"],
                "file_touch_bytes": after_touch["RssFile"] - base["RssFile"],
                "index_mapped_bytes": mapped_rss(ds.index_dir),
                "records_per_s": touch / seconds,
                "records_per_s_max50": touch / capped,
                "records_per_s_unvalidated": touch / unchecked,
                "masks_read": masks,
            }
        )
    )


# ------------------------------------------------------------------------------ training (child)
def child_pids() -> list:
    """This process's children (the loader workers), from /proc."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.append(int(entry))
    return sorted(out)


def train_child(root: str, workers: int, samples: int, launched: float) -> None:
    """The tiny config's Trainer on ``root`` (index built): seconds to the first batch, RSS."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    import unsam.compat  # noqa: F401

    from unsam.config.loading import load_config
    from unsam.engine.trainer import Trainer, register_datasets

    out = tempfile.mkdtemp(prefix="data_scale_train_")
    cfg = load_config(
        str(REPO / "configs" / "tiny" / "unsam_tiny.yaml"),
        [
            "UNSAM.DATA.SA1B_ROOTS",
            json.dumps([f"bench:{root}"]),
            "DATASETS.TRAIN",
            "('bench',)",
            "DATASETS.TEST",
            "()",
            "INPUT.IMAGE_SIZE",
            "64",
            "DATALOADER.NUM_WORKERS",
            str(workers),
            "SOLVER.IMS_PER_BATCH",
            "2",
            "MODEL.DEVICE",
            "cpu",
            "OUTPUT_DIR",
            out,
            "SEED",
            "1",
        ],
    )
    register_datasets(cfg)
    imported = time.time()
    base = rss()
    t0 = time.time()
    trainer = Trainer(cfg)  # model, optimizer, loader (the index's up-to-date check on rank 0)
    built = time.time()
    batches = trainer._trainer._data_loader_iter
    drawn = len(next(batches))
    first = time.time()
    at_first = {"main": rss(), **{str(p): rss(p) for p in child_pids()}}
    while drawn < samples + 2:
        drawn += len(next(batches))
    done = time.time()
    after = {"main": rss(), **{str(p): rss(p) for p in child_pids()}}
    index = os.path.join(os.path.abspath(root), ".unsam_index")
    for pid in after:  # the index's resident pages in each process (file-backed, shared by all)
        after[pid]["index_maps"] = mapped_rss(index, "self" if pid == "main" else pid)
    print(
        json.dumps(
            {
                "launch_to_first_batch_s": first - launched,
                "imports_s": imported - launched,
                "trainer_s": built - t0,
                "first_batch_s": first - built,
                "trainer_to_first_batch_s": first - t0,
                "samples": drawn - 2,
                "samples_s": done - first,
                "base_rss": base,
                "at_first": at_first,
                "after": after,
                "index_mapped_main": mapped_rss(index),
                "workers": workers,
            }
        )
    )


# ------------------------------------------------------------------------------ mapper (child)
def mapper_child(folder: str, samples: int) -> None:
    """Seconds per sample of the training mapper on one SA-1B-size record: the list path (dicts
    loaded once) against the index path (the record read per sample), interleaved, same seeds."""
    import hashlib

    import numpy as np
    import torch

    torch.set_num_threads(1)
    import unsam.compat  # noqa: F401

    from unsam.config.loading import load_config
    from unsam.data.index import IndexedDataset
    from unsam.data.mapper import UnSAMDatasetMapper
    from unsam.data.sa1b import load_sa1b_dicts
    from unsam.data.training import TrainingRecords

    def digest(out):
        inst = out["instances"]
        parts = [
            out["image"].numpy().tobytes(),
            np.packbits(inst.gt_masks.tensor.numpy()).tobytes(),
            inst.gt_boxes.tensor.numpy().tobytes(),
            inst.gt_levels.numpy().tobytes(),
            inst.gt_parents.numpy().tobytes(),
        ]
        return hashlib.sha1(b"".join(parts)).hexdigest()

    t0 = time.perf_counter()
    old = load_sa1b_dicts(folder)[0]
    load_s = time.perf_counter() - t0
    roots = {"json": folder, "tar": os.path.join(os.path.dirname(folder), "tar")}
    records = {
        k: TrainingRecords([(k, IndexedDataset(r, build=True, progress=False))])
        for k, r in roots.items()
    }
    results = {"list_load_s": load_s}
    for path, recs in records.items():  # the index path's extra work: reading the record (CPU s)
        t0 = time.process_time()
        for _ in range(20):
            recs[0]
        results[f"read_{path}_s"] = (time.process_time() - t0) / 20
    for config in ("unsam_only_sa-1b_R50_lsj.yaml", "unsam_only_sa-1b_R50.yaml"):
        cfg = load_config(str(REPO / "configs" / config), ["MODEL.DEVICE", "cpu"])
        mapper = UnSAMDatasetMapper(cfg, is_train=True)
        times = {"list": [], "json": [], "tar": []}
        same = True
        for k in range(samples):
            hashes = []
            for path in times:
                np.random.seed(k)
                torch.manual_seed(k)
                t0 = time.process_time()  # CPU time: other jobs on the machine do not count
                out = mapper(dict(old)) if path == "list" else mapper(records[path][0])
                times[path].append(time.process_time() - t0)
                hashes.append(digest(out))
            same &= len(set(hashes)) == 1
        results[config] = {
            "s_per_sample": {p: sum(t) / len(t) for p, t in times.items()},
            "identical": same,
            "instances": int(len(out["instances"])),
            "mapper": cfg.INPUT.DATASET_MAPPER_NAME,
            "sampling": cfg.INPUT.MAX_INSTANCES_SAMPLING,
        }
    print(json.dumps(results))


def mapper_figures(work: Path, samples: int) -> dict:
    """The SA-1B-size record of ``benchmarks/data.py`` as a JSON folder and a tar; the child's
    figures."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from data import HEIGHT, WIDTH, make_record

    folder = work / "mapper" / "json"
    if not (folder / "sa_1.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_record(folder, 500)
        tar_dir = work / "mapper" / "tar"
        tar_dir.mkdir(exist_ok=True)
        with tarfile.open(tar_dir / "sa_000000.tar", "w") as tf:
            tf.add(folder / "sa_1.jpg", arcname="sa_1.jpg")
            tf.add(folder / "sa_1.json", arcname="sa_1.json")
    out = subprocess.run(
        [sys.executable, __file__, "--mapper-child", str(folder), str(samples)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"mapper at SA-1B size ({HEIGHT}x{WIDTH}, 500 masks, 1 thread, CPU seconds, "
        f"{samples} samples per path, interleaved; the list path loads the record once: "
        f"{res['list_load_s']:.2f} s; the index path reads it per sample: "
        f"{res['read_json_s'] * 1e3:.1f} ms (JSON), {res['read_tar_s'] * 1e3:.1f} ms (tar)):"
    )
    for config in ("unsam_only_sa-1b_R50_lsj.yaml", "unsam_only_sa-1b_R50.yaml"):
        r = res[config]
        t = r["s_per_sample"]
        print(
            f"  {config} ({r['mapper']}, {r['sampling']}, {r['instances']} instances): "
            f"list {t['list']:.3f} s/sample, "
            f"index JSON {t['json']:.3f} (x{t['json'] / t['list']:.2f}), index tar {t['tar']:.3f} "
            f"(x{t['tar'] / t['list']:.2f}); identical outputs: {r['identical']}",
            flush=True,
        )
    return res


# ------------------------------------------------------------------------------ ATS
def ats_figures(n_images: int, tasks: int = 3, batch: int = 4, iterations: int = 2000) -> dict:
    """ATS at ``n_images`` × ``tasks``: per-batch draw and sync times, state bytes per cell, and
    what a block cost the previous way (the full distribution, its cumulative sum)."""
    import unsam.compat  # noqa: F401

    import numpy as np
    import torch

    from unsam.data.ats import AdaptiveTaskSampler, DifficultyTable

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    res = {"images": n_images, "tasks": tasks, "batch": batch}
    for phase in ("uniform", "adaptive"):
        t0 = time.perf_counter()
        table = DifficultyTable(n_images, tasks, ema=0.9)
        res["table_s"] = time.perf_counter() - t0
        seen = rng.choice(
            table.num_cells, table.num_cells // 10, replace=False
        )  # 10 % of cells measured
        table.update(seen // tasks, seen % tasks, rng.random(len(seen)))
        table.sync()
        sampler = AdaptiveTaskSampler(
            table,
            tasks,
            start_iter=0 if phase == "adaptive" else 10**9,
            block_size=256,
            seed=0,
            items_per_iteration=batch,
        )
        stream = iter(sampler)
        t0 = time.perf_counter()
        next(stream)  # the adaptive phase's first draw builds the sum tree
        res[f"{phase}_first_draw_s"] = time.perf_counter() - t0
        draws, syncs = [], []
        for i in range(iterations):
            t0 = time.perf_counter()
            items = [next(stream) for _ in range(batch)]
            t1 = time.perf_counter()
            table.update([a for a, _ in items], [t for _, t in items], rng.random(batch))
            table.sync()
            sampler.set_iteration(i + 1)
            t2 = time.perf_counter()
            draws.append(t1 - t0)
            syncs.append(t2 - t1)
        res[phase] = {
            "draw_ms_mean": 1e3 * float(np.mean(draws)),
            "draw_ms_max": 1e3 * float(np.max(draws)),
            "sync_ms_mean": 1e3 * float(np.mean(syncs)),
            "sync_ms_max": 1e3 * float(np.max(syncs)),
        }
    res["state_bytes_per_cell"] = table.state_bytes() / table.num_cells
    # the previous per-block work: the whole distribution and its cumulative sum, then a search
    t0 = time.perf_counter()
    for _ in range(3):
        p = table.probabilities(sampler.alpha, sampler.beta, sampler.eps)
        cdf = torch.cumsum(p, dim=0)
        torch.searchsorted(cdf, torch.rand(256, dtype=torch.float64) * cdf[-1], right=True)
    res["previous_block_ms"] = 1e3 * (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    torch.randperm(table.num_cells)
    res["previous_epoch_permutation_ms"] = 1e3 * (time.perf_counter() - t0)
    u, a = res["uniform"], res["adaptive"]
    print(
        f"ATS at {n_images} images x {tasks} tasks ({table.num_cells} cells), batch {batch}, "
        f"block 256, "
        f"synced every batch, 1 thread: state {res['state_bytes_per_cell']:.1f} B per cell; "
        f"draw per batch uniform {u['draw_ms_mean']:.3f} ms (max {u['draw_ms_max']:.2f}), adaptive "
        f"{a['draw_ms_mean']:.3f} ms (max {a['draw_ms_max']:.2f}; first draw builds the tree: "
        f"{res['adaptive_first_draw_s'] * 1e3:.0f} ms); sync {a['sync_ms_mean']:.2f} ms "
        f"(max {a['sync_ms_max']:.2f}); previous way: "
        f"{res['previous_block_ms']:.0f} ms per 256-item block + "
        f"{res['previous_epoch_permutation_ms']:.0f} "
        f"ms per uniform epoch",
        flush=True,
    )
    return res


def train_figures(root: Path, workers: int, samples: int) -> dict:
    launched = time.time()
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--train-child",
            str(root),
            str(workers),
            str(samples),
            repr(launched),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 1e6
    workers_first = {k: v for k, v in res["at_first"].items() if k != "main"}
    growth = [
        (res["after"][k]["VmRSS"] - v["VmRSS"]) / mb
        for k, v in workers_first.items()
        if k in res["after"]
    ]
    print(
        f"  training: launch -> first batch {res['launch_to_first_batch_s']:.1f} s (imports "
        f"{res['imports_s']:.1f} s, Trainer() {res['trainer_s']:.1f} s, "
        f"first batch {res['first_batch_s']:.1f} s); "
        f"RSS main {res['at_first']['main']['VmRSS'] / mb:.0f} MB at the first batch (anon "
        f"{res['at_first']['main']['RssAnon'] / mb:.0f}, "
        f"file {res['at_first']['main']['RssFile'] / mb:.0f}; index "
        f"maps {res['index_mapped_main'] / mb:.1f} MB), "
        f"{res['after']['main']['VmRSS'] / mb:.0f} MB after "
        f"{res['samples']} samples ({res['samples_s']:.0f} s); "
        f"{len(workers_first)} loader workers: "
        + ", ".join(f"{v['VmRSS'] / mb:.0f} MB" for v in workers_first.values())
        + f" at the first batch, growth {', '.join(f'{g:+.1f} MB' for g in growth)} "
        f"over the samples; index pages "
        + ", ".join(f"{v['index_maps'] / mb:.2f}" for v in res["after"].values())
        + " MB (main, workers)",
        flush=True,
    )
    res["worker_growth_mb"] = growth
    return res


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if args.train_child:
        train_child(
            args.train_child[0],
            int(args.train_child[1]),
            int(args.train_child[2]),
            float(args.train_child[3]),
        )
        return 0
    if args.mapper_child:
        mapper_child(args.mapper_child[0], int(args.mapper_child[1]))
        return 0
    import logging

    from unsam.data.index import build_index

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    pool_dir = Path(args.pool) if args.pool else work / "pool"
    pools = make_pool(pool_dir)
    print(
        f"records: {args.masks} annotations each, resampled from "
        f"{sum(len(t) for _, _, t in pools)} real pseudo "
        f"masks of {len(pools)} shared photos; images: "
        f"""{
            "a flat placeholder JPEG of the record size"
            if args.training
            else "one 64x48 placeholder JPEG"
        }; """
        f"{args.per_source} images per folder / tar / TSV shard; "
        f"{os.cpu_count()} CPUs (shared with other jobs)"
    )
    results = []
    if args.mapper:
        results.append({"mapper": mapper_figures(work, args.mapper_samples)})
    if args.ats:
        results.append({"ats": ats_figures(args.ats)})
    for n in (n for n in args.n if n > 0):
        for fmt in args.formats:
            root = work / f"{fmt}_{n}"
            t0 = time.perf_counter()
            if not (args.reuse and root.exists()):
                if root.exists():
                    shutil.rmtree(root)
                write_root(
                    root, fmt, n, pools, args.masks, args.per_source, real_size=args.training
                )
            made = time.perf_counter() - t0
            data_bytes = folder_bytes(root)
            for workers in args.workers:
                # --reuse: bring the kept index up to date (the start-up check's cost), no rebuild
                summary = build_index(root, workers=workers, rebuild=not args.reuse, progress=False)
                assert summary.images == n and summary.skipped == 0, summary.line()
                index_dir = Path(summary.index_dir)
                generation = (
                    index_dir / json.loads((index_dir / "CURRENT").read_text())["generation"]
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(root), str(args.touch)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    env={**os.environ, "DATA_SCALE_POOL": str(pool_dir)},
                )
                mem = json.loads(out.stdout.strip().splitlines()[-1])
                rate = n / summary.index_seconds if summary.index_seconds else float("nan")
                result = {
                    "n": n,
                    "format": fmt,
                    "workers": workers,
                    "data_bytes": data_bytes,
                    "write_s": made,
                    "build_s": summary.seconds,
                    "index_s": summary.index_seconds,
                    "images_per_s": rate,
                    "images_per_s_per_worker": rate / workers,
                    "slow_path": summary.slow,
                    "index_bytes": folder_bytes(generation),
                    "chunk_bytes": folder_bytes(index_dir / "chunks"),
                    **mem,
                }
                results.append(result)
                print(
                    f"N={n:>8} {fmt:4} workers={workers}: data {data_bytes / 1e9:.2f} GB "
                    f"(written in {made:.0f} s); "
                    + (
                        f"index up to date (checked in {summary.seconds:.1f} s); index"
                        if summary.up_to_date
                        else f"build {summary.seconds:.1f} s = {rate:.0f} img/s "
                        f"({rate / workers:.0f} per worker, "
                        f"{summary.slow} slow-path records); index"
                    )
                    + f" {result['index_bytes'] / n:.0f} B/img on disk "
                    f"(+ chunks {result['chunk_bytes'] / n:.0f} B/img); "
                    f"open {mem['open_s'] * 1e3:.1f} ms, "
                    f"RSS +{mem['rss_open_bytes'] / n:.0f} B/img after open, "
                    f"+{mem['rss_touch_bytes'] / 1e6:.1f} MB "
                    f"({mem['rss_touch_bytes'] / n:.0f} B/img; "
                    f"anon {mem['anon_touch_bytes'] / 1e6:.1f} MB, "
                    f"file-backed {mem['file_touch_bytes'] / 1e6:.1f} MB, of which index maps "
                    f"{mem['index_mapped_bytes'] / 1e6:.2f} MB) after len + {args.touch} records; "
                    f"record() {mem['records_per_s']:.0f}/s "
                    f"({mem['records_per_s_max50']:.0f}/s with "
                    f"max_instances=50, {mem['records_per_s_unvalidated']:.0f}/s unvalidated); "
                    f"pickled {mem['pickled_bytes']} B",
                    flush=True,
                )
            if args.training:
                results.append(
                    {
                        "n": n,
                        "format": fmt,
                        "training": train_figures(root, args.loader_workers, args.samples),
                    }
                )
            if not args.keep:
                shutil.rmtree(root)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
