"""Fast start-up: `cnnlab --help`, `--version`, every command's `--help`, `shape` and `kernels` import no torch.

Each command runs in a fresh interpreter (this one has imported torch long ago), which then names the heavy modules
the command left in sys.modules. Timings are in benchmarks/startup.py, not here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
import torchvision

import cnnlab
from cnnlab import cli

HEAVY = ("torch", "torchvision", "fastapi", "matplotlib", "numpy")
# `cnnlab ARGS` in this interpreter; then its exit code and the HEAVY modules it imported, as stderr's last line.
PROBE = f"""
import sys
from cnnlab.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("exit", code, "imported", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command of `parser` as the words that select it: ('train',), ('visualize', 'gradcam')."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*prefix, name), *_commands(sub, (*prefix, name))]
    return found


COMMANDS = _commands(cli.build_parser())  # built with every command's options, so sub-commands are found too
# numpy only: the named kernels are numpy matrices.
NUMPY_OK = {("kernels",), ("kernels", "--json"), ("filter", "--help")}


def imported_by(*args: str) -> list[str]:
    """Run `cnnlab ARGS` in a fresh interpreter; the HEAVY modules it imported. It must succeed."""
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=600, check=False)
    words = (out.stderr.strip().splitlines() or [""])[-1].split()
    assert words[:3] == ["exit", "0", "imported"], out.stderr[-2000:]
    assert out.stdout.strip(), "the command printed nothing"
    return [m for m in words[3:] if not (m == "numpy" and args in NUMPY_OK)]


def test_the_commands_are_found() -> None:
    assert {("train",), ("shape",), ("kernels",), ("visualize", "gradcam"), ("bench", "throughput")} <= set(COMMANDS)
    assert len({c[0] for c in COMMANDS}) == len(cli.COMMANDS)


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("shape", "--input", "3x32x32", "--conv", "6,5,1,2"),
        ("shape", "--input", "3x32x32", "--layers", "conv 6 5; pool max 2; conv 16 5; pool max 2; fc 120; fc 10"),
        ("shape", "--input", "3x32x32", "--pool", "max,2", "--json"),
        ("kernels",),
        ("kernels", "--json"),
    ],
    ids=" ".join,
)
def test_starts_without_torch(args: tuple[str, ...]) -> None:
    assert imported_by(*args) == []


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_command_help_without_torch(command: tuple[str, ...]) -> None:
    assert imported_by(*command, "--help") == []


def test_version_names_the_torch_that_would_be_imported() -> None:
    out = subprocess.run([sys.executable, "-m", "cnnlab", "--version"], capture_output=True, text=True, check=False)
    want = f"cnnlab {cnnlab.__version__} (torch {torch.__version__}, torchvision {torchvision.__version__})\n"
    assert out.returncode == 0 and out.stdout == want


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_a_command_is_listed_always_and_built_alone(name: str) -> None:
    """`cnnlab --help` lists every command with its line; only the command being run gets its options."""
    for only in ([], [name], None):
        parser = cli.build_parser(only)
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        assert list(commands.choices) == list(cli.COMMANDS)
        assert {a.dest: a.help for a in commands._choices_actions}[name] == cli.COMMANDS[name].help
        options = [a.dest for a in commands.choices[name]._actions if a.dest != "help"]
        assert bool(options) == (only is None or name in only), only


def test_the_public_api_is_imported_on_first_use() -> None:
    code = "import sys, cnnlab; cnnlab.__version__; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"
    from cnnlab.api import load_run
    from cnnlab.engine.trainer import fit

    assert cnnlab.fit is fit and cnnlab.load_run is load_run
    assert all(getattr(cnnlab, name) is not None for name in cnnlab.__all__)
    assert set(cnnlab.__all__) <= set(dir(cnnlab))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        cnnlab.nothing  # noqa: B018
