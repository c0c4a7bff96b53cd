"""Checking a device name a user gave (``MODEL.DEVICE``, ``--device``) before anything runs on it.

torch accepts ``torch.device("cuda")`` on a machine without a GPU and fails later, deep inside a
model, with a traceback; entry points call :func:`check_device` first and turn
:class:`DeviceError` into one ``error:`` line and exit status 2.
"""
import re

import torch

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:(\d+))?$")


class DeviceError(ValueError):
    """A device name that is malformed or names hardware this machine does not have."""


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
            raise DeviceError(f"{what} is '{device}' but no GPU is visible on this machine; pass {what} cpu")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"{what} is '{device}' but this machine has {torch.cuda.device_count()} GPU(s)")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"{what} is '{device}' but MPS is not available on this machine; pass {what} cpu")
    return name
