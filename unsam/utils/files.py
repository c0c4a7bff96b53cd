"""Result files that survive ``kill -9``, and output folders checked before any work is done.

Every result the project writes (SA-1B JSONs, metrics, checkpoints, demo outputs) goes through
:func:`atomic_write`: the bytes go to a hidden temporary file ``.<name>.<random>.tmp`` beside the
target, which is renamed over the target only once complete. A reader, or a resumed run, sees
the old file or the whole new one, never a part. A killed write leaves its temporary file
behind; :func:`remove_stale_temps` removes those of the files a run is about to write.
"""

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import IO, Callable, Dict, Iterable, Iterator

TEMP_SUFFIX = ".tmp"


class OutputError(ValueError):
    """An output location that cannot be written; the message is one line naming it."""


@contextlib.contextmanager
def atomic_write(path, mode: str = "w") -> Iterator[IO]:
    """``with atomic_write(path, "w" | "wb") as f:`` — ``path`` appears only if the block succeeds.

    The file gets the permissions ``open()`` would give it (0666 less the umask), not the 0600
    of :func:`tempfile.mkstemp`. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_target(name: str) -> str:
    """The file a temporary name ``.<target>.<random>.tmp`` was written for ("" if none)."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return ""
    target, sep, _ = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return target if sep else ""


def remove_stale_temps(folder, is_ours: Callable[[str], bool]) -> int:
    """Delete temporary files of killed writes in ``folder`` whose target name ``is_ours``.

    Only the caller's targets: other processes (e.g. other shards) may be writing other files
    into the same folder right now. Returns how many were removed.
    """
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            target = temp_target(entry.name)
            if target and is_ours(target) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def ensure_writable_dir(path) -> Path:
    """Create folder ``path`` if needed and prove it writable; :class:`OutputError` otherwise.

    Writability is tested by creating a file, not with ``os.access``, which says yes to root
    on read-only mounts and knows nothing of full disks or quotas.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder '{path}' is an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to output folder '{path}': {e.strerror or e}") from None
    return path


def create_once(path, text: str) -> bool:
    """Write ``text`` to ``path`` unless ``path`` exists; True if this call wrote it.

    For a record that several processes may try to create at once (shards starting together
    into one folder): the text is written to a temporary file that is then hard-linked to
    ``path``, which fails if another process got there first, so exactly one writer wins and
    no reader sees a part. On a file system without hard links it falls back to a rename:
    still atomic, but the last of two simultaneous writers wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        with open(staged, "x") as f:
            f.write(text)
        try:
            os.link(staged, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system (some FUSE / SMB mounts)
            if path.exists():
                return False
            os.replace(staged, path)
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)


def by_stem(
    files: Iterable[Path], clash: Callable[[str, Path, Path], Exception]
) -> Dict[str, Path]:
    """``{file stem: file}``; two files of one stem raise ``clash(stem, first, second)``.

    Outputs are named, and label files matched, by stem: two inputs of one stem would write or
    match the same thing, so every caller refuses them with its own message.
    """
    stems: Dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise clash(f.stem, stems[f.stem], f)
        stems[f.stem] = f
    return stems
