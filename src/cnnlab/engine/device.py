"""Where and in what precision training runs: device and dtype resolution, autocast, synchronisation, seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from cnnlab.errors import OptionError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; an explicit device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OptionError("device", f"{name!r}: not a device name (use auto, cpu, cuda, cuda:N or mps)") from e
    if device.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: torch knows the name, cnnlab cannot train there
        raise OptionError("device", f"{name}: not supported (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError("device", f"{name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError("device", f"{name}: MPS is not available on this machine")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: float32 means no autocast."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass (a no-op in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock reading means it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
