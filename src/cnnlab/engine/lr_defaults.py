"""The learning-rate range test's defaults, importable without torch (for `cnnlab lr-find --help`)."""

from __future__ import annotations

from pathlib import Path

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
SMOOTHING, DIVERGE = 0.98, 4.0  # EMA decay of the loss; stop when the smoothed loss passes DIVERGE x its minimum
SKIP_START = 0.1  # the first 10% of the steps are left out of the suggestion: the EMA has barely started there


def default_plot_path() -> Path:
    """Where `cnnlab lr-find` writes its plot unless told: lr_find.png in the working directory."""
    return Path("lr_find.png")
