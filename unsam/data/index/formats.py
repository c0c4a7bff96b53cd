"""The three source formats of a dataset root, and the cheap facts the index keeps per record.

A root (flat, or one level of shard sub-folders) may mix:

* ``json``: ``<name>.json`` SA-1B records (the pseudo-label engine's output, or SA-1B extracted)
  with the image beside them (same stem) or at ``image.file_name`` — one *source* per folder;
* ``tar``: SA-1B as released, ``sa_*.tar`` (any ``*.tar``) of ``sa_N.jpg`` + ``sa_N.json`` pairs,
  read in place: the index keeps each member's data offset and size;
* ``tsv``: the published UnSAM / Semantic-SAM shards, one line per image
  ``name \\t annotation-json \\t base64-image`` plus ``<stem>.lineidx`` (one decimal byte offset per
  line); a shard without ``.lineidx`` is scanned for line starts.

Indexing one record reads its bytes but does not parse its masks: height and width come from the
small ``"image": {...}`` object at the start of the text (a full JSON parse only when that fast
path fails) and the mask count from the number of ``"segmentation"`` keys. A record that cannot
be indexed becomes a *skipped* message naming the file (and member / offset), never a row.
"""

import base64
import binascii
import bisect
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...io.sa1b import (
    SA1BFormatError,
    _annotation_problem,
    _resolve_image,
    _run_lengths,
    annotation_shape_problem,
)
from ...utils.images import IMAGE_EXTENSIONS

KIND_JSON, KIND_TAR, KIND_TSV = "json", "tar", "tsv"
KINDS = (KIND_JSON, KIND_TAR, KIND_TSV)

# One row per image (48 bytes). ``record_*``: where the annotation JSON is (a tar member's data, a
# TSV line's JSON field; for ``json`` sources offset 0 and the file's size). ``image_*``: the tar
# member's data or the TSV line's base64 field (0, 0 for ``json`` sources: their image is a path,
# kept in the index's string table). ``masks``: number of annotations; ``empty``: how many of them
# have an empty RLE (no pixel) — the trainer drops those, so an image is "labelled" when
# masks > empty, and that is known without reading any record (52 bytes per row).
ROW_DTYPE = np.dtype(
    [
        ("source", "<i4"),
        ("height", "<i4"),
        ("width", "<i4"),
        ("masks", "<i4"),
        ("record_offset", "<i8"),
        ("record_size", "<i8"),
        ("image_offset", "<i8"),
        ("image_size", "<i8"),
        ("empty", "<i4"),
    ]
)

# the fast path: a flat image object at the very start of the text (SA-1B's and our own layout)
_HEADER = re.compile(rb'\A\s*\{\s*"image"\s*:\s*(\{[^{}]*\})')
_SEGMENTATION = b'"segmentation"'
_ANNOTATIONS = b'"annotations"'
# compressed RLE strings short enough to be one value (an empty mask: a single run of zeros); at
# most 13 characters, 26 in the JSON text when each is an escaped backslash
_SHORT_COUNTS = re.compile(rb'"counts"\s*:\s*"([0-o]{1,26})"')
_LIST_COUNTS = re.compile(rb'"counts"\s*:\s*\[([^\]]*)\]')
_TSV_FIRST_READ = 1 << 18  # bytes read at a TSV line start to find its JSON field (grown as needed)


class RecordError(Exception):
    """A record the index leaves out; the message is the reason (the caller adds the location)."""


def resolve_image(json_path, file_name: str) -> Optional[Path]:
    """The image of a ``json`` record: ``file_name`` (absolute, or relative to the JSON's folder),
    else a file with the JSON's stem and an image extension; None when none exists.
    The same rule as :func:`unsam.data.sa1b.load_sa1b_dicts` (it calls the same function)."""
    return _resolve_image(Path(json_path), file_name)


def _image_size(image) -> Tuple[int, int]:
    if not isinstance(image, dict):
        raise RecordError("'image' is not an object")
    try:
        height, width = int(image["height"]), int(image["width"])
    except (KeyError, TypeError, ValueError):
        raise RecordError("image record needs integer 'height' and 'width'") from None
    if height <= 0 or width <= 0:
        raise RecordError(f"image size {height}x{width} is not positive")
    return height, width


def scan_record(raw: bytes) -> Tuple[Dict, int, int, int, bool]:
    """``(image object, height, width, mask count, fast)`` of one SA-1B JSON text, without
    parsing its annotations when the text starts with a flat ``"image"`` object (``fast``).

    Raises :class:`RecordError` for text that is not an SA-1B record. The fast path checks only
    the outline (image object, an ``"annotations"`` key, a closing brace); a record corrupt
    inside its annotations is indexed and fails, named, when it is read (:func:`parse_record`).
    """
    match = _HEADER.match(raw)
    if (
        match is not None
        and raw.find(_ANNOTATIONS, match.end()) >= 0
        and raw[-64:].rstrip().endswith(b"}")
    ):
        try:
            image = json.loads(match.group(1))
        except ValueError:
            image = None
        if image is not None:
            height, width = _image_size(image)
            return image, height, width, raw.count(_SEGMENTATION), True
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"unreadable JSON ({e})") from None
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise RecordError("expected keys 'image' and 'annotations'")
    if not isinstance(data["annotations"], list):
        raise RecordError("'annotations' is not a list")
    height, width = _image_size(data["image"])
    return data["image"], height, width, len(data["annotations"]), False


def count_empty_masks(raw: bytes) -> int:
    """How many annotations of one SA-1B JSON text have an empty RLE, without parsing the JSON.

    An RLE without a pixel is one run of zeros: a compressed ``counts`` string of one value (at
    most 13 characters), or a list with no non-zero odd entry. Only those short strings are
    decoded; every longer string holds several values, i.e. some pixels (in any encoder's output).
    One regular-expression pass over the text: indexing stays a scan, not a parse.
    """
    empty = 0
    for counts in _SHORT_COUNTS.findall(raw):
        try:
            if b"\\" in counts:  # JSON escapes: '\\' is one character of the RLE alphabet
                counts = json.loads(b'"' + counts + b'"').encode("ascii")
            runs = _run_lengths(counts)
        except ValueError:  # corrupt: the record fails, named, when read
            continue
        empty += not runs[1::2].any()
    if b"[" in raw:
        for counts in _LIST_COUNTS.findall(raw):
            try:
                runs = [int(v) for v in counts.split(b",") if v.strip()]
            except ValueError:
                continue
            empty += not any(runs[1::2])
    return empty


def parse_record(
    raw: bytes,
    where: str,
    choose: Optional[Callable[[int], Sequence[int]]] = None,
    validate: bool = True,
    check_runs: bool = True,
) -> Tuple[Dict, Sequence[int]]:
    """Parse one SA-1B JSON text and validate it as :func:`unsam.io.sa1b.read_sa1b_json` does;
    returns ``(data, selected)``. ``choose(n)`` picks which of the n annotations are used (all when
    None); only those are validated — a training sample checks what it uses, and no RLE is
    decoded (the RLE check computes run lengths: ~0.1 ms per annotation, most of the cost of a
    record; ``validate=False`` skips it for a caller that checks the RLEs itself).
    ``check_runs=False``: every chosen annotation gets the checks that decode no run lengths
    (:func:`unsam.io.sa1b.annotation_shape_problem`: structure, size, numbers, a string pycocotools
    can parse safely); the training mapper checks the runs of the masks it decodes.
    Raises :class:`SA1BFormatError` whose message starts with ``where``."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SA1BFormatError(f"{where}: unreadable JSON ({e})") from None
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise SA1BFormatError(f"{where}: expected keys 'image' and 'annotations'")
    try:
        height, width = _image_size(data["image"])
    except RecordError as e:
        raise SA1BFormatError(f"{where}: {e}") from None
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise SA1BFormatError(f"{where}: 'annotations' is not a list")
    selected = range(len(annotations)) if choose is None else choose(len(annotations))
    check = _annotation_problem if check_runs else annotation_shape_problem
    for i in selected if validate else ():
        problem = check(annotations[i], height, width)
        if problem:
            raise SA1BFormatError(f"{where}: annotation {i}: {problem}")
    return data, selected


def decode_base64_image(data: bytes, where: str) -> bytes:
    """A TSV line's image field → the encoded image bytes; :class:`SA1BFormatError` if corrupt."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SA1BFormatError(f"{where}: corrupt base64 image ({e})") from None


class Chunk:
    """What one indexing task found: rows (``ROW_DTYPE``, ``source`` left 0), one key string per
    row (file name / member name / TSV name), one image string per row (``json`` sources: the
    image path relative to the source folder, or absolute; else ""), skipped messages, and
    ``retry`` (a skip that may heal by itself, e.g. an image not there yet: index again next
    time)."""

    def __init__(self):
        self.rows: List[tuple] = []
        self.keys: List[str] = []
        self.images: List[str] = []
        self.skipped: List[str] = []
        self.slow = 0
        self.retry = False

    def add(
        self,
        key: str,
        image: str,
        height: int,
        width: int,
        masks: int,
        fast: bool,
        record: Tuple[int, int] = (0, 0),
        image_at: Tuple[int, int] = (0, 0),
        empty: int = 0,
    ) -> None:
        self.rows.append((0, height, width, masks) + tuple(record) + tuple(image_at) + (empty,))
        self.keys.append(key)
        self.images.append(image)
        self.slow += not fast

    def row_array(self) -> np.ndarray:
        return np.array(self.rows, dtype=ROW_DTYPE) if self.rows else np.zeros(0, ROW_DTYPE)


def index_json_files(root: str, folder: str, names: List[str]) -> Chunk:
    """Index ``names`` (``*.json`` in ``root/folder``) — one task of a ``json`` source."""
    chunk = Chunk()
    folder_path = os.path.join(root, folder)
    root_prefix = os.path.join(root, "")
    for name in names:
        path = os.path.join(folder_path, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            image, height, width, masks, fast = scan_record(raw)
        except OSError as e:
            chunk.skipped.append(f"{path}: unreadable ({e.strerror or e})")
            continue
        except RecordError as e:
            chunk.skipped.append(f"{path}: {e}")
            continue
        file_name = str(image.get("file_name", ""))
        image_path = resolve_image(path, file_name)
        if image_path is None:
            chunk.skipped.append(f"{path}: image '{file_name}' not found")
            chunk.retry = True
            continue
        image_path = str(image_path)
        if os.path.dirname(image_path) == folder_path:
            stored = os.path.basename(image_path)
        elif image_path.startswith(root_prefix):  # inside the root: relative, so the root can move
            stored = os.path.relpath(image_path, folder_path)
        else:
            stored = os.path.abspath(image_path)
        chunk.add(
            name, stored, height, width, masks, fast, (0, len(raw)), empty=count_empty_masks(raw)
        )
    return chunk


def index_tar(root: str, rel: str) -> Chunk:
    """Index one tar of ``<stem>.json`` + ``<stem>.<image ext>`` members, read in place."""
    chunk = Chunk()
    path = os.path.join(root, rel)
    size = os.path.getsize(path)
    records: List[tarfile.TarInfo] = []
    images: Dict[str, Tuple[int, int]] = {}
    end = 0  # where the last member's data ends (then: where tarfile stopped)
    complete = True
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            with tarfile.open(path, "r:") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        chunk.skipped.append(
                            f"{path}: member '{member.name}' truncated (at byte {size} of "
                            f"{member.offset_data + member.size}); the tar ends there"
                        )
                        complete = False
                        break
                    end = member.offset_data + member.size
                    stem, ext = os.path.splitext(member.name)
                    if ext.lower() == ".json":
                        records.append(member)
                    elif ext.lower() in IMAGE_EXTENSIONS:
                        images[stem] = (member.offset_data, member.size)
                if complete:
                    end = tf.offset
        except (tarfile.TarError, EOFError, OSError) as e:
            chunk.skipped.append(
                f"{path}: unreadable tar after {len(records) + len(images)} members "
                f"({e}); the rest is not indexed"
            )
            complete = False
        if complete:  # tarfile stops quietly at a cut or corrupt header: look for the end marker
            tail = os.pread(fd, 1024, end)
            if len(tail) < 1024 or tail.strip(b"\0"):
                chunk.skipped.append(
                    f"{path}: no tar header or end-of-archive marker at byte {end} "
                    "(truncated or corrupt); the members before it are indexed"
                )
        for member in records:
            where = f"{path}:{member.name}"
            raw = os.pread(fd, member.size, member.offset_data)
            try:
                image, height, width, masks, fast = scan_record(raw)
            except RecordError as e:
                chunk.skipped.append(f"{where}: {e}")
                continue
            stem = os.path.splitext(member.name)[0]
            found = images.get(stem)
            if found is None:  # image.file_name, beside the JSON member
                file_name = str(image.get("file_name", ""))
                found = images.get(
                    os.path.splitext(os.path.join(os.path.dirname(member.name), file_name))[0]
                )
            if found is None:
                chunk.skipped.append(f"{where}: no image member '{stem}.*' in the tar")
                continue
            chunk.add(
                member.name,
                "",
                height,
                width,
                masks,
                fast,
                (member.offset_data, member.size),
                found,
                empty=count_empty_masks(raw),
            )
    finally:
        os.close(fd)
    return chunk


def read_lineidx(path: str) -> Tuple[List[Tuple[int, int]], List[str]]:
    """``([(line number, offset)], [problems])`` of a ``.lineidx`` file (one decimal per line)."""
    entries, problems = [], []
    with open(path, "rb") as f:
        for k, line in enumerate(f):
            text = line.strip()
            if not text:
                continue
            try:
                entries.append((k, int(text)))
            except ValueError:
                problems.append(f"{path}: line {k + 1}: {text[:40]!r} is not a byte offset")
    return entries, problems


def scan_line_starts(path: str, block: int = 1 << 24) -> List[int]:
    """Byte offsets of every line of a text file (a ``.tsv`` without ``.lineidx``)."""
    starts = [0]
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            starts.extend(
                (np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + offset + 1).tolist()
            )
            offset += len(data)
    while starts and starts[-1] >= offset:
        starts.pop()
    return starts


def index_tsv(root: str, rel: str, lineidx_rel: Optional[str]) -> Chunk:
    """Index one TSV shard: per listed line, the JSON field's and the base64 field's byte ranges."""
    chunk = Chunk()
    path = os.path.join(root, rel)
    size = os.path.getsize(path)
    scanned = None
    if lineidx_rel:
        entries, problems = read_lineidx(os.path.join(root, lineidx_rel))
        chunk.skipped.extend(problems)
    else:
        entries = list(enumerate(scanned := scan_line_starts(path)))
    fd = os.open(path, os.O_RDONLY)
    try:
        valid = []
        for k, offset in entries:
            if not 0 <= offset < size:
                chunk.skipped.append(
                    f"{path}: lineidx line {k + 1}: offset {offset} is outside the file "
                    f"({size} bytes)"
                )
            elif offset and os.pread(fd, 1, offset - 1) != b"\n":
                chunk.skipped.append(
                    f"{path}: lineidx line {k + 1}: offset {offset} is not the start of a line"
                )
            else:
                valid.append((k, offset))
        # a line ends where the next one starts: the listed offsets say where when the lineidx is
        # clean (no line read twice); after a bad entry, a line's end is taken from a scan
        if scanned is None and (chunk.skipped or not valid):
            scanned = scan_line_starts(path)
        starts = scanned if scanned is not None else sorted({offset for _, offset in valid})
        for k, offset in valid:
            where = f"{path}: line at byte {offset}"
            after = bisect.bisect_right(starts, offset)
            end = starts[after] if after < len(starts) else size
            if end != size or os.pread(fd, 1, size - 1) == b"\n":
                end -= 1  # the newline
            if end > offset and os.pread(fd, 1, end - 1) == b"\r":
                end -= 1
            if end == offset:  # a blank line: no record
                continue
            want = min(_TSV_FIRST_READ, end - offset)
            while True:
                head = os.pread(fd, want, offset)
                first = head.find(b"\t")
                second = head.find(b"\t", first + 1) if first >= 0 else -1
                if second >= 0 or want >= end - offset:
                    break
                want = min(2 * want, end - offset)
            if second < 0:
                chunk.skipped.append(f"{where}: not 'name<TAB>json<TAB>base64 image'")
                continue
            name = head[:first].decode("utf-8", "replace")
            try:
                _, height, width, masks, fast = scan_record(head[first + 1 : second])
            except RecordError as e:
                chunk.skipped.append(f"{where} ('{name}'): {e}")
                continue
            image_start = offset + second + 1
            if end <= image_start:
                chunk.skipped.append(f"{where} ('{name}'): empty image field")
                continue
            chunk.add(
                name,
                "",
                height,
                width,
                masks,
                fast,
                (offset + first + 1, second - first - 1),
                (image_start, end - image_start),
                empty=count_empty_masks(head[first + 1 : second]),
            )
    finally:
        os.close(fd)
    return chunk
