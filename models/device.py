"""The one device policy, shared by the server (`seglock serve --device`) and training,
evaluation and attacks (`--device`): which specs are accepted and when a device is not there.

    resolve_device("auto")    # cuda (its current device) when CUDA is available, else cpu
    resolve_device("cpu")     # always
    resolve_device("cuda")    # CUDA's current device; DeviceError without CUDA
    resolve_device("cuda:1")  # DeviceError unless this machine has a CUDA device 1
    resolve_device("mps")     # Apple GPUs; DeviceError where MPS is not available

`auto` never picks MPS: some operators the models use fall back to the CPU or are missing there,
so MPS is only used when asked for.
"""

from __future__ import annotations

import re

import torch

from seglock.models.errors import ModelError

__all__ = ["DEVICE_HELP", "DeviceError", "resolve_device"]

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"auto|cpu|cuda(?::(\d{1,4}))?|mps")


class DeviceError(ModelError):
    """A device spec that is malformed or names a device this machine does not have."""


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device for `spec` (see the module doc); DeviceError with one line otherwise."""
    text = str(spec).strip().lower() if isinstance(spec, (str, torch.device)) else None
    match = _SPEC.fullmatch(text) if text is not None else None
    if match is None:
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_HELP}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {spec!r} asked for but MPS is not available")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for but CUDA is not available")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r} is not there: this machine has {count} CUDA device"
                          f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)
