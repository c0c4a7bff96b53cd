"""The one place that adapts detectron2 0.6 to today's numpy, Pillow, setuptools, torch and Python.

detectron2 0.6 (Nov 2021) predates numpy 1.24 (removed ``np.int`` & co.), Pillow 10 (removed
``Image.LINEAR``), setuptools 81 (removed ``pkg_resources``), Python 3.11 (``random.sample`` of
a set) and the CPU-only ``pb1-detectron2`` build has no compiled ``detectron2._C``. Importing this
module before detectron2 makes it usable; ``import unsam`` does that. Nothing else in the project
patches third-party code.
"""

import bisect
import collections.abc
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

import numpy as np
from PIL import Image


def silence_jit_script_notice() -> None:
    """Hide torch's deprecation notice of ``torch.jit.script``, and nothing else.

    torch (2.14 here) warns on every call; fvcore.nn (focal loss) and detectron2.modeling (box
    regression) call it at import time, so every command importing them -- ``--help`` included --
    printed two FutureWarnings the user can do nothing about. UnSAM never calls it itself."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.jit\.script` is deprecated",
        category=FutureWarning,
        module=r"torch\.jit\._script",
    )


silence_jit_script_notice()

# numpy >= 1.24 removed the deprecated scalar aliases that detectron2 0.6 still uses.
for _alias, _target in (
    ("int", int),
    ("float", float),
    ("bool", bool),
    ("object", object),
    ("str", str),
):
    if _alias not in np.__dict__:
        setattr(np, _alias, _target)

# Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR) used by detectron2's transforms.
if not hasattr(Image, "LINEAR"):
    Image.LINEAR = Image.BILINEAR


def _install_pkg_resources_shim() -> None:
    """detectron2.model_zoo imports pkg_resources for ``resource_filename`` only."""
    if importlib.util.find_spec("pkg_resources") is not None:
        return
    import importlib.resources as resources

    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        return str(resources.files(package).joinpath(resource))

    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim


class _MissingCExtension(types.ModuleType):
    """Stands in for ``detectron2._C``: any op raises a clear error when called."""

    # environment reports (collect_env) ask for these; answer instead of failing
    def get_compiler_version(self):
        return "not compiled (detectron2 installed without its C++ extension)"

    get_cuda_version = get_compiler_version

    def has_cuda(self):
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _unavailable(*args, **kwargs):
            raise RuntimeError(
                f"detectron2._C.{name} is unavailable: this detectron2 was installed without "
                "its C++/CUDA extension. Install a compiled detectron2 to use this op."
            )

        return _unavailable


class _CExtensionLoader(importlib.abc.Loader):
    """Loads the real ``detectron2._C`` (``real``, None when there is no file) or, when it is
    absent or fails to load, a :class:`_MissingCExtension`."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        if self.real is not None:
            try:
                return self.real.create_module(spec)
            except ImportError:
                pass
        return _MissingCExtension(spec.name)

    def exec_module(self, module):
        if not isinstance(module, _MissingCExtension):
            self.real.exec_module(module)


class _CExtensionFinder(importlib.abc.MetaPathFinder):
    """Answers the import of ``detectron2._C`` (see :func:`_install_missing_c_extension`)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "detectron2._C":
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = _CExtensionLoader(real.loader if real is not None else None)
        origin = real.origin if real is not None else None
        return importlib.util.spec_from_loader(fullname, loader, origin=origin)


def _install_missing_c_extension() -> None:
    """Register a placeholder ``detectron2._C`` when the compiled extension is absent.

    ``detectron2.layers`` imports ``_C`` at import time although UnSAM needs none of its ops
    (deformable conv, rotated boxes, the C++ COCOeval): deformable attention has a pure-PyTorch
    path and COCO evaluation uses pycocotools. Calling any op of the placeholder raises a clear
    error instead of an AttributeError deep inside detectron2.

    The decision is made when detectron2 imports ``_C`` (an import hook), not here: importing
    detectron2 now would load torch (~1.3 s) into every ``import unsam``, the detectron2-free
    parts (:mod:`unsam.io`, the pseudo-label workers) included.
    """
    if "detectron2._C" in sys.modules:
        return
    if not any(isinstance(f, _CExtensionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CExtensionFinder())


_install_pkg_resources_shim()
_install_missing_c_extension()


class _FallbackCandidates(collections.abc.Sequence):
    """``range(n)`` less the indices whose mapping failed: detectron2's retry pool, in O(failures)
    memory.

    detectron2's ``MapDataset`` keeps ``set(range(len(dataset)))`` (~60 MB at a million images,
    in every loader worker) and, since Python 3.11 wants a sequence for ``random.sample``, was
    patched to sort the whole set on each retry. Failures are rare, so this keeps only the
    sorted failed indices: the k-th candidate is found by bisection (O(log² failures)). The k-th
    element is the k-th smallest, as the sorted set gave, so retries draw the same indices (for
    pools of at most 21, ``random.sample`` lists the set instead, whose order after re-insertions
    is the hash table's; here it is ascending).
    """

    def __init__(self, size: int):
        self._size = int(size)
        self._removed: list = []  # sorted

    def __len__(self) -> int:
        return self._size - len(self._removed)

    def __contains__(self, index) -> bool:
        k = bisect.bisect_left(self._removed, index)
        return 0 <= index < self._size and not (
            k < len(self._removed) and self._removed[k] == index
        )

    def add(self, index: int) -> None:
        k = bisect.bisect_left(self._removed, index)
        if k < len(self._removed) and self._removed[k] == index:
            del self._removed[k]

    def discard(self, index: int) -> None:
        k = bisect.bisect_left(self._removed, index)
        if 0 <= index < self._size and not (k < len(self._removed) and self._removed[k] == index):
            self._removed.insert(k, index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"candidate {k} out of range for {n}")
        k %= n
        # the smallest x with k + 1 candidates in [0, x]: x - (removed <= x) + 1 grows with x
        lo, hi = k, k + len(self._removed)
        while lo < hi:
            mid = (lo + hi) // 2
            if mid + 1 - bisect.bisect_right(self._removed, mid) >= k + 1:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def __iter__(self):
        removed = iter(self._removed + [self._size])
        skip = next(removed)
        for i in range(self._size):
            if i == skip:
                skip = next(removed)
                continue
            yield i


def fix_map_dataset_retry() -> None:
    """Let detectron2's ``MapDataset`` retry another image when the mapper returns ``None``, in
    constant memory.

    Its retry draws the replacement with ``random.sample(set)``, a ``TypeError`` since Python
    3.11, so skipping a bad training image crashed the loader instead; and its pool of retry
    candidates is ``set(range(N))``, built at start and copied into every loader worker. The pool
    becomes a :class:`_FallbackCandidates` (the same draws). Called by :mod:`unsam.data.mapper`,
    whose mapper skips bad images: patching at import time here would import all of
    ``detectron2.data`` (~3 s) into every command. Idempotent.
    """
    from detectron2.data import common

    if getattr(common.MapDataset, "_unsam_sampleable_retry", False):
        return
    init = common.MapDataset.__init__

    def __init__(self, dataset, map_func):
        init(
            self, (), map_func
        )  # detectron2's own set(range(len(dataset))) would be built, then dropped
        self._dataset = dataset
        self._fallback_candidates = _FallbackCandidates(len(dataset))

    common.MapDataset.__init__ = __init__
    common.MapDataset._unsam_sampleable_retry = True
