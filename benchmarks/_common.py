"""Shared by the benchmark scripts: the machine description and the RESULTS.md section writer."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

import torch
import torchvision

import cnnlab

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line naming the hardware and software a result was measured with."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{date.today().isoformat()}; {cpu_model()}, {os.cpu_count()} cores, {gpu}; "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, "
        f"cnnlab {cnnlab.__version__}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of RESULTS.md with `body`."""
    header = "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    block = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text.rstrip() + "\n")
