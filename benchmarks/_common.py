"""Shared by the benchmark scripts: the machine description and the RESULTS.md section writer."""

from __future__ import annotations

import re
import sys
from datetime import date
from pathlib import Path

from cnnlab.engine import bench

RESULTS = Path(__file__).with_name("RESULTS.md")


def say(line: str) -> None:
    """A progress line on stderr, at once (stdout stays for results)."""
    print(line, file=sys.stderr, flush=True)


def machine_line() -> str:
    """One line naming the date, hardware and software a result was measured with."""
    return f"{date.today().isoformat()}; {bench.machine_line()}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of RESULTS.md with `body`."""
    header = "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    block = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text.rstrip() + "\n")
