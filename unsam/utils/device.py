"""Checking a device name a user gave (``MODEL.DEVICE``, ``--device``) before anything runs on it.

``MODEL.DEVICE`` defaults to "auto" (the same default on every machine);
:func:`resolve_device` turns it into "cuda" or "cpu" when the config is loaded.

torch accepts ``torch.device("cuda")`` on a machine without a GPU and fails later, deep inside a
model, with a traceback; entry points call :func:`check_device` first and turn
:class:`DeviceError` into one ``error:`` line and exit status 2.
"""

import re

import torch

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:(\d+))?$")


class DeviceError(ValueError):
    """A device name that is malformed or names hardware this machine does not have."""


def resolve_device(device: str) -> str:
    """``device`` as torch takes it: "auto" is "cuda" when a GPU is visible, else "cpu"; any other
    name is returned as given (stripped), for :func:`check_device` to judge."""
    name = str(device).strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(device: str, what: str = "MODEL.DEVICE") -> str:
    """Return ``device`` unchanged if this machine can run on it, else raise :class:`DeviceError`.

    ``what`` names the setting in the message (``MODEL.DEVICE``, ``--device``).
    """
    name = str(device).strip()
    match = _DEVICE.match(name)
    if match is None:
        raise DeviceError(f"{what} '{device}' is not a device name (cpu, cuda, cuda:N)")
    kind, index = match.group(1), match.group(3)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{what} is '{device}' but no GPU is visible on this machine; pass {what} cpu"
            )
        if index is not None and int(index) >= torch.cuda.device_count():
            raise DeviceError(
                f"{what} is '{device}' but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(
                f"{what} is '{device}' but MPS is not available on this machine; pass {what} cpu"
            )
    return name
