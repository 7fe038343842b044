"""Checks for builder options (`--model-args`): types, sane bounds, and the memory the weights will take.

An option typed on the command line arrives as an int, a float or a string (`cnnlab.cli.parse_model_args`); a
builder names the option in every refusal, and refuses sizes that cannot be built before allocating any of it.
"""

from __future__ import annotations

import math

import torch

from cnnlab.errors import UsageError
from cnnlab.memory import check_fits

MAX_CHANNELS = 2**20  # feature maps per layer; beyond this no 3x3 conv fits in any machine's memory
MAX_CONV_LAYERS = 1000  # conv layers in one of cnnlab's own models: deeper ones take minutes just to build


def whole_number(model: str, option: str, value: object, at_least: int = 1) -> int:
    """An int option: 32 or 32.0 -> 32; 'x', nan, 2.5 or a value below `at_least` -> UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value % 1:
        raise UsageError(f"{model}: {option} must be a whole number, got {value!r}")
    if value < at_least:
        raise UsageError(f"{model}: {option} must be at least {at_least}, got {int(value)}")
    return int(value)


def fraction(model: str, option: str, value: object) -> float:
    """A probability option in [0, 1) (dropout) -> float; anything else -> UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise UsageError(f"{model}: {option} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_weights_fit(what: str, params: int) -> None:
    """Refuse a model whose float32 weights alone need more memory than the device it is built on has free."""
    device = torch.get_default_device()
    # A model built on the meta device (shapes only) is built for real later, on the CPU first.
    check_fits(f"{what} ({params:,} parameters)", 4 * params, "cpu" if device.type == "meta" else str(device))
