"""The batch runner behind ``python -m unsam.pseudo``: images in, one SA-1B JSON per image out.

Two recipes share it (:func:`run`: sharding, resume, ``failed.txt``, workers), chosen by
``EngineConfig.recipe`` (:mod:`unsam.pseudo.config`, the one declaration of every setting):
``classical`` (:class:`unsam.pseudo.classical.PseudoLabeler`, the offline default: features →
divide → conquer → refine → JSON) and ``unsam``, the published UnSAM recipe
(:class:`unsam.pseudo.recipe.UnsamLabeler`: CutLER detector divide, DINO keys on each region's
256-px crop, :func:`unsam.pseudo.conquer.iterative_merge`, NMS).

Output layout: ``<output>/<stem>.json`` (SA-1B format, written atomically), where ``<stem>`` is
the image file name without extension. The ``image.file_name`` field holds the **absolute path**
of the source image (images are not copied; the SA-1B reader accepts absolute paths).
``image_id`` is the image's index in the sorted input list, so it does not depend on sharding.
``failed.txt`` lists images that could not be processed (path, tab, reason); ``--visualize``
writes ``<output>/vis/<stem>.jpg`` overlays. Runs are deterministic: the labelers draw no
random numbers except the random Fourier features, whose generators are seeded with
``EngineConfig.seed``; each labeler runs on one torch thread (see :func:`run`).
"""
import contextlib
import glob
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from ..utils.files import atomic_write, ensure_writable_dir, remove_stale_temps
from ..utils.images import read_rgb
from ..utils.threads import torch_threads
from .classical import PseudoLabeler
from .config import EngineConfig

__all__ = ["EngineConfig", "PseudoLabeler", "RunSummary", "build_labeler", "list_images", "read_image",
           "run", "select"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABELER_THREADS = 1  # torch threads per labeler (see :func:`run`)


def read_image(path) -> np.ndarray:
    """Read an image as H×W×3 uint8 RGB, EXIF orientation applied, 16-bit scaled (not clipped)."""
    return read_rgb(path)


# ------------------------------------------------------------------------------- batch runner
def list_images(spec: str) -> List[Path]:
    """``spec``: a folder (non-recursive, image extensions) or a glob pattern → sorted paths."""
    p = Path(spec)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    else:
        files = [Path(f) for f in glob.glob(spec, recursive=True)
                 if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not files and not any(ch in spec for ch in "*?["):
            raise FileNotFoundError(f"input not found: {spec}")
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in/matching '{spec}'")
    files = sorted({f.resolve() for f in files})
    stems: Dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"two input images share the output name '{f.stem}.json': "
                             f"{stems[f.stem]} and {f}")
        stems[f.stem] = f
    return files


def select(files: Sequence[Path], start_id: int = 0, end_id: Optional[int] = None,
           shard: Tuple[int, int] = (0, 1)) -> List[Tuple[int, Path]]:
    """(image_id, path) pairs for ``files[start_id:end_id]`` that fall in shard ``i`` of ``n``."""
    i, n = shard
    if not (0 <= i < n):
        raise ValueError(f"bad shard {i}/{n}: need 0 <= i < n")
    end = len(files) if end_id is None else min(end_id, len(files))
    return [(k, files[k]) for k in range(max(0, start_id), end) if k % n == i]


def draw_overlay(image: np.ndarray, anns: List[Dict], max_masks: int = 50) -> np.ndarray:
    """The top ``max_masks`` masks blended with the photo and outlined (:func:`unsam.visualize.draw_masks`)."""
    from ..data.sa1b import rle_to_mask
    from ..visualize import draw_masks

    masks = [rle_to_mask(a["segmentation"]) for a in anns[:max_masks]]
    return draw_masks(image, np.array(masks, dtype=bool).reshape(-1, *image.shape[:2]))


def build_labeler(cfg: EngineConfig):
    """The per-image labeler of ``cfg.recipe``: ``__call__(image H×W×3 uint8 RGB) -> annotations``."""
    if cfg.recipe == "classical":
        return PseudoLabeler(cfg)
    if cfg.recipe == "unsam":
        from .recipe import UnsamLabeler

        return UnsamLabeler(cfg)
    raise ValueError(f"unknown recipe '{cfg.recipe}' (classical | unsam)")


@dataclass(frozen=True)
class _Task:
    image_id: int
    path: str
    out_dir: str
    visualize: bool


def _label(task: _Task, labeler) -> Tuple[int, str, Optional[str], int]:
    """Label one image and write its JSON (and overlay). Returns (image_id, path, error or
    None, n_masks)."""
    from ..data.sa1b import write_sa1b_json

    try:
        image = read_image(task.path)
    except Exception as e:  # unreadable / truncated / not an image
        return task.image_id, task.path, f"unreadable image: {e}", 0
    try:
        anns = labeler(image)
        h, w = image.shape[:2]
        info = {"image_id": int(task.image_id), "width": int(w), "height": int(h),
                "file_name": str(Path(task.path).resolve())}
        stem = Path(task.path).stem
        if task.visualize:
            vis_dir = Path(task.out_dir) / "vis"
            vis_dir.mkdir(parents=True, exist_ok=True)
            ov = draw_overlay(image, anns)
            cv2.imwrite(str(vis_dir / f"{stem}.jpg"), cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        write_sa1b_json(Path(task.out_dir) / f"{stem}.json", info, anns)
        return task.image_id, task.path, None, len(anns)
    except Exception as e:
        logger.debug("failure on %s:\n%s", task.path, traceback.format_exc())
        return task.image_id, task.path, f"{type(e).__name__}: {e}", 0


# thread-pool sizes that numeric libraries read once, when they are loaded: a worker process
# starts its libraries with one thread each. single_threaded() already caps the threads a
# labeler uses, but pools sized for the whole machine still cost: on 2 cores, 2 workers took
# 50–55 s for 20 photos with the inherited settings and 43–48 s with these (4 runs each, a
# noisy VM; outputs identical)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def _worker_environment():
    """``WORKER_ENV`` in ``os.environ`` while worker processes are spawned (they copy it)."""
    before = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the labeler of a worker process (set once by the pool's initializer)
_WORKER: Dict = {}


def _init_worker(cfg: EngineConfig) -> None:
    torch.set_num_threads(LABELER_THREADS)  # a worker process of our own: nothing to restore
    _WORKER["labeler"] = build_labeler(cfg)


def _label_in_worker(task: _Task):
    return _label(task, _WORKER["labeler"])


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    masks: int = 0
    seconds: float = 0.0
    failures: List[Tuple[str, str]] = field(default_factory=list)


def run(input_spec: str, output_dir: str, cfg: EngineConfig, shard=(0, 1), start_id: int = 0,
        end_id: Optional[int] = None, workers: int = 1, visualize: bool = False,
        progress: bool = True, labeler=None) -> RunSummary:
    """Label every selected image that has no output yet. Returns a :class:`RunSummary`.

    ``labeler``: an already built labeler for ``cfg`` (used when ``workers`` ≤ 1, so a caller
    that built one to check its weights does not build it twice). Every labeler runs on
    ``LABELER_THREADS`` torch thread: outputs do not depend on the machine's core count or on
    ``workers``, and ``workers`` processes do not oversubscribe the cores; with ``workers`` ≤ 1
    the caller's thread setting is restored afterwards."""
    files = list_images(input_spec)
    out = ensure_writable_dir(output_dir)  # before any image is labelled
    tasks = select(files, start_id, end_id, shard)
    summary = RunSummary(total=len(tasks))
    todo = []
    for image_id, path in tasks:
        if (out / f"{path.stem}.json").exists():
            summary.skipped += 1  # finished earlier (files are written atomically)
        else:
            todo.append(_Task(image_id, str(path), str(out), visualize))
    logger.info("%d images selected, %d already done, %d to label", len(tasks), summary.skipped, len(todo))
    # half-written files of a killed run; only this run's names, other shards may be writing
    stale = remove_stale_temps(out, {f"{Path(t.path).stem}.json" for t in todo}.__contains__)
    if stale:
        logger.info("removed %d temporary files of interrupted writes", stale)
    t0 = time.time()
    _label_all(todo, cfg, workers, labeler, summary, progress)
    summary.seconds = time.time() - t0
    failed_path = out / "failed.txt"
    if summary.failures:
        with atomic_write(failed_path) as f:
            f.write("".join(f"{p}\t{e}\n" for p, e in summary.failures))
    elif failed_path.exists() and summary.done:
        failed_path.unlink()  # earlier failures were retried successfully
    return summary


def _label_all(todo: List[_Task], cfg: EngineConfig, workers: int, labeler, summary: RunSummary,
               progress: bool) -> None:
    """Label ``todo`` in this process (``workers`` ≤ 1) or a pool of ``workers`` processes,
    counting the outcomes in ``summary``."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="pseudo-labels")
    pool = None
    try:
        with contextlib.ExitStack() as scope:
            if workers <= 1:
                scope.enter_context(torch_threads(LABELER_THREADS))
                labeler = labeler if labeler is not None else build_labeler(cfg)
                results = (_label(t, labeler) for t in todo)
            else:
                import multiprocessing as mp

                with _worker_environment():
                    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(cfg,))
                results = pool.imap(_label_in_worker, todo, chunksize=1)
            for _, path, err, n in results:
                if err is None:
                    summary.done += 1
                    summary.masks += n
                else:
                    summary.failed += 1
                    summary.failures.append((path, err))
                    logger.warning("skipping %s: %s", path, err)
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
