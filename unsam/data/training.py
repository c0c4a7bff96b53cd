"""The training set as the loaders see it: registered sets behind one map-style dataset that
holds no per-image Python object, and the count of replaced samples.

An SA-1B style root registered with :func:`unsam.data.sa1b.register_sa1b` (every
``UNSAM.DATA.SA1B_ROOTS`` entry) carries ``index_root`` in its metadata: training reads it through
the dataset index (:mod:`unsam.data.index`, built or updated on rank 0 at start, then shared by
all ranks), never through ``DatasetCatalog.get`` — which still returns the list of dicts for
evaluation and other callers. Other registered sets (COCO-format, lists) are held serialized, as
detectron2 does (one byte buffer, shared by forked loader workers).

Why one dataset object: detectron2's loader and the ATS loader pickle their dataset into every
loader worker; a list of a million dicts (with every mask's RLE) was ~1.3 MB per image in each of
them. :class:`TrainingRecords` pickles to a few hundred bytes per set, whatever its size.
"""

import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401  (before detectron2)

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..io.sa1b import DatasetError, SA1BFormatError
from ..utils.files import OutputError
from .index import IndexedDataset, build_index, find_index

logger = logging.getLogger(__name__)

INDEX_CACHE = "index"  # OUTPUT_DIR/<this>: where the index of a read-only root is built
REPLACED_KEY = "data_replaced"  # (loader worker pid, samples it replaced so far), in a mapped dict
REPLACED_METRIC = "data/replaced_samples"


def _writable(folder: str) -> bool:
    """Whether the index may be written beside the data. Permission bits are asked as well as
    ``os.access``: a folder mounted or marked read-only (``r-x``) is left alone even by root."""
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(mode & 0o222)


def open_training_index(root: str, output_dir: str, skip_empty: bool = False) -> IndexedDataset:
    """The index of dataset ``root``, built or brought up to date by rank 0 while the other ranks
    wait (one writer), then opened by every rank.

    The index lives beside the data (``<root>/.unsam_index``) when the folder is writable, else in
    ``<output_dir>/index/``; a read-only root with an index beside it (built ahead with
    ``python -m unsam.data.index ROOT``) uses that one as it is. A root that cannot be indexed is
    a :class:`DatasetError` on every rank (not a rank-0 traceback and a hang at the barrier).
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"SA-1B root '{root}' is not a directory")
    cache_dir = None
    build = True
    if not _writable(root):
        if find_index(root) is not None:
            build = False
            logger.info(
                "dataset root %s is read-only: using its index as built (not checked for new or "
                "changed files; rebuild it with 'python -m unsam.data.index %s')",
                root,
                root,
            )
        else:
            cache_dir = os.path.join(output_dir, INDEX_CACHE)
    error = None
    if build and comm.is_main_process():
        try:
            build_index(root, cache_dir, progress=True)
        except (DatasetError, OutputError) as e:
            error = str(e)
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]  # rank 0's outcome, on every rank (and the barrier)
    if error:
        raise DatasetError(error)
    return IndexedDataset(root, cache_dir, skip_empty=skip_empty)


def _has_mask(record: Dict) -> bool:
    """Whether a dataset dict holds a non-crowd annotation with pixels (SA-1B records carry the
    RLE's own area; COCO the file's)."""
    return any(
        not a.get("iscrowd", 0) and float(a.get("area", 1)) > 0
        for a in record.get("annotations") or []
    )


class TrainingRecords(torch.utils.data.Dataset):
    """Several training sets as one map-style dataset: ``IndexedDataset`` parts (one record read
    per item) and serialized lists, in order.

    ``dataset[i]`` is the dataset dict of image ``i``. A record that cannot be read (corrupt JSON,
    a tar or TSV cut short or changed since indexing, a missing image file) is returned as
    ``{"record_error": message naming it, "record_name": where}``: the mapper warns, counts and
    returns ``None``, and the loader draws another image (detectron2's ``MapDataset`` retry, the
    ATS ``TaskMapDataset`` retry) — the loader never dies on one bad record and never skips it
    silently. Tar / TSV records carry the encoded image as ``"image_bytes"``.

    Indexed records skip only the RLE run-length check (``check_runs=False``): the mapper checks
    the runs of the masks it decodes (see :meth:`IndexedDataset.record`).
    """

    def __init__(self, parts: Sequence[Tuple[str, object]]):
        self.names = [name for name, _ in parts]
        self.parts = [dataset for _, dataset in parts]
        self.ends = np.cumsum([len(d) for d in self.parts]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, i: int) -> Tuple[int, int]:
        """``(part, index in that part)`` of image ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} training images")
        part = int(np.searchsorted(self.ends, i, side="right"))
        return part, i - (int(self.ends[part - 1]) if part else 0)

    def __getitem__(self, i: int) -> Dict:
        part, k = self.locate(int(i))
        dataset = self.parts[part]
        if not isinstance(dataset, IndexedDataset):
            return dataset[k]
        try:
            return dataset.record(k, check_runs=False)
        except SA1BFormatError as e:
            return {"record_error": str(e), "record_name": dataset.location(k)}

    def __iter__(self) -> Iterator[Dict]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(d)}" for n, d in zip(self.names, self.parts))
        return f"TrainingRecords({sizes})"


def serialized_list(dicts: List[Dict]) -> DatasetFromList:
    """A list of dataset dicts as detectron2 holds it: pickled into one byte buffer (each item
    unpickled fresh when read, so a mapper may change it)."""
    return DatasetFromList(dicts, copy=False, serialize=True)


def note_replaced(count: int, mapped: Optional[Dict] = None) -> None:
    """Publish a loader's count of replaced samples: as ``data/replaced_samples`` in the event
    storage when this process has one (``DATALOADER.NUM_WORKERS 0``), else — in a loader worker —
    in ``mapped`` (the next sample it returns), for :class:`ReplacedSampleMeter` to publish."""
    if torch.utils.data.get_worker_info() is None:
        try:
            get_event_storage().put_scalar(REPLACED_METRIC, count, smoothing_hint=False)
        except AssertionError:  # no storage: not training
            pass
    elif mapped is not None:
        mapped[REPLACED_KEY] = (os.getpid(), count)


class ReplacedSampleMeter:
    """Training batches as the wrapped loader yields them, minus the replaced-sample counts that
    loader workers attach (:func:`note_replaced`), which go to the event storage as their sum.

    Each worker reports its own running count; the sum over workers is the run's count (workers of
    an earlier iterator keep their last report). Other attributes are the wrapped loader's.
    """

    def __init__(self, loader):
        self.loader = loader
        self.per_worker: Dict[int, int] = {}

    def __iter__(self):
        for batch in self.loader:
            reported = False
            for d in batch if isinstance(batch, list) else ():
                if isinstance(d, dict) and REPLACED_KEY in d:
                    pid, count = d.pop(REPLACED_KEY)
                    self.per_worker[pid] = max(count, self.per_worker.get(pid, 0))
                    reported = True
            if reported:
                try:
                    get_event_storage().put_scalar(
                        REPLACED_METRIC, sum(self.per_worker.values()), smoothing_hint=False
                    )
                except AssertionError:
                    pass
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":  # only reached before __init__ set it (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)
