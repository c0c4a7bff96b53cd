"""Reading ``MODEL.WEIGHTS`` and loading it into a model, with a report of what fitted.

detectron2's ``DetectionCheckpointer`` loads whatever names match and lists the rest over many
log lines, so a checkpoint of another architecture gives a random model that runs and exits 0.
:class:`UnSAMCheckpointer` keeps detectron2's formats (``.pth``, detectron2 / Caffe2 ``.pkl``,
URLs) and conversions, and adds:

* one clear :class:`WeightsError` for a file that is missing, empty, truncated, not a checkpoint
  or unreachable, and for a checkpoint of which no tensor fits the model;
* no code of the file runs while it is read (:func:`read_pickled_weights`, the one reader of
  every weights file of the project): a pickle that calls anything besides the tensor / array
  builders is refused (:class:`UnsafeWeightsError`) unless ``$UNSAM_TRUSTED_WEIGHTS`` names it;
* a :class:`LoadReport` per load (tensors loaded / expected per top-level module, missing and
  wrongly-shaped names), logged as one summary line (the full lists at DEBUG level).

Callers decide what a partial load means: training accepts a backbone-only initialisation,
the predictors refuse a checkpoint without the whole-image tensors they use
(:func:`require_parts`).
"""

import importlib
import importlib.util
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import unsam.compat  # noqa: F401

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

_REMOTE = re.compile(r"^(https?|detectron2|s3|gs)://")
# model-state names first listed when tensors are missing: enough to recognise the part
_NAMES_SHOWN = 3


class WeightsError(ValueError):
    """``MODEL.WEIGHTS`` cannot be used; the message is one line naming the file."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """``MODEL.WEIGHTS`` names a local file that does not exist."""


def check_weights_path(path: str, what: str = "MODEL.WEIGHTS") -> str:
    """Return ``path`` unchanged if it is empty, remote, or an existing file; else raise."""
    if not path or _REMOTE.match(path):
        return path
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"{what} file '{path}' not found")
    return path


def _top_level(name: str) -> str:
    return name.split(".", 1)[0]


@dataclass
class LoadReport:
    """What one checkpoint load put into a model.

    ``expected`` / ``loaded``: tensors per top-level module of the model's ``state_dict``;
    ``missing``: model names left at their initial values (absent from the checkpoint or of the
    wrong shape), ``wrong_shape``: (name, checkpoint shape, model shape), ``unexpected``:
    checkpoint names the model does not have.
    """

    path: str
    expected: Dict[str, int]
    loaded: Dict[str, int]
    missing: List[str] = field(default_factory=list)
    wrong_shape: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return sum(self.loaded.values())

    @property
    def num_expected(self) -> int:
        return sum(self.expected.values())

    def missing_in(self, parts: Sequence[str]) -> List[str]:
        """Missing names that belong to the top-level modules ``parts``."""
        return [n for n in self.missing if _top_level(n) in parts]

    @property
    def backbone_only(self) -> bool:
        """Every backbone tensor loaded and nothing else: a pretrained-backbone start (e.g. the
        published recipe's DINO ResNet-50), whose heads are meant to start from random weights."""
        return (
            self.expected.get("backbone", 0) > 0
            and not self.wrong_shape
            and self.loaded.get("backbone", 0) == self.expected["backbone"]
            and self.num_loaded == self.loaded["backbone"]
        )

    def summary(self) -> str:
        per_part = ", ".join(f"{p} {self.loaded[p]}/{n}" for p, n in self.expected.items())
        text = (
            f"MODEL.WEIGHTS '{self.path}': loaded {self.num_loaded}/{self.num_expected} tensors "
            f"({per_part})"
        )
        if self.backbone_only:
            others = [p for p in self.expected if p != "backbone"]
            text += (
                f": a pretrained-backbone start, as intended; {', '.join(others)} keep their "
                "initial values (the heads train from random weights)"
            )
        if self.wrong_shape:
            text += f"; {len(self.wrong_shape)} skipped for their shape, e.g. " + ", ".join(
                f"{n} {tuple(c)} vs {tuple(m)}" for n, c, m in self.wrong_shape[:_NAMES_SHOWN]
            )
        if self.unexpected:
            counters = sum(n.endswith("num_batches_tracked") for n in self.unexpected)
            if counters == len(self.unexpected):  # FrozenBN keeps no BatchNorm step counter
                text += f"; {counters} BatchNorm num_batches_tracked counters not needed"
            else:
                text += f"; {len(self.unexpected)} checkpoint tensors unused"
        return text


def _fits_nothing_message(report: LoadReport) -> str:
    reason = ""
    if report.wrong_shape:
        reason = (
            f" ({len(report.wrong_shape)} names match with other shapes, e.g. "
            f"{report.wrong_shape[0][0]} {tuple(report.wrong_shape[0][1])} vs "
            f"{tuple(report.wrong_shape[0][2])}: another model size?)"
        )
    elif report.unexpected:
        reason = f" (its names look like '{report.unexpected[0]}': another architecture?)"
    return (
        f"MODEL.WEIGHTS '{report.path}': no tensor fits this model{reason}; "
        "check the config matches the checkpoint"
    )


class UnSAMCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that fails clearly on unusable weights and reports every load.

    After :meth:`load` (or ``resume_or_load``), ``last_report`` is the :class:`LoadReport` of
    the model weights. A load where not one tensor fits raises :class:`WeightsError`.
    """

    last_report: "LoadReport | None" = None

    def load(self, path: str, checkpointables=None):
        self._loading = path
        return super().load(local_weights_path(path) if path else path, checkpointables)

    def _load_file(self, filename: str):
        """Every format detectron2 reads, through :func:`read_checkpoint_file` (no pickle code
        runs)."""
        return read_checkpoint_file(filename)

    def _load_model(self, checkpoint):
        state = checkpoint.get("model")
        if not isinstance(state, dict) or not state:
            raise WeightsError(
                f"MODEL.WEIGHTS '{self._source()}' holds no model tensors "
                f"(top-level keys: {sorted(checkpoint)[:5]})"
            )
        # detectron2's name matching of .pkl files (matching_heuristics) logs a table of every
        # matched name (~70 lines for a ResNet-50) at INFO: the report says the same in one line
        # (its lists at DEBUG)
        matching = logging.getLogger("detectron2.checkpoint.c2_model_loading")
        level = matching.level
        matching.setLevel(logging.WARNING)
        try:
            incompatible = super()._load_model(checkpoint)
        finally:
            matching.setLevel(level)
        self.last_report = _report(self.model, incompatible, self._source())
        if self.last_report.num_loaded == 0:
            raise WeightsError(_fits_nothing_message(self.last_report))
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        report = self.last_report
        logger.info(report.summary())
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("not loaded: %s", report.missing)
            logger.debug("unused checkpoint tensors: %s", report.unexpected)

    def _source(self) -> str:
        return getattr(self, "_loading", None) or "?"


def local_weights_path(path: str, what: str = "MODEL.WEIGHTS") -> str:
    """A weights file (local path or URL, downloaded once) as an existing local path."""
    return fetch_weights(path, what) if _REMOTE.match(path) else check_weights_path(path, what)


def read_weights(path: str, what: str = "MODEL.WEIGHTS") -> Dict:
    """Weights (local path or URL) → checkpoint dict with a ``"model"`` state dict. ``what``
    names the setting in error messages (e.g. ``--divide-weights``)."""
    return read_checkpoint_file(local_weights_path(path, what), what=what)


def load_weights(model: torch.nn.Module, checkpoint: Dict, path: str) -> LoadReport:
    """Load a checkpoint dict already read by :func:`read_weights` into ``model``; log and
    return the :class:`LoadReport` (raises :class:`WeightsError` when no tensor fits)."""
    checkpointer = UnSAMCheckpointer(model)
    checkpointer._loading = path
    incompatible = checkpointer._load_model(dict(checkpoint))  # pops "model" from its argument
    checkpointer._log_incompatible_keys(incompatible)
    return checkpointer.last_report


def fetch_weights(url: str, what: str = "MODEL.WEIGHTS") -> str:
    """Download ``url`` into detectron2's cache and return the local path; one-line errors."""
    from detectron2.utils.file_io import PathManager

    try:
        return PathManager.get_local_path(url)
    except Exception as e:  # noqa: BLE001 — iopath raises bare Exceptions of many kinds for a bad URL
        _remove_download_lock(url)
        name = url.rstrip("/").split("/")[-1] or "weights.pth"
        # offline (CI, clusters without internet) the fix is a local copy, or no weights at all
        hint = (
            f"download it where there is internet and pass the local file ({what} /path/to/{name})"
        )
        if what == "MODEL.WEIGHTS":
            hint += ', or MODEL.WEIGHTS "" to start from random weights'
        raise WeightsError(
            f"{what} '{url}' could not be downloaded ({type(e).__name__}: {_first_line(e)}); {hint}"
        ) from None


def _remove_download_lock(url: str) -> None:
    """Remove the ``<cached file>.lock`` that iopath's HTTP handler leaves after a failed download
    (same cache layout as ``HTTPURLHandler._get_local_path``: cache dir / URL path)."""
    from urllib.parse import urlparse

    from iopath.common.file_io import get_cache_dir

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return
    cached = os.path.join(
        get_cache_dir(), os.path.dirname(parsed.path.lstrip("/")), url.split("/")[-1]
    )
    if not os.path.exists(cached):
        try:
            os.remove(cached + ".lock")
        except FileNotFoundError:
            pass


def read_checkpoint_file(filename: str, what: str = "MODEL.WEIGHTS") -> Dict:
    """A local checkpoint file (``.pth``, detectron2 / Caffe2 ``.pkl``, pycls ``.pyth``) →
    detectron2's checkpoint dict (``{"model": state, ...}``, ``.pkl`` arrays left as numpy for
    ``DetectionCheckpointer._load_model`` to convert and rename).

    Read by :func:`read_pickled_weights`: a file that would run code is refused unless trusted.
    Empty, truncated or foreign files raise :class:`WeightsError`.
    """
    data = read_pickled_weights(filename, what)
    if not isinstance(data, dict):
        raise WeightsError(f"{what} '{filename}' holds a {type(data).__name__}, not a state dict")
    if filename.endswith(".pkl"):
        return _detectron2_pkl_layout(data, filename, what)
    if filename.endswith(".pyth"):
        return _pycls_layout(data, filename, what)
    return data if "model" in data else {"model": data}


def read_pickled_weights(filename: str, what: str = "MODEL.WEIGHTS"):
    """The object pickled in the local weights file ``filename``, read without running its code.

    A pickle may call any Python function while it loads, so a weights file from the internet
    could run anything. Only the builders that checkpoints need are allowed (tensors and
    ``torch.load(weights_only=True)``'s plain types, numpy arrays, the objects listed in
    :data:`_TORCH_SAFE_NAMES`); a file asking for anything else raises
    :class:`UnsafeWeightsError` naming what it asked for, unless the user listed that very file
    in ``$UNSAM_TRUSTED_WEIGHTS``: then it is unpickled in full after a warning.
    """
    size = os.path.getsize(filename)
    if size == 0:
        raise WeightsError(
            f"{what} '{filename}' is empty (0 bytes): an interrupted download or save?"
        )
    try:
        return _read_restricted(filename)
    except _ForeignGlobal as e:
        if not is_trusted_weights(filename):
            raise UnsafeWeightsError(
                f"{what} '{filename}' would run code when read: it calls {e.name}, which weights "
                "do not need; refused (only if you trust this file, add its path to "
                f"{TRUSTED_WEIGHTS_ENV})"
            ) from None
        logger.warning(
            "%s '%s' calls %s while it loads; reading it in full because %s lists it "
            "(this runs code from the file)",
            what,
            filename,
            e.name,
            TRUSTED_WEIGHTS_ENV,
        )
        return _read_unrestricted(filename, what)
    except (
        pickle.UnpicklingError,
        EOFError,
        RuntimeError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        KeyError,
        AssertionError,
        AttributeError,
        ImportError,
        IndexError,
        TypeError,
    ) as e:
        raise WeightsError(
            f"{what} '{filename}' is not a readable checkpoint ({size} bytes, "
            f"truncated or another format?): {type(e).__name__}: {_first_line(e)}"
        ) from None


TRUSTED_WEIGHTS_ENV = "UNSAM_TRUSTED_WEIGHTS"


def is_trusted_weights(filename: str) -> bool:
    """Whether ``$UNSAM_TRUSTED_WEIGHTS`` (paths joined by ``os.pathsep``) names ``filename``.

    Per file, compared as resolved real paths: trusting one download must not open the door to
    every file of a folder, and a symlink or ``..`` must not dodge or fake the match.
    """
    listed = os.environ.get(TRUSTED_WEIGHTS_ENV, "")
    own = os.path.realpath(filename)
    return any(
        os.path.realpath(os.path.expanduser(p.strip())) == own
        for p in listed.split(os.pathsep)
        if p.strip()
    )


class UnsafeWeightsError(WeightsError):
    """A weights file whose pickle calls something besides the array and tensor builders, i.e.
    would run code when read; the message names the call and the opt-in."""


class _ForeignGlobal(pickle.UnpicklingError):
    """The restricted readers met a global outside the allow-list (``name``: module.qualname)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


# what a detectron2 / Caffe2 ``.pkl`` builds: numpy arrays and scalars (numpy 1 and 2 module
# names; ``_frombuffer`` for pickle protocol 5, ``_codecs.encode`` for bytes in protocol 2)
_PKL_SAFE_NAMES = frozenset(
    {
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
        "_codecs.encode",
        "collections.OrderedDict",
    }
)
# besides torch's own weights_only allow-list (tensors, OrderedDict, plain types): numpy arrays
# in older checkpoints, the fvcore schedulers inside LR-scheduler states of detectron2 versions
# that pickled the whole scheduler, and the argparse.Namespace of DINO's full checkpoints.
# Building these runs no code of the file: they are created empty and given their attributes.
_TORCH_SAFE_NAMES = (
    _PKL_SAFE_NAMES - {"_codecs.encode", "collections.OrderedDict"}
    | {
        f"fvcore.common.param_scheduler.{n}ParamScheduler"
        for n in (
            "Constant",
            "Cosine",
            "Exponential",
            "Linear",
            "Composite",
            "MultiStep",
            "PolynomialDecay",
            "Step",
            "StepWithFixedGamma",
        )
    }
    | {"detectron2.solver.lr_scheduler.WarmupParamScheduler", "argparse.Namespace"}
)


class _ArrayUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds only the globals of :data:`_PKL_SAFE_NAMES`."""

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" not in _PKL_SAFE_NAMES:
            raise _ForeignGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _import_name(qualified: str):
    module, _, name = qualified.rpartition(".")
    if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
        module = (
            "numpy._core." + module[len("numpy.core.") :]
        )  # numpy 2 moved them; old names stay in files
    return getattr(importlib.import_module(module), name)


def _torch_safe_globals() -> List:
    """:data:`_TORCH_SAFE_NAMES` as ``torch.serialization.safe_globals`` entries (object, name
    in the file), skipping modules this install lacks."""
    entries = []
    for qualified in sorted(_TORCH_SAFE_NAMES):
        try:
            entries.append((_import_name(qualified), qualified))
        except (ImportError, AttributeError):
            continue
    return entries + _numpy_dtype_classes()


def _numpy_dtype_classes() -> List:
    """numpy >= 1.25 gives each dtype its own class (``numpy.dtypes.Float32DType``), which torch's
    restricted unpickler must be told about to set a dtype's state."""
    try:
        import numpy.dtypes as dtypes
    except ImportError:
        return []
    return [
        c for c in vars(dtypes).values() if isinstance(c, type) and c.__name__.endswith("DType")
    ]


_TORCH_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _read_restricted(filename: str):
    if filename.endswith(".pkl"):
        with open(filename, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(filename, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise
        raise _ForeignGlobal(_refused_global(filename, str(e))) from None


def _refused_global(filename: str, message: str) -> str:
    """What ``torch.load(weights_only=True)`` refused in ``filename``: the file's globals outside
    the allow-list when torch can list them, else the one its message names."""
    try:
        names = sorted(
            n
            for n in torch.serialization.get_unsafe_globals_in_checkpoint(filename)
            if n not in _TORCH_SAFE_NAMES
        )
    except Exception:  # noqa: BLE001 — only zip-format files can be listed
        names = []
    if names:
        return ", ".join(names[:_NAMES_SHOWN]) + (" ..." if len(names) > _NAMES_SHOWN else "")
    found = _TORCH_REFUSED.search(message)
    if found:
        name = found.group(1)
        return name if "." in name else f"builtins.{name}"
    return (
        "an instruction torch refuses in weights ("
        + _first_line(Exception(message.split("WeightsUnpickler error:")[-1]))
        + ")"
    )


def _read_unrestricted(filename: str, what: str):
    """Full unpickling, for files the user trusts (see :func:`is_trusted_weights`) only."""
    try:
        if filename.endswith(".pkl"):
            with open(filename, "rb") as f:
                return pickle.load(f, encoding="latin1")
        return torch.load(filename, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 — unpickling arbitrary files fails in arbitrary ways
        raise WeightsError(
            f"{what} '{filename}' is not a readable checkpoint: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from None


def _detectron2_pkl_layout(data: Dict, filename: str, what: str) -> Dict:
    """A ``.pkl`` in detectron2's model-zoo layout as is; a Caffe2 / Detectron1 one (``blobs``
    or a bare name → array dict) wrapped for detectron2's Caffe2 name matching."""
    if "model" in data and "__author__" in data:
        logger.info("%s '%s': reading a file from '%s'", what, filename, data["__author__"])
        return data
    blobs = data.get("blobs", data)
    if not isinstance(blobs, dict):
        raise WeightsError(
            f"{what} '{filename}': 'blobs' is a {type(blobs).__name__}, not a dict of arrays"
        )
    model = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
    return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}


def _pycls_layout(data: Dict, filename: str, what: str) -> Dict:
    if not isinstance(data.get("model_state"), dict):
        raise WeightsError(f"{what} '{filename}': a .pyth (pycls) checkpoint needs 'model_state'")
    model = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": "pycls", "matching_heuristics": True}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _report(model: torch.nn.Module, incompatible, path: str) -> LoadReport:
    expected: Dict[str, int] = OrderedDict()
    for name in model.state_dict():
        expected[_top_level(name)] = expected.get(_top_level(name), 0) + 1
    wrong = [(n, tuple(c), tuple(m)) for n, c, m in incompatible.incorrect_shapes]
    missing = list(dict.fromkeys(list(incompatible.missing_keys) + [n for n, _, _ in wrong]))
    loaded = OrderedDict((p, n) for p, n in expected.items())
    for name in missing:
        loaded[_top_level(name)] -= 1
    return LoadReport(
        path, dict(expected), dict(loaded), missing, wrong, list(incompatible.unexpected_keys)
    )


def require_parts(
    report: LoadReport, required: Sequence[str], what: str, optional: Sequence[str] = ()
) -> None:
    """Refuse weights that load nothing of a ``required`` top-level module; warn once when
    tensors of ``required`` or ``optional`` modules are missing (they keep their initial values).

    ``what`` names the user of the weights in the messages (e.g. "whole-image segmentation").
    """
    empty = [p for p in required if report.loaded.get(p, 0) == 0 and report.expected.get(p, 0) > 0]
    if empty:
        raise WeightsError(
            f"MODEL.WEIGHTS '{report.path}' has no tensor of {', '.join(empty)}, which {what} "
            f"needs (loaded {report.num_loaded}/{report.num_expected}): a checkpoint of another "
            "architecture?"
        )
    missing = report.missing_in([*required, *optional])
    if missing:
        logger.warning(
            "MODEL.WEIGHTS '%s' lacks %d tensors that %s uses; they keep their random initial "
            "values: %s%s",
            report.path,
            len(missing),
            what,
            ", ".join(missing[:_NAMES_SHOWN]),
            " ..." if len(missing) > _NAMES_SHOWN else "",
        )
