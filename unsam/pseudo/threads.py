"""One thread for every numeric library while a pseudo-labeler runs (:func:`single_threaded`).

The engine's greedy merges, de-duplication and ranking compare floating-point sums: a
multi-threaded BLAS or OpenCV kernel may add the same numbers in another order depending on how
many threads it has, and a last-bit difference can flip a near-tie and change the masks. Inside
:func:`single_threaded` torch, OpenCV and every OpenBLAS copy loaded in the process (numpy's,
scipy's and OpenCV's bundle their own) run on one thread, so the output of a labeler is the
same whatever ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` or the machine's core count;
the settings are restored on exit. Throughput comes from worker processes instead
(``python -m unsam.pseudo --workers N``).

The OpenBLAS copies are found the way ``threadpoolctl`` finds them (the shared objects mapped
into the process, ``/proc/self/maps``; Linux only — elsewhere BLAS threads are left alone) and
driven through their ``*_get_num_threads`` / ``*_set_num_threads`` entry points.
"""

import contextlib
import ctypes
import os
from typing import Callable, Dict, Iterator, List, Tuple

import cv2
import scipy.linalg  # noqa: F401  (maps scipy's OpenBLAS before the copies are listed)
import torch

from ..utils.threads import torch_threads

# OpenBLAS entry-point prefixes / suffixes: numpy's and scipy's wheels rename the library's
# symbols (scipy_openblas_…, 64-bit integer builds end in 64_), OpenCV's keeps the plain names
_PREFIXES = ("scipy_openblas", "openblas")
_SUFFIXES = ("64_", "")

_Controls = Tuple[Callable[[], int], Callable[[int], None]]
_BY_PATH: Dict[str, object] = {}  # library path -> (get, set) entry points, or None


def _openblas_controls() -> List[_Controls]:
    """(get_num_threads, set_num_threads) of every OpenBLAS copy mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted(
                {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
            )
    except OSError:
        return []
    out = []
    for path in paths:
        if path not in _BY_PATH:
            _BY_PATH[path] = None
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle
            except OSError:
                continue
            for name in (p + "_{}_num_threads" + s for p in _PREFIXES for s in _SUFFIXES):
                get = getattr(lib, name.format("get"), None)
                put = getattr(lib, name.format("set"), None)
                if get is not None and put is not None:
                    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                    _BY_PATH[path] = (get, put)
                    break
        if _BY_PATH[path] is not None:
            out.append(_BY_PATH[path])
    return out


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one torch, OpenCV and OpenBLAS thread; restore the settings after."""
    blas = _openblas_controls()
    before = (cv2.getNumThreads(), [get() for get, _ in blas])
    cv2.setNumThreads(1)
    for _, put in blas:
        put(1)
    try:
        with torch_threads(1):
            yield
    finally:
        cv2.setNumThreads(before[0])
        for (_, put), n in zip(blas, before[1]):
            put(n)


def thread_settings() -> Dict[str, object]:
    """The current thread counts (torch, OpenCV, each OpenBLAS copy), for tests and logs."""
    return {
        "torch": torch.get_num_threads(),
        "cv2": cv2.getNumThreads(),
        "openblas": [get() for get, _ in _openblas_controls()],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
