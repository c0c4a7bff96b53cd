"""Build a root's index: find its sources, index them in parallel as chunks, merge the chunks.

Layout of an index folder (``<root>/.unsam_index/``, or ``<cache_dir>/<name>-<hash>/`` when the
data are read-only)::

    CURRENT                 JSON: the generation in use, image / source / skip counts
    chunks/<id>.npz         one finished task (a tar, a TSV, or ≤ ~1000 JSON files of a folder)
    index-<time>-<token>/   one merged generation:
        rows.npy            N × ROW_DTYPE (52 bytes: source, height, width, masks, record and
                            image byte ranges, empty masks), opened with mmap_mode='r'
        keys.bin            uint8 blob: per row its file / member / TSV name (UTF-8)
        keys_off.npy        (N + 1,) int64 offsets into keys.bin
        images.bin          uint8 blob: per row the image path of ``json`` rows ("" otherwise)
        images_off.npy      (N + 1,) int64 offsets into images.bin
        nonempty.npy        int64 rows with at least one non-empty mask (for skip_empty readers)
        sources.json        [{kind, path, lineidx, images, skipped}] — row ``source`` indexes it
        skipped.txt         every record left out, one reason per line

Why chunks: a chunk file is written atomically as soon as its task ends, and its name is a hash
of what it covers (paths, sizes, mtime_ns), so an interrupted build continues with the chunks
still missing, and a later build re-indexes only what changed (a new shard folder or tar, a file
whose size or mtime changed); chunks of removed sources are deleted. JSON folders are cut into
chunks at content-defined points (after names whose CRC32 is divisible by the chunk size), so a
file added to a folder re-indexes one chunk, not the rest of the folder. A new generation only
becomes visible when ``CURRENT`` is replaced (atomically), so readers never see half an index;
the previous generation is kept for readers that still have it open.
"""

import contextlib
import json
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import time
import zlib
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised
    fcntl = None

from ...io.sa1b import DatasetError
from ...utils.files import OutputError, atomic_write, ensure_writable_dir, remove_stale_temps
from .formats import (
    KIND_JSON,
    KIND_TAR,
    KIND_TSV,
    KINDS,
    ROW_DTYPE,
    Chunk,
    index_json_files,
    index_tar,
    index_tsv,
)

logger = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: the ``empty`` column (empty masks per image); older indexes are rebuilt
INDEX_FOLDER = ".unsam_index"
CURRENT = "CURRENT"  # not *.json: load_sa1b_dicts would take a root-level JSON for a record
CHUNK_FILES = 1000  # JSON files per chunk, on average
MAX_WARNINGS = 20  # skipped records named one by one in the log; all are in skipped.txt


def index_dir_for(root, cache_dir=None) -> Path:
    """Where the index of ``root`` is written: beside the data, or — data on a read-only mount —
    ``<cache_dir>/<root name>-<hash of its real path>`` (one folder serves many roots)."""
    root = Path(os.path.abspath(root))
    if cache_dir is None:
        return root / INDEX_FOLDER
    digest = sha1(os.path.realpath(root).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{root.name or 'root'}-{digest}"


def find_index(root, cache_dir=None) -> Optional[Path]:
    """The built index of ``root``: the ``cache_dir`` one if built, else the one beside the data."""
    candidates = [index_dir_for(root, cache_dir)] + (
        [index_dir_for(root)] if cache_dir is not None else []
    )
    return next((c for c in candidates if (c / CURRENT).is_file()), None)


def read_current(index_dir: Path) -> Dict:
    with open(index_dir / CURRENT) as f:
        return json.load(f)


@dataclass
class ChunkPlan:
    """One indexing task: ``kind``, ``source`` (folder or file, relative to the root), the JSON
    ``names`` of a folder chunk, the ``lineidx`` of a TSV, its ``id`` and input ``bytes``."""

    id: str
    kind: str
    source: str
    names: Tuple[str, ...] = ()
    lineidx: Optional[str] = None
    bytes: int = 0


@dataclass
class SourcePlan:
    kind: str
    path: str
    lineidx: Optional[str] = None
    chunks: List[ChunkPlan] = field(default_factory=list)


def _chunk_id(kind: str, source: str, signature: str) -> str:
    return sha1(f"{INDEX_VERSION}\0{kind}\0{source}\0{signature}".encode()).hexdigest()[:24]


def _sig(entry: os.DirEntry) -> Tuple[str, int, int]:
    st = entry.stat()
    return entry.name, st.st_size, st.st_mtime_ns


_DIGIT_RUNS = re.compile(r"(\d+)")
_SOURCE_FILES = (
    ".json",
    ".tar",
    ".tsv",
    ".lineidx",
)  # what plan_sources looks at (images are not sorted)


def natural_key(name: str):
    """Sort key that orders ``train-2`` before ``train-10`` (numbers by value)."""
    # split() with a group alternates text and digit runs: the odd parts are the numbers
    return [(0, int(t), "") if k % 2 else (1, 0, t) for k, t in enumerate(_DIGIT_RUNS.split(name))]


def plan_sources(root: str, chunk_files: int = CHUNK_FILES) -> List[SourcePlan]:
    """The sources of ``root`` (itself and its non-hidden sub-folders), in index order: per
    folder its JSON files (one source), then its tars, then its TSVs; folders and files in
    natural order (``shard_2`` before ``shard_10``, as the TSV converter numbers its shards)."""
    folders = [""] + sorted(
        (e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
        key=natural_key,
    )
    plans: List[SourcePlan] = []
    for folder in folders:
        # only the files a source is made of are sorted (not the images): a million-image folder
        # is checked for changes at every training start
        entries = sorted(
            (
                e
                for e in os.scandir(os.path.join(root, folder))
                if e.name.endswith(_SOURCE_FILES) and not e.name.startswith(".") and e.is_file()
            ),
            key=lambda e: natural_key(e.name),
        )
        by_name = {e.name: e for e in entries}
        jsons = [_sig(e) for e in entries if e.name.endswith(".json")]
        if jsons:
            plan = SourcePlan(KIND_JSON, folder)
            start = 0
            for i, (name, _, _) in enumerate(jsons):
                last = i == len(jsons) - 1
                if (
                    last
                    or zlib.crc32(name.encode()) % chunk_files == 0
                    or i + 1 - start >= 4 * chunk_files
                ):
                    part = jsons[start : i + 1]
                    signature = "\n".join(f"{n}\0{s}\0{m}" for n, s, m in part)
                    plan.chunks.append(
                        ChunkPlan(
                            _chunk_id(KIND_JSON, folder, signature),
                            KIND_JSON,
                            folder,
                            tuple(n for n, _, _ in part),
                            bytes=sum(s for _, s, _ in part),
                        )
                    )
                    start = i + 1
            plans.append(plan)
        for kind, ext in ((KIND_TAR, ".tar"), (KIND_TSV, ".tsv")):
            for e in entries:
                if not e.name.endswith(ext):
                    continue
                rel = os.path.join(folder, e.name)
                sigs = [_sig(e)]
                lineidx = None
                if kind == KIND_TSV and e.name[:-4] + ".lineidx" in by_name:
                    lineidx = os.path.join(folder, e.name[:-4] + ".lineidx")
                    sigs.append(_sig(by_name[e.name[:-4] + ".lineidx"]))
                signature = "\n".join(f"{n}\0{s}\0{m}" for n, s, m in sigs)
                plans.append(
                    SourcePlan(
                        kind,
                        rel,
                        lineidx,
                        [
                            ChunkPlan(
                                _chunk_id(kind, rel, signature),
                                kind,
                                rel,
                                lineidx=lineidx,
                                bytes=sigs[0][1],
                            )
                        ],
                    )
                )
    return plans


# ------------------------------------------------------------------------------------------ chunks
def _blob(strings: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Strings → (uint8 blob, (n + 1,) int64 offsets): one array each, no Python object per row."""
    encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


def _chunk_path(chunks_dir: Path, chunk_id: str, retry: bool = False) -> Path:
    return chunks_dir / (f"{chunk_id}.retry.npz" if retry else f"{chunk_id}.npz")


def _save_chunk(chunks_dir: Path, plan: ChunkPlan, chunk: Chunk, seconds: float) -> None:
    keys, keys_off = _blob(chunk.keys)
    images, images_off = _blob(chunk.images)
    meta = {
        "images": len(chunk.rows),
        "slow": chunk.slow,
        "seconds": seconds,
        "skipped": chunk.skipped,
    }
    with atomic_write(_chunk_path(chunks_dir, plan.id, chunk.retry), "wb") as f:
        np.savez(
            f,
            rows=chunk.row_array(),
            keys=keys,
            keys_off=keys_off,
            images=images,
            images_off=images_off,
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        )
    if not chunk.retry:  # a chunk that needed another try and now is complete
        _chunk_path(chunks_dir, plan.id, True).unlink(missing_ok=True)


def _load_meta(path: Path) -> Dict:
    with np.load(path) as z:
        return json.loads(z["meta"].tobytes())


def _run_task(args) -> Dict:
    """Index one chunk and save it (runs in a worker process); returns its small summary."""
    root, chunks_dir, plan = args
    start = time.perf_counter()
    try:
        if plan.kind == KIND_JSON:
            chunk = index_json_files(root, plan.source, list(plan.names))
        elif plan.kind == KIND_TAR:
            chunk = index_tar(root, plan.source)
        else:
            chunk = index_tsv(root, plan.source, plan.lineidx)
    except OSError as e:  # the whole source (a tar, a TSV) cannot be opened: try again next build
        chunk = Chunk()
        chunk.skipped.append(f"{os.path.join(root, plan.source)}: unreadable ({e.strerror or e})")
        chunk.retry = True
    seconds = time.perf_counter() - start
    _save_chunk(Path(chunks_dir), plan, chunk, seconds)
    return {"images": len(chunk.rows), "skipped": len(chunk.skipped), "seconds": seconds}


# ------------------------------------------------------------------------------------------- build
@dataclass
class BuildSummary:
    """What a build did; ``line()`` is the CLI's one-line report."""

    root: str
    index_dir: str
    images: int = 0
    sources: Dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    first_skipped: List[str] = field(default_factory=list)
    indexed: int = 0  # images in chunks indexed by this run (the rest came from kept chunks)
    chunks_indexed: int = 0
    chunks_kept: int = 0
    seconds: float = 0.0
    index_seconds: float = 0.0
    workers: int = 1
    slow: int = 0  # records whose header needed a full JSON parse
    labelled: int = 0  # images with at least one non-empty mask
    empty_masks: int = 0  # annotations without a pixel (dropped by the trainer)
    index_bytes: int = 0
    up_to_date: bool = False

    def line(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.sources.items() if n)
        n = sum(self.sources.values())
        text = (
            f"{self.root}: {self.images} images in {n} source{'s' * (n != 1)} ({kinds or 'none'}), "
            f"{self.skipped} skipped"
        )
        if self.first_skipped:
            text += (
                f" (first: {'; '.join(self.first_skipped)}; "
                f"all in {self.index_dir}/<generation>/skipped.txt)"
            )
        if self.up_to_date:
            text += f"; index up to date, {self.seconds:.2f} s"
        else:
            rate = self.indexed / self.index_seconds if self.index_seconds > 0 else 0.0
            text += (
                f"; indexed {self.indexed} images ({self.chunks_indexed} chunks, "
                f"{self.chunks_kept} kept) in {self.seconds:.2f} s, {rate:.0f} images/s with "
                f"{self.workers} workers"
            )
        return text + f"; index {self.index_dir} ({self.index_bytes / 1e6:.1f} MB)"


@contextlib.contextmanager
def _build_lock(index_dir: Path):
    """One builder per index folder at a time (``flock`` on ``index_dir/LOCK``).

    Two processes building one root at once (two jobs started on the same data, the ablation's
    parallel runs) deleted each other's temporary chunk files as stale and each other's fresh
    generation as old; the second builder now waits and then finds the index up to date."""
    if fcntl is None:
        yield
        return
    with open(index_dir / "LOCK", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building the index in %s", index_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def default_workers() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def build_index(
    root,
    cache_dir=None,
    workers: Optional[int] = None,
    rebuild: bool = False,
    progress: bool = True,
    chunk_files: int = CHUNK_FILES,
) -> BuildSummary:
    """Build or update the index of ``root`` (see the module doc); returns a :class:`BuildSummary`.

    Raises :class:`DatasetError` when ``root`` is not a folder and
    :class:`unsam.utils.files.OutputError` when the index folder cannot be written. A root with
    no usable record gets an empty index (the summary says 0 images; opening it raises).
    """
    start = time.perf_counter()
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root '{root}' is not a folder")
    index_dir = index_dir_for(root, cache_dir)
    try:
        ensure_writable_dir(index_dir)
    except OutputError as e:
        hint = (
            ""
            if cache_dir is not None
            else " (data on a read-only mount? pass a cache folder: --cache-dir)"
        )
        raise OutputError(f"cannot write the index of '{root}': {e}{hint}") from None
    with _build_lock(index_dir):
        return _build_locked(root, index_dir, workers, rebuild, progress, chunk_files, start)


@dataclass
class _Build:
    """One locked build's shared state: where (the root, its index folder and chunks folder) and
    what (the root's sources, all their chunks, those without a chunk file yet, and the hash of
    all chunk ids that ``CURRENT`` records)."""

    root: str
    index_dir: Path
    chunks_dir: Path
    plans: List[SourcePlan]
    chunks: List[ChunkPlan]
    todo: List[ChunkPlan]
    all_ids: str


def _prepare_chunks_dir(index_dir: Path, rebuild: bool) -> Path:
    """Takes the (locked) index folder; returns its chunks folder, created if missing, with the
    temporaries of interrupted writes removed (and, on ``rebuild``, every chunk file)."""
    chunks_dir = index_dir / "chunks"
    chunks_dir.mkdir(exist_ok=True)
    remove_stale_temps(chunks_dir, lambda name: name.endswith(".npz"))
    remove_stale_temps(index_dir, lambda name: name == CURRENT)
    if rebuild:
        for f in chunks_dir.glob("*.npz"):
            f.unlink()
    return chunks_dir


def _plan_build(root: str, index_dir: Path, chunks_dir: Path, chunk_files: int) -> _Build:
    """Takes the root and its folders; returns the :class:`_Build` of its sources
    (:func:`plan_sources`), the chunks among them still to index, and the chunk-id hash."""
    plans = plan_sources(root, chunk_files)
    chunk_plans = [c for p in plans for c in p.chunks]
    todo = [c for c in chunk_plans if not _chunk_path(chunks_dir, c.id).is_file()]
    all_ids = sha1("\n".join(c.id for c in chunk_plans).encode()).hexdigest()
    return _Build(root, index_dir, chunks_dir, plans, chunk_plans, todo, all_ids)


def _up_to_date(build: _Build) -> Optional[Dict]:
    """Takes the planned build; returns the ``CURRENT`` record when nothing is to index and it
    describes exactly these chunks (same index version, its generation still there), else None.
    ``CURRENT`` is read whenever it exists."""
    index_dir = build.index_dir
    current = read_current(index_dir) if (index_dir / CURRENT).is_file() else None
    if (
        not build.todo
        and current
        and current.get("chunks") == build.all_ids
        and current.get("version") == INDEX_VERSION
        and (index_dir / current["generation"]).is_dir()
    ):
        return current
    return None


def _index_chunks(build: _Build, workers: int, progress: bool, summary: BuildSummary) -> None:
    """Takes the planned build; indexes its ``todo`` chunks (the biggest first, in a process pool
    when there are several workers and chunks), each saved as it ends (:func:`_run_task`), and
    adds the images indexed and the time taken to ``summary``."""
    root, todo = build.root, build.todo
    index_start = time.perf_counter()
    todo.sort(key=lambda c: -c.bytes)  # the biggest first: workers finish together
    tasks = [(root, str(build.chunks_dir), c) for c in todo]
    with tqdm(
        total=len(todo),
        unit="chunk",
        desc=f"index {os.path.basename(root)}",
        disable=not progress or not todo,
        dynamic_ncols=True,
    ) as bar:

        def done(result):
            summary.indexed += result["images"]
            bar.update(1)
            bar.set_postfix(images=summary.indexed, refresh=False)

        if workers == 1 or len(todo) <= 1:
            for task in tasks:
                done(_run_task(task))
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with context.Pool(min(workers, len(todo))) as pool:
                for result in pool.imap_unordered(_run_task, tasks):
                    done(result)
    summary.index_seconds = time.perf_counter() - index_start


def _publish(build: _Build, summary: BuildSummary) -> None:
    """Takes the build once every chunk is indexed; merges the chunks into a new generation
    (:func:`_merge`, which fills ``summary``), makes it current by replacing ``CURRENT``
    atomically, then deletes chunks and generations no longer needed (:func:`_clean`; the
    previous generation is kept)."""
    index_dir = build.index_dir
    generation = _merge(build.root, index_dir, build.chunks_dir, build.plans, summary)
    current = {
        "version": INDEX_VERSION,
        "generation": generation,
        "root": build.root,
        "images": summary.images,
        "labelled": summary.labelled,
        "empty_masks": summary.empty_masks,
        "kinds": summary.sources,
        "skipped": summary.skipped,
        "first_skipped": summary.first_skipped,
        "chunks": build.all_ids,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    previous = read_current(index_dir)["generation"] if (index_dir / CURRENT).is_file() else None
    with atomic_write(index_dir / CURRENT) as f:
        json.dump(current, f, indent=1)
    _clean(index_dir, build.chunks_dir, {c.id for c in build.chunks}, keep={generation, previous})


def _build_locked(
    root: str,
    index_dir: Path,
    workers: Optional[int],
    rebuild: bool,
    progress: bool,
    chunk_files: int,
    start: float,
) -> BuildSummary:
    """:func:`build_index` once this process holds the folder's build lock.

    Stages: :func:`_prepare_chunks_dir`, :func:`_plan_build`, :func:`_up_to_date` (then the
    summary comes from ``CURRENT`` and nothing is written), else :func:`_index_chunks` and
    :func:`_publish`."""
    chunks_dir = _prepare_chunks_dir(index_dir, rebuild)
    workers = max(1, workers or default_workers())
    summary = BuildSummary(root=root, index_dir=str(index_dir), workers=workers)

    build = _plan_build(root, index_dir, chunks_dir, chunk_files)
    summary.chunks_kept = len(build.chunks) - len(build.todo)
    summary.chunks_indexed = len(build.todo)
    current = _up_to_date(build)
    if current is not None:
        summary.__dict__.update(
            images=current["images"],
            sources=current["kinds"],
            skipped=current["skipped"],
            labelled=current["labelled"],
            empty_masks=current["empty_masks"],
            first_skipped=current["first_skipped"],
            up_to_date=True,
            seconds=time.perf_counter() - start,
            index_bytes=_folder_bytes(index_dir),
        )
        logger.info("%s", summary.line())
        return summary

    logger.info(
        "indexing %s: %d sources, %d chunks to index, %d kept (%s)",
        root,
        len(build.plans),
        len(build.todo),
        summary.chunks_kept,
        index_dir,
    )
    _index_chunks(build, workers, progress, summary)
    _publish(build, summary)
    summary.seconds = time.perf_counter() - start
    summary.index_bytes = _folder_bytes(index_dir)
    logger.info("%s", summary.line())
    return summary


def _merge(
    root: str, index_dir: Path, chunks_dir: Path, plans: List[SourcePlan], summary: BuildSummary
) -> str:
    """Concatenate the chunks of ``plans`` into a new generation folder; returns its name.
    Rows are streamed into a memory-mapped ``rows.npy`` (constant memory at any size)."""
    generation = f"index-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    out = index_dir / generation
    out.mkdir()
    paths = {c.id: _chunk_path(chunks_dir, c.id) for p in plans for c in p.chunks}
    paths = {i: p if p.is_file() else _chunk_path(chunks_dir, i, True) for i, p in paths.items()}
    metas = {i: _load_meta(p) for i, p in paths.items()}
    total = sum(m["images"] for m in metas.values())
    rows = np.lib.format.open_memmap(out / "rows.npy", mode="w+", dtype=ROW_DTYPE, shape=(total,))
    keys_off = np.lib.format.open_memmap(
        out / "keys_off.npy", mode="w+", dtype=np.int64, shape=(total + 1,)
    )
    images_off = np.lib.format.open_memmap(
        out / "images_off.npy", mode="w+", dtype=np.int64, shape=(total + 1,)
    )
    keys_off[0] = images_off[0] = 0
    sources, skipped = [], []
    kinds = {k: 0 for k in KINDS}
    n = 0
    with open(out / "keys.bin", "wb") as keys_file, open(out / "images.bin", "wb") as images_file:
        for s, plan in enumerate(plans):
            count = skip = 0
            for c in plan.chunks:
                with np.load(paths[c.id]) as z:
                    part = z["rows"]
                    m = len(part)
                    part["source"] = s
                    rows[n : n + m] = part
                    keys_off[n + 1 : n + m + 1] = z["keys_off"][1:] + keys_off[n]
                    images_off[n + 1 : n + m + 1] = z["images_off"][1:] + images_off[n]
                    keys_file.write(z["keys"].tobytes())
                    images_file.write(z["images"].tobytes())
                n += m
                count += m
                summary.slow += metas[c.id]["slow"]
                skip += len(metas[c.id]["skipped"])
                skipped.extend(metas[c.id]["skipped"])
            kinds[plan.kind] += 1
            sources.append(
                {
                    "kind": plan.kind,
                    "path": plan.path,
                    "lineidx": plan.lineidx,
                    "images": count,
                    "skipped": skip,
                }
            )
    nonempty = np.flatnonzero(rows["masks"] > rows["empty"]).astype(np.int64)
    np.save(out / "nonempty.npy", nonempty)
    summary.labelled, summary.empty_masks = len(nonempty), int(rows["empty"].sum(dtype=np.int64))
    rows.flush()
    keys_off.flush()
    images_off.flush()
    del rows, keys_off, images_off
    with open(out / "sources.json", "w") as f:
        json.dump(sources, f)
    with open(out / "skipped.txt", "w") as f:
        f.writelines(s.replace("\n", " ") + "\n" for s in skipped)
    for message in skipped[:MAX_WARNINGS]:
        logger.warning("not indexed: %s", message)
    if len(skipped) > MAX_WARNINGS:
        logger.warning(
            "... and %d more not indexed (all in %s)",
            len(skipped) - MAX_WARNINGS,
            out / "skipped.txt",
        )
    summary.images, summary.sources, summary.skipped = total, kinds, len(skipped)
    summary.first_skipped = skipped[:2]
    return generation


def _clean(index_dir: Path, chunks_dir: Path, chunk_ids, keep) -> None:
    """Delete chunks of sources that are gone or changed, and generations no reader should need."""
    for f in chunks_dir.glob("*.npz"):
        if f.name.split(".")[0] not in chunk_ids:
            f.unlink(missing_ok=True)
    for d in index_dir.glob("index-*"):
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
