"""Compiled CPU kernels for inference, with the pure-PyTorch code as the fallback.

``cpu_kernels()`` returns the extension module built from ``csrc/cpu_kernels.cpp`` by
``torch.utils.cpp_extension`` (cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), or ``None`` when it cannot be built (no C++ compiler or ninja)
or is switched off with ``UNSAM_CPU_KERNELS=0``. ``scripts/setup.sh`` builds it once at install
time (``python -m unsam.ops``); a later first call that finds no build compiles it then (logged).

Kernels (float32, no autograd: callers use them only when no gradient is needed):

* ``ms_deform_attn_forward(value, spatial_shapes, level_start_index, locations, weights)``:
  multi-scale deformable attention with the arithmetic of the pure-PyTorch path
  (``grid_sample``'s fused multiply-adds, points then levels summed in its order);
* ``resize_threshold(logits (Q, h, w), size_h, size_w, out (Q, H, W) bool) -> boxes (Q, 4)``:
  torch's ``upsample_bilinear2d`` (``align_corners=False``) to (size_h, size_w), top-left crop
  to (H, W), ``> 0``, written into ``out`` without a float full-resolution tensor; the masks'
  XYXY boxes (as ``masks_to_boxes``) come from the same pass.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
_EXTENSION_NAME = "unsam_cpu_kernels"
_UNSET = object()
_module: object = _UNSET


def kernels_enabled() -> bool:
    """False when ``UNSAM_CPU_KERNELS`` is 0/false/no/off (forces the pure-PyTorch paths)."""
    return os.environ.get("UNSAM_CPU_KERNELS", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def _cflags() -> list:
    # The kernels call std::fma to reproduce torch's vectorized CPU arithmetic bit for bit; on
    # x86-64 that is one instruction only with -mfma (else a libm call: same result, slower).
    flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpu_flags = ""
        if " fma " in cpu_flags and " avx2 " in cpu_flags:
            flags += ["-mfma", "-mavx2"]
    return flags


def build_dir() -> Optional[Path]:
    """The folder torch builds and caches the extension in (``TORCH_EXTENSIONS_DIR`` or its
    default), or None when this torch lays its cache out differently."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(_EXTENSION_NAME, verbose=False))
    except Exception:  # noqa: BLE001 - a private torch helper: unknown means "say nothing specific"
        return None


def is_cached(folder: Optional[Path]) -> bool:
    """True when ``folder`` holds a build at least as new as the source (loading it takes ~0.1 s;
    anything else means a compile of 20-40 s)."""
    if folder is None:
        return False
    library = folder / f"{_EXTENSION_NAME}.so"
    try:
        return library.stat().st_mtime >= _SOURCE.stat().st_mtime
    except OSError:
        return False


def _announce_compile() -> None:
    """Say once that the first run compiles, so a 20-40 s silent pause does not look like a hang.

    WARNING, not INFO: the CLIs differ in the level they log at, and Python's last-resort handler
    prints warnings even where logging is not configured."""
    folder = build_dir()
    if not is_cached(folder):
        logger.warning(
            "compiling UnSAM's CPU kernels once (~20-40 s; cached in %s)",
            folder if folder is not None else "TORCH_EXTENSIONS_DIR",
        )


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the extension; raises when it cannot be built."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(
        logging.ERROR
    )  # its "no CUDA runtime" notice
    from torch.utils.cpp_extension import load

    _announce_compile()
    return load(
        name=_EXTENSION_NAME, sources=[str(_SOURCE)], extra_cflags=_cflags(), verbose=verbose
    )


def cpu_kernels() -> Optional[ModuleType]:
    """The compiled kernels, or None (pure-PyTorch fallback). Built at most once per process."""
    global _module
    if not kernels_enabled():
        return None
    if _module is _UNSET:
        try:
            _module = build()
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, bad toolchain: all mean "fallback"
            logger.warning(
                "CPU kernels unavailable (%s: %s); using the pure-PyTorch paths, which are slower",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            _module = None
    return _module  # type: ignore[return-value]
