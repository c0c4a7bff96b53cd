"""The batch runner behind ``python -m unsam.pseudo``: images in, one SA-1B JSON per image out.

Every recipe (:mod:`unsam.pseudo.labelers`: ``classical``, the offline default, and ``unsam``,
the published UnSAM recipe) shares it: :func:`run` takes a recipe's settings, builds its
labeler and does the sharding, resume, ``failed.txt`` and worker processes. The runner itself
(:func:`run_tasks`, :func:`record_settings`) takes any labeler: ``python -m unsam.selftrain``
labels images with a trained model through it.

Output layout: ``<output>/<stem>.json`` (SA-1B format, written atomically), where ``<stem>`` is
the image file name without extension. The ``image.file_name`` field holds the **absolute path**
of the source image as the user named it (images are not copied; the SA-1B reader accepts
absolute paths): a symbolic link is labelled under its own name and path, not its target's.
``image_id`` is the image's index in the sorted input list, so it does not depend on sharding.
``failed.txt`` (``failed.shard-<i>-of-<n>.txt`` for ``--shard i/n``, so shards sharing a folder
never overwrite each other's) lists images that could not be processed (path, tab, reason); a
run rewrites only the lines of its own images (see :func:`update_failures`). ``--visualize``
writes ``<output>/vis/<stem>.jpg`` overlays. ``pseudo_settings.txt`` records the settings that
decide the labels (:func:`check_settings`): a rerun into the folder with other settings is
refused instead of mixing two kinds of labels. A write that fails (full disk, quota, read-only
mount) stops the run (:class:`OutputWriteError`), and so do SIGTERM / SIGINT (:class:`Stopped`):
the workers are terminated first, so nothing is written after the run returns. Runs are
deterministic: the built-in labelers draw no random numbers except the random Fourier features,
whose generators are seeded with the ``seed`` setting; each labeler runs on one torch thread
(see :func:`run`).
"""

import contextlib
import errno
import functools
import glob
import json
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from ..utils.files import (
    atomic_write,
    by_stem,
    create_once,
    ensure_writable_dir,
    remove_stale_temps,
)
from ..utils.images import IMAGE_EXTENSIONS, read_rgb
from ..utils.threads import torch_threads
from .config import SettingError, settings_differences
from .labelers import recipe_of

__all__ = [
    "OutputWriteError",
    "RunSummary",
    "SettingsMismatch",
    "Stopped",
    "Task",
    "check_run_options",
    "check_settings",
    "failures_file",
    "list_images",
    "read_image",
    "record_settings",
    "run",
    "run_tasks",
    "select",
    "update_failures",
]

logger = logging.getLogger(__name__)

LABELER_THREADS = 1  # torch threads per labeler (see :func:`run`)
SETTINGS_FILE = (
    "pseudo_settings.txt"  # not *.json: the dataset readers take every *.json for a label
)


class OutputWriteError(Exception):
    """An output file could not be written (full disk, quota, read-only mount): every later
    image would fail the same way, so the run stops. The message is one line naming the file
    and the reason. Not an OSError, so no per-image handler mistakes it for a bad image."""


class SettingsMismatch(ValueError):
    """The output folder holds labels made with other settings; the message names them."""


class Stopped(BaseException):
    """SIGTERM / SIGINT during :func:`run`. A BaseException, like KeyboardInterrupt, so the
    per-image ``except Exception`` does not take it for one bad image. ``summary``: the run so
    far (set by :func:`run`)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.summary: Optional["RunSummary"] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def message(self) -> str:
        """The line a command prints when it stops: what was done and that a rerun resumes."""
        done = self.summary.done if self.summary else 0
        return (
            f"stopped by {self.name} after labelling {done} images; run the same command again "
            f"to resume (finished images are skipped)"
        )

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


def _write_error(path, e: OSError) -> OutputWriteError:
    code = errno.errorcode.get(e.errno or 0)
    reason = f"{e.strerror or e}" + (f" ({code})" if code else "")
    return OutputWriteError(
        f"cannot write '{path}': {reason}; finished images are kept, a rerun resumes"
    )


@contextlib.contextmanager
def _writing(path):
    """Turn an OSError while writing ``path`` into :class:`OutputWriteError`."""
    try:
        yield
    except OSError as e:
        raise _write_error(path, e) from None


def read_image(path) -> np.ndarray:
    """Read an image as H×W×3 uint8 RGB, EXIF orientation applied, 16-bit scaled (not clipped)."""
    return read_rgb(path)


# ------------------------------------------------------------------------------- batch runner
def list_images(spec: str) -> List[Path]:
    """``spec``: a folder (non-recursive, image extensions) or a glob pattern → sorted absolute
    paths (symbolic links not resolved)."""
    p = Path(spec)
    if p.is_dir():
        # a dangling link is kept: it is then listed as a failure, not silently left out
        files = [
            f
            for f in p.iterdir()
            if f.suffix.lower() in IMAGE_EXTENSIONS and (f.is_file() or f.is_symlink())
        ]
    else:
        files = [
            Path(f)
            for f in glob.glob(spec, recursive=True)
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not files and not any(ch in spec for ch in "*?["):
            raise FileNotFoundError(f"input not found: {spec}")
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in/matching '{spec}'")
    # absolute but not resolved: an image is named by the path the user gave, a symbolic link
    # by its own name, not its target's (which may be a content hash in a store)
    files = sorted({f.absolute() for f in files})
    by_stem(
        files,
        lambda stem, first, second: ValueError(
            f"two input images share the output name '{stem}.json': {first} and {second}"
        ),
    )
    return files


def select(
    files: Sequence[Path],
    start_id: int = 0,
    end_id: Optional[int] = None,
    shard: Tuple[int, int] = (0, 1),
) -> List[Tuple[int, Path]]:
    """(image_id, path) pairs for ``files[start_id:end_id]`` that fall in shard ``i`` of ``n``."""
    i, n = shard
    if not (0 <= i < n):
        raise ValueError(f"bad shard {i}/{n}: need 0 <= i < n")
    end = len(files) if end_id is None else min(end_id, len(files))
    return [(k, files[k]) for k in range(max(0, start_id), end) if k % n == i]


def draw_overlay(image: np.ndarray, anns: List[Dict], max_masks: int = 50) -> np.ndarray:
    """The top ``max_masks`` masks blended with the photo and outlined
    (:func:`unsam.visualize.draw_masks`)."""
    from ..io.sa1b import rle_to_mask
    from ..visualize import draw_masks

    masks = [rle_to_mask(a["segmentation"]) for a in anns[:max_masks]]
    return draw_masks(image, np.array(masks, dtype=bool).reshape(-1, *image.shape[:2]))


@dataclass(frozen=True)
class Task:
    """One image of a run: its ``image_id``, ``path`` (recorded as ``image.file_name``), the
    output folder, and ``name``, the output's file stem (default: the image's stem)."""

    image_id: int
    path: str
    out_dir: str
    visualize: bool = False
    name: str = ""

    @property
    def stem(self) -> str:
        return self.name or Path(self.path).stem


def _label(task: Task, labeler) -> Tuple[int, str, Optional[str], int]:
    """Label one image and write its JSON (and overlay). Returns (image_id, path, error or
    None, n_masks).

    ``labeler(image)`` gives the annotations; a labeler that needs to know which image it
    labels (``unsam.selftrain`` merges each image's labels of the previous round) has a method
    ``label_task(image, task)`` instead, which is called when present."""
    from ..io.sa1b import write_sa1b_json

    try:
        image = read_image(task.path)
    except Exception as e:  # unreadable / truncated / not an image
        return task.image_id, task.path, f"unreadable image: {e}", 0
    try:
        label_task = getattr(labeler, "label_task", None)
        anns = label_task(image, task) if label_task is not None else labeler(image)
        h, w = image.shape[:2]
        info = {
            "image_id": int(task.image_id),
            "width": int(w),
            "height": int(h),
            "file_name": task.path,
        }  # absolute, as the user named it (list_images)
        stem = task.stem
        if task.visualize:
            _write_overlay(Path(task.out_dir) / "vis" / f"{stem}.jpg", image, anns)
        target = Path(task.out_dir) / f"{stem}.json"
        with _writing(target):
            write_sa1b_json(target, info, anns)
        return task.image_id, task.path, None, len(anns)
    except OutputWriteError:
        raise  # the output, not this image: stop the run
    except Exception as e:
        logger.debug("failure on %s:\n%s", task.path, traceback.format_exc())
        return task.image_id, task.path, f"{type(e).__name__}: {e}", 0


def _write_overlay(path: Path, image: np.ndarray, anns: List[Dict]) -> None:
    """The overlay as a JPEG, written atomically (``cv2.imwrite`` would fail silently)."""
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(draw_overlay(image, anns), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("overlay could not be encoded")
    with _writing(path), atomic_write(path, "wb") as f:
        f.write(jpeg.tobytes())


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


def _init_worker(make_labeler: Callable) -> None:
    torch.set_num_threads(LABELER_THREADS)  # a worker process of our own: nothing to restore
    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates the
    # pool), so the workers do not die each with its own KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["labeler"] = make_labeler()


def _label_in_worker(task: Task):
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
    failures_file: Optional[Path] = None  # where this run's and earlier runs' failures are listed
    earlier_failures: int = 0  # lines of earlier runs still listed there

    def line(self) -> str:
        """The summary line a command prints at the end of a run."""
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.done} labelled, {self.skipped} already done, {self.failed} failed "
            f"({self.masks} masks, {self.seconds:.1f} s, {rate:.2f} img/s)"
            + (f"; failures listed in {self.failures_file}" if self.failed else "")
        )

    @property
    def exit_status(self) -> int:
        """1 when the run labelled nothing because every image it tried failed, else 0."""
        return 1 if self.failed and not self.done and not self.skipped else 0


def check_run_options(
    shard=(0, 1), start_id: int = 0, end_id: Optional[int] = None, workers: int = 1
) -> None:
    """:class:`SettingError` for run options that select nothing meaningful (checked before
    any image is read or weights are loaded)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise SettingError(f"--shard {i}/{n}: need 0 <= i < n")
    if workers < 1:
        raise SettingError(f"--workers {workers}: must be >= 1")
    if start_id < 0:
        raise SettingError(f"--start-id {start_id}: must be >= 0")
    if end_id is not None and end_id <= start_id:
        raise SettingError(f"--end-id {end_id}: must be greater than --start-id {start_id}")


def run(
    input_spec: str,
    output_dir: str,
    settings,
    shard=(0, 1),
    start_id: int = 0,
    end_id: Optional[int] = None,
    workers: int = 1,
    visualize: bool = False,
    progress: bool = True,
    labeler=None,
) -> RunSummary:
    """Label every selected image that has no output yet with the recipe whose settings
    ``settings`` are (:func:`unsam.pseudo.labelers.recipe_of`). Returns a :class:`RunSummary`.

    ``labeler``: an already built labeler for ``settings`` (used when ``workers`` ≤ 1, so a
    caller that built one to check its weights does not build it twice). Every labeler runs on
    ``LABELER_THREADS`` torch thread: outputs do not depend on the machine's core count or on
    ``workers``, and ``workers`` processes do not oversubscribe the cores; with ``workers`` ≤ 1
    the caller's thread setting is restored afterwards.

    Raises :class:`SettingsMismatch` (the folder holds labels of other settings),
    :class:`OutputWriteError` (a write failed: the run stopped) and :class:`Stopped` (SIGTERM /
    SIGINT, main thread only): in the last two cases the workers are gone and the failures so
    far are listed before it returns."""
    check_run_options(shard, start_id, end_id, workers)
    files = list_images(input_spec)
    out = ensure_writable_dir(output_dir)  # before any image is labelled
    if visualize:
        ensure_writable_dir(out / "vis")
    recipe = recipe_of(settings)
    check_settings(out, settings)
    tasks = [
        Task(image_id, str(path), str(out), visualize)
        for image_id, path in select(files, start_id, end_id, shard)
    ]
    # the recipe's labeler itself, not a registry lookup: a worker process has only the
    # recipes registered on import
    return run_tasks(
        tasks,
        out,
        functools.partial(recipe.labeler, settings),
        shard=shard,
        workers=workers,
        progress=progress,
        labeler=labeler,
    )


def run_tasks(
    tasks: Sequence[Task],
    out: Path,
    make_labeler: Callable,
    shard=(0, 1),
    workers: int = 1,
    progress: bool = True,
    labeler=None,
    failures: Sequence[Tuple[str, str]] = (),
    desc: str = "pseudo-labels",
) -> RunSummary:
    """The runner behind :func:`run`, for any label maker: label every task whose output
    ``<out>/<task.stem>.json`` does not exist yet, and list the failures in
    :func:`failures_file` ``(out, shard)`` (see :func:`update_failures`).

    ``make_labeler()``: builds a labeler (see :func:`_label`); picklable, as worker processes
    call it. ``labeler``: one already built, used when ``workers`` ≤ 1. ``failures``: (path,
    reason) of selected inputs the caller could not even make a task of (counted as failed and
    listed with the rest). ``desc``: the progress bar's name. ``out`` must exist and hold the
    caller's settings record already. Raises as :func:`run`."""
    summary = RunSummary(total=len(tasks) + len(failures), failures_file=failures_file(out, shard))
    for path, err in failures:
        _count(summary, path, err, 0)
    todo = []
    for task in tasks:
        if (out / f"{task.stem}.json").exists():
            summary.skipped += 1  # finished earlier (files are written atomically)
        else:
            todo.append(task)
    logger.info(
        "%d images selected, %d already done, %d to label",
        summary.total,
        summary.skipped,
        len(todo),
    )
    # half-written files of a killed run; only this run's names, other shards may be writing
    ours = {f"{t.stem}.json" for t in todo}.__contains__
    stale = remove_stale_temps(out, ours)
    if stale:
        logger.info("removed %d temporary files of interrupted writes", stale)
    selected = {t.path for t in tasks} | {path for path, _ in failures}
    t0 = time.time()
    with _stop_on_signals():
        try:
            _label_all(todo, make_labeler, workers, labeler, summary, progress, desc)
        except BaseException as stop:
            summary.seconds = time.time() - t0
            remove_stale_temps(out, ours)  # a terminated worker's unfinished write
            with contextlib.suppress(OSError):  # best effort: the disk may be full
                summary.earlier_failures = update_failures(
                    summary.failures_file, out, selected, summary.failures
                )
            if isinstance(stop, Stopped):
                stop.summary = summary
            raise
        summary.seconds = time.time() - t0
        with _writing(summary.failures_file):
            summary.earlier_failures = update_failures(
                summary.failures_file, out, selected, summary.failures
            )
    return summary


def failures_file(out: Path, shard=(0, 1)) -> Path:
    """Where a run lists its failures: ``failed.txt``, or one file per shard, so that shards
    sharing a folder (at the same time or one after the other) never overwrite each other's."""
    i, n = shard
    return out / ("failed.txt" if n == 1 else f"failed.shard-{i}-of-{n}.txt")


def update_failures(path: Path, out: Path, selected, failures: List[Tuple[str, str]]) -> int:
    """Rewrite the failure list ``path``: this run's ``failures`` (path, reason) replace the
    lines of the same images, lines of images of this run's ``selected`` paths that now have a
    label are dropped (retried successfully), every other line is kept (other images, or not
    reached by an interrupted run). The file is removed when no line is left. Returns how many
    lines of earlier runs were kept."""
    new = {p for p, _ in failures}
    kept = [
        line for line in _lines(path) if not _settled(line.split("\t", 1)[0], new, selected, out)
    ]
    # one line per image: a reason that spans lines is joined
    lines = kept + [f"{p}\t{' '.join(str(e).split())}" for p, e in failures]
    if lines:
        with atomic_write(path) as f:
            f.write("".join(line + "\n" for line in lines))
    elif path.exists():
        path.unlink()  # every listed failure was retried successfully
    return len(kept)


def _lines(path: Path) -> List[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _settled(image: str, new, selected, out: Path) -> bool:
    """Whether the failure line of ``image`` is superseded: failed again in this run, or an
    image of this run that has a label now."""
    return image in new or (image in selected and (out / f"{Path(image).stem}.json").exists())


def check_settings(out: Path, settings) -> None:
    """Record a recipe's ``settings`` (:meth:`unsam.pseudo.labelers.Recipe.record`) in ``out``,
    or check them against the record there (:func:`record_settings`, file
    ``pseudo_settings.txt``)."""
    differences = functools.partial(settings_differences, settings=type(settings))
    record_settings(out, SETTINGS_FILE, recipe_of(settings).record(settings), differences)


def record_settings(
    out: Path, name: str, current: Dict, differences: Callable[[Dict, Dict], List[str]]
) -> None:
    """Record the settings ``current`` (JSON-ready) in ``out/name``, or check them against the
    record there: finished images are skipped on a rerun, so a rerun with other settings would
    silently mix two kinds of labels in one folder — refused (:class:`SettingsMismatch`, naming
    ``differences(recorded, current)``: one ``--option OLD -> NEW`` each). A folder of labels
    from before the record existed gets one warning and this run's settings."""
    record = out / name
    if not record.exists():
        if any(not p.name.startswith(".") for p in out.glob("*.json")):
            logger.warning(
                "%s holds labels but no %s (made before settings were recorded): "
                "recording this run's settings; labels made with other settings "
                "cannot be told apart",
                out,
                name,
            )
        with _writing(record):
            if create_once(record, json.dumps(current, indent=1, sort_keys=True) + "\n"):
                return
    diffs = differences(_read_settings(record), current)
    if diffs:
        raise SettingsMismatch(
            f"output folder '{out}' holds labels made with other settings ({', '.join(diffs)}; "
            f"recorded in {record}): label into a new --output, or rerun with the recorded "
            f"settings to resume"
        )


def _read_settings(record: Path) -> Dict:
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise SettingsMismatch(
            f"{record}: not a settings record of this engine ({e}); label into a new --output"
        ) from None
    if not isinstance(recorded, dict):
        raise SettingsMismatch(
            f"{record}: not a settings record of this engine; label into a new --output"
        )
    return recorded


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGINT raise :class:`Stopped` (once; a repeat while stopping is ignored, so
    the workers' termination is not cut short). Only in the main thread, where Python delivers
    signals; the caller's handlers are restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _label_all(
    todo: List[Task],
    make_labeler: Callable,
    workers: int,
    labeler,
    summary: RunSummary,
    progress: bool,
    desc: str = "pseudo-labels",
) -> None:
    """Label ``todo`` in this process (``workers`` ≤ 1) or a pool of ``workers`` processes,
    counting the outcomes in ``summary``. On any exception (:class:`Stopped`,
    :class:`OutputWriteError`) the pool is terminated, not drained: no worker writes after
    this returns."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=desc)
    pool = None
    try:
        with contextlib.ExitStack() as scope:
            if workers <= 1:
                scope.enter_context(torch_threads(LABELER_THREADS))
                labeler = labeler if labeler is not None else make_labeler()
                results = (_label(t, labeler) for t in todo)
            else:
                import multiprocessing as mp

                with _worker_environment():
                    pool = mp.get_context("spawn").Pool(
                        workers, initializer=_init_worker, initargs=(make_labeler,)
                    )
                results = pool.imap(_label_in_worker, todo, chunksize=1)
            for _, path, err, n in results:
                _count(summary, path, err, n)
                bar.update(1)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def _count(summary: RunSummary, path: str, err: Optional[str], n: int) -> None:
    if err is None:
        summary.done += 1
        summary.masks += n
    else:
        summary.failed += 1
        summary.failures.append((path, err))
        logger.warning("skipping %s: %s", path, err)
