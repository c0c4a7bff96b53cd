"""``IndexedDataset``: a map-style training dataset that holds only a root's index.

Each process keeps the index memory-mapped (shared pages, ~100 bytes per image on disk) and
reads the one record a sample needs (one ``pread`` for a tar member or TSV field, one file for a
JSON source). No per-image Python object exists, so the dataset pickles to a few hundred bytes:
a DataLoader worker started by ``spawn`` reopens the arrays lazily; one started by ``fork``
shares the parent's mappings. Records are validated when read; a bad one raises
:class:`unsam.io.sa1b.SA1BFormatError` naming the source and offset, for the caller (the
training mapper) to warn, count and replace.
"""

import mmap
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401  (before detectron2)

import numpy as np
import torch
from detectron2.structures import BoxMode

from ...io.sa1b import DatasetError, SA1BFormatError
from ..sa1b import _record_annotations
from .build import INDEX_VERSION, build_index, find_index, index_dir_for, read_current
from .formats import KIND_JSON, KIND_TSV, decode_base64_image, parse_record

MAX_OPEN_FILES = 64  # tar / TSV descriptors kept open per process (least recently used closed)


def sample_indices(n: int, max_instances: Optional[int], rng=None) -> Sequence[int]:
    """At most ``max_instances`` of ``range(n)``, uniformly without replacement, in file order
    (parents stay before their parts). ``rng``: a ``numpy.random.Generator`` or a seed."""
    if max_instances is None or n <= max_instances:
        return range(n)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return np.sort(rng.choice(n, size=int(max_instances), replace=False)).tolist()


def annotation_dict(ann: Dict, i: int) -> Dict:
    """One SA-1B annotation as the detectron2 dict :func:`unsam.data.sa1b.load_sa1b_dicts` makes
    (``i``: its position in the record, the id when it has none). Masks stay COCO RLE."""
    return {
        "segmentation": ann["segmentation"],
        "bbox": ann.get("bbox", [0, 0, 0, 0]),
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 0,
        "iscrowd": 0,
        "area": ann.get("area", 0),
        "id": ann.get("id", i),
        "level": int(ann.get("level", 0)),
        "parent_id": int(ann.get("parent_id", -1)),
        "predicted_iou": float(ann.get("predicted_iou", 1.0)),
    }


def _random_access(array: np.ndarray) -> np.ndarray:
    """Tell the kernel a memory-mapped index array is read at random (no read-ahead). Samples
    read their rows with ``pread`` (:meth:`IndexedDataset._items`); the maps serve bulk reads."""
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except OSError:  # advice only
            pass
    return array


def _blob(path: str) -> np.ndarray:
    return (
        _random_access(np.memmap(path, np.uint8, "r"))
        if os.path.getsize(path)
        else np.zeros(0, np.uint8)
    )


def _array(path: str) -> np.ndarray:
    return _random_access(np.load(path, mmap_mode="r"))


class IndexedDataset(torch.utils.data.Dataset):
    """The images of one dataset root (JSON folders, SA-1B tars, TSV shards, mixed), by index.

    ``IndexedDataset(root, cache_dir=None)`` opens the index built by
    ``python -m unsam.data.index ROOT`` (or by ``build=True``: build / update it first, which
    a distributed job should do on one rank only). ``skip_empty``: leave out images without
    annotations. ``max_instances``: the cap ``dataset[i]`` applies (``record`` takes its own).

    ``dataset[i]`` / ``record(i)``: a detectron2 dict ``{"file_name" (JSON sources) or
    "image_bytes" (tar / TSV: the encoded image), "image_id", "height", "width", "annotations",
    "record_name"}`` with annotations as :func:`unsam.data.sa1b.load_sa1b_dicts` gives them.
    """

    def __init__(
        self,
        root,
        cache_dir=None,
        *,
        build: bool = False,
        workers: Optional[int] = None,
        skip_empty: bool = False,
        max_instances: Optional[int] = None,
        progress: bool = True,
    ):
        self.root = os.path.abspath(root)
        self.cache_dir = None if cache_dir is None else os.path.abspath(cache_dir)
        if build:
            build_index(self.root, self.cache_dir, workers=workers, progress=progress)
        index_dir = find_index(self.root, self.cache_dir)
        if index_dir is None:
            looked = index_dir_for(self.root, self.cache_dir)
            option = f" --cache-dir {self.cache_dir}" if self.cache_dir else ""
            raise DatasetError(
                f"dataset root '{self.root}' has no index (looked in {looked}): build it with "
                f"'python -m unsam.data.index {self.root}{option}'"
            )
        self.skip_empty = skip_empty
        self.max_instances = max_instances
        for attempt in range(
            3
        ):  # a build may replace the generation between reading CURRENT and opening it
            current = read_current(index_dir)
            self.index_dir = str(index_dir / current["generation"])
            self._closed_state()
            try:
                if current.get("version") == INDEX_VERSION:
                    self._open()
                break
            except FileNotFoundError:
                self.close()
                if attempt == 2:
                    raise
        if current.get("version") != INDEX_VERSION:
            raise DatasetError(
                f"the index of '{self.root}' ({index_dir}) was built by another version of UnSAM "
                f"(format {current.get('version')}, this one reads {INDEX_VERSION}): update it "
                f"with 'python -m unsam.data.index {self.root}"
                f"{' --cache-dir ' + self.cache_dir if self.cache_dir else ''}'"
            )
        self.index_dir = str(index_dir / current["generation"])
        # images, labelled (with a non-empty mask), empty_masks, skipped, kinds: the build's counts
        self.summary = {
            k: current[k]
            for k in ("images", "labelled", "empty_masks", "skipped", "first_skipped", "kinds")
        }
        if len(self) == 0:
            what = "non-empty image" if skip_empty and current["images"] else "usable image"
            first = (
                f"; first skipped: {current['first_skipped'][0]}"
                if current.get("first_skipped")
                else ""
            )
            raise DatasetError(
                f"dataset root '{self.root}' has no {what} ({current['images']} indexed, "
                f"{current['skipped']} skipped{first})"
            )

    # ------------------------------------------------------------------------------ state
    def _closed_state(self) -> None:
        self._rows = None
        self._fds: "OrderedDict[int, int]" = OrderedDict()
        self._pid = os.getpid()
        self._index_fds: Dict[str, int] = {}

    def _open(self) -> None:
        """Memory-map the arrays (nothing is read until used).

        A sample reads its row, offsets and names with ``pread`` (:meth:`_items`), not through
        the maps: a page fault on a mapped file maps the cached pages around it too (64 KB), so
        2000 random samples made a loader worker's RSS grow by the whole index of a million
        images (66 MB, file-backed). Read with ``pread`` the index costs no resident memory per
        process; the maps are for bulk reads (:meth:`column`)."""
        import json

        d = self.index_dir
        with open(os.path.join(d, "sources.json")) as f:
            self._sources: List[Tuple[str, str]] = [
                (s["kind"], os.path.join(self.root, s["path"])) for s in json.load(f)
            ]
        self._keys = _blob(os.path.join(d, "keys.bin"))
        self._keys_off = _array(os.path.join(d, "keys_off.npy"))
        self._images = _blob(os.path.join(d, "images.bin"))
        self._images_off = _array(os.path.join(d, "images_off.npy"))
        self._order = _array(os.path.join(d, "nonempty.npy")) if self.skip_empty else None
        self._rows = _array(os.path.join(d, "rows.npy"))
        # opened now, while this generation exists (a later build may delete it; open files and
        # maps stay readable); pread needs no file position, so forked workers share them
        for array in (
            self._keys,
            self._keys_off,
            self._images,
            self._images_off,
            self._order,
            self._rows,
        ):
            name = getattr(array, "filename", None)
            if name is not None and name not in self._index_fds:
                self._index_fds[name] = os.open(name, os.O_RDONLY)

    def __getstate__(self) -> Dict:
        """Only where the index is: a worker reopens the memory maps (no array is pickled)."""
        return {
            k: self.__dict__[k]
            for k in ("root", "cache_dir", "index_dir", "skip_empty", "max_instances", "summary")
        }

    def __setstate__(self, state: Dict) -> None:
        self.__dict__.update(state)
        self._closed_state()

    def close(self) -> None:
        """Close the tar / TSV / index files this process has open."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()
        for fd in self._index_fds.values():  # this process's copies (a forked worker has its own)
            os.close(fd)
        self._index_fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _fd(self, source: int) -> int:
        """An open descriptor of a tar / TSV source (``pread`` needs no shared file position,
        so descriptors inherited by forked workers are never used: each process opens its own)."""
        if self._pid != os.getpid():
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(source)
        if fd is None:
            path = self._sources[source][1]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SA1BFormatError(f"{path}: cannot open ({e.strerror or e})") from None
            self._fds[source] = fd
            if len(self._fds) > MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(source)
        return fd

    def _items(self, array: np.ndarray, i: int, count: int = 1) -> np.ndarray:
        """``array[i:i + count]`` of a memory-mapped index array, read with one ``pread`` from its
        file (opened by :meth:`_open`; again after :meth:`close`)."""
        fd = self._index_fds.get(array.filename)
        if fd is None:
            fd = self._index_fds[array.filename] = os.open(array.filename, os.O_RDONLY)
        size = array.dtype.itemsize
        data = os.pread(fd, size * count, array.offset + i * size)
        if len(data) != size * count:
            raise SA1BFormatError(
                f"index file {array.filename} is cut short; rebuild the index of {self.root}"
            )
        return np.frombuffer(data, array.dtype)

    def _row_at(self, row: int):
        """Row ``row`` of the index (a numpy record: ``r["source"]``, ``r["height"]``, ...)."""
        return self._items(self._rows, row)[0]

    # ------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        if self._rows is None:
            self._open()
        return len(self._order) if self._order is not None else len(self._rows)

    def _row(self, i: int) -> int:
        """Dataset position → row of the index."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        return int(self._items(self._order, i)[0]) if self._order is not None else i

    def _string(self, blob: np.ndarray, offsets: np.ndarray, row: int) -> str:
        """Row ``row``'s string of a string table (``keys`` / ``images`` and their offsets)."""
        lo, hi = (int(v) for v in self._items(offsets, row, 2))
        if hi <= lo:
            return ""
        return self._items(blob, lo, hi - lo).tobytes().decode("utf-8", "surrogateescape")

    def column(self, name: str) -> np.ndarray:
        """One index column in dataset order, e.g. ``"height"``, ``"width"``, ``"masks"`` (a copy:
        ``len(self)`` values, for aspect-ratio grouping or samplers)."""
        if self._rows is None:
            self._open()
        values = self._rows[name]
        return np.array(values[self._order] if self._order is not None else values)

    def location(self, i: int) -> str:
        """Where image ``i``'s record is, for messages: a path, or ``source: member (byte N)``."""
        return self._where(self._row(i))

    def _where(self, row: int) -> str:
        r = self._row_at(row)
        kind, path = self._sources[int(r["source"])]
        key = self._string(self._keys, self._keys_off, row)
        if kind == KIND_JSON:
            return os.path.join(path, key)
        return (
            f"{path}: {'line' if kind == KIND_TSV else 'member'} '{key}' "
            f"(byte {int(r['record_offset'])})"
        )

    def _read(self, row: int, which: str) -> bytes:
        """The bytes of a row's record or image field, from its tar / TSV (one ``pread``)."""
        r = self._row_at(row)
        offset, size = int(r[f"{which}_offset"]), int(r[f"{which}_size"])
        data = os.pread(self._fd(int(r["source"])), size, offset)
        if len(data) != size:
            raise SA1BFormatError(
                f"{self._where(row)}: {which} truncated ({len(data)} of {size} bytes at "
                f"{offset}); the source changed since indexing? rebuild the index"
            )
        return data

    def raw_record(self, i: int) -> Tuple[bytes, str]:
        """``(JSON text, location)`` of image ``i``'s record, unparsed."""
        row = self._row(i)
        kind, path = self._sources[int(self._row_at(row)["source"])]
        where = self._where(row)
        if kind != KIND_JSON:
            return self._read(row, "record"), where
        try:
            with open(where, "rb") as f:
                return f.read(), where
        except OSError as e:
            raise SA1BFormatError(f"{where}: unreadable ({e.strerror or e})") from None

    def image_path(self, i: int) -> Optional[str]:
        """The image file of a JSON-source image (None for tar / TSV: see :meth:`image_bytes`)."""
        row = self._row(i)
        kind, folder = self._sources[int(self._row_at(row)["source"])]
        if kind != KIND_JSON:
            return None
        stored = self._string(self._images, self._images_off, row)
        return stored if os.path.isabs(stored) else os.path.join(folder, stored)

    def image_bytes(self, i: int) -> bytes:
        """The encoded image (JPEG / PNG bytes) of image ``i``: a tar member, a TSV field
        (base64-decoded), or the file of a JSON source."""
        row = self._row(i)
        kind, _ = self._sources[int(self._row_at(row)["source"])]
        if kind == KIND_JSON:
            path = self.image_path(i)
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise SA1BFormatError(
                    f"{self._where(row)}: image '{path}' unreadable ({e.strerror or e})"
                ) from None
        data = self._read(row, "image")
        return decode_base64_image(data, self._where(row)) if kind == KIND_TSV else data

    def record(
        self,
        i: int,
        max_instances: Optional[int] = None,
        rng=None,
        read_image: bool = True,
        validate: bool = True,
        check_runs: bool = True,
    ) -> Dict:
        """Image ``i`` as a detectron2 dataset dict, read and validated from its one record.

        ``max_instances``: keep at most this many annotations, drawn uniformly at random with
        ``rng`` (a ``numpy.random.Generator`` or a seed) before any annotation dict is built; only
        those are validated and no mask is decoded here. ``read_image``: for tar / TSV images,
        put the encoded bytes in ``"image_bytes"`` (a second ``pread``).

        Validated (the default), the annotations are exactly the dicts
        :func:`unsam.data.sa1b.load_sa1b_dicts` makes of the record (``area`` counted from the RLE,
        empty masks dropped; the same function builds both). ``check_runs=False``: the run lengths
        of each RLE are not checked (~0.15 ms per SA-1B mask; the training mapper checks those of
        the masks it decodes), everything else is. ``validate=False``: no check at all, and the
        annotations are as the file has them (its ``area``, empty masks kept) — pycocotools is
        not safe on unchecked RLEs; for a caller that checks RLEs itself.
        Raises :class:`SA1BFormatError` naming the record for a bad or changed record.
        """
        row = self._row(i)
        raw, where = self.raw_record(i)
        data, selected = parse_record(
            raw,
            where,
            None if max_instances is None else lambda n: sample_indices(n, max_instances, rng),
            validate,
            check_runs,
        )
        image = data["image"]
        r = self._row_at(row)
        height, width = int(image["height"]), int(image["width"])
        if (height, width) != (int(r["height"]), int(r["width"])):
            raise SA1BFormatError(
                f"{where}: image is {height}x{width}, the index says {int(r['height'])}x"
                f"{int(r['width'])}: the source changed since indexing; rebuild the index"
            )
        annotations = data["annotations"]
        key = self._string(self._keys, self._keys_off, row)
        out = {
            "image_id": image.get(
                "image_id", image.get("id", os.path.splitext(os.path.basename(key))[0])
            ),
            "height": height,
            "width": width,
            "annotations": (
                _record_annotations(annotations, selected)[0]
                if validate
                else [annotation_dict(annotations[k], k) for k in selected]
            ),
            "record_name": where,
        }
        kind, _ = self._sources[int(r["source"])]
        if kind == KIND_JSON:
            path = self.image_path(i)
            if not os.path.isfile(path):
                raise SA1BFormatError(f"{where}: image '{path}' not found")
            out["file_name"] = path
        elif read_image:
            out["image_bytes"] = self.image_bytes(i)
        return out

    def __getitem__(self, i: int) -> Dict:
        """``record(i)`` with the dataset's ``max_instances``; the draw comes from numpy's global
        generator, which detectron2 seeds per loader worker (reproducible runs)."""
        rng = None
        if self.max_instances is not None:
            rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        return self.record(i, self.max_instances, rng)

    def __repr__(self) -> str:
        return f"IndexedDataset('{self.root}', {len(self)} images, index {self.index_dir})"
