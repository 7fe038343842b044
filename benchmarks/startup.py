"""Start-up time and peak memory of commands that need no torch, against `python -c "import torch"` in the same run.

    python benchmarks/startup.py [--repeats 7] [--before SRC]

Each command runs as a user runs it (the `cnnlab` console script, else `python -m cnnlab`), with this checkout's
src/ first on PYTHONPATH. The rounds interleave the commands, so a busy moment of a shared machine hits all of
them alike; a warm-up round fills the file cache first. Wall time is the median over the rounds; peak RSS comes from
wait4() of each child. `--before SRC` runs the same commands on another source tree too (say the commit before
lazy imports: `git archive 298603a src | tar -x -C /tmp/before`, then `--before /tmp/before/src --label 298603a`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LENET = "conv 6 5; pool max 2; conv 16 5; pool max 2; fc 120; fc 84; fc 10"
COMMANDS = {
    "cnnlab --version": ["--version"],
    "cnnlab --help": ["--help"],
    "cnnlab train --help": ["train", "--help"],
    f"cnnlab shape --input 3x32x32 --layers '{LENET}'": ["shape", "--input", "3x32x32", "--layers", LENET],
    "cnnlab kernels": ["kernels"],
}
TARGET = 0.2  # --version and --help: at most this fraction of `import torch`


def cnnlab_command() -> list[str]:
    """The console script beside this Python, as `pip install` writes it; `python -m cnnlab` without one."""
    script = Path(sys.executable).with_name("cnnlab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cnnlab"]


def run_once(argv: list[str], src: Path) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of one run of `argv` with `src` first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {child.returncode} (PYTHONPATH {src})")
    return seconds, usage.ru_maxrss / 1024  # Linux: ru_maxrss is in KiB


def measure(trees: dict[str, Path], repeats: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(tree, command) -> [(seconds, MiB)] over interleaved rounds; the tree '' holds `import torch`."""
    runs: list[tuple[str, str, list[str], Path]] = [("", "import torch", [sys.executable, "-c", "import torch"], SRC)]
    for tree, src in trees.items():
        runs += [(tree, name, cnnlab_command() + args, src) for name, args in COMMANDS.items()]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {(t, n): [] for t, n, _, _ in runs}
    for round_ in range(repeats + 1):
        for tree, name, argv, src in runs:
            sample = run_once(argv, src)
            if round_:  # round 0 warms the file cache
                results[tree, name].append(sample)
        print(f"round {round_}/{repeats} done", file=sys.stderr)
    return results


def main() -> None:
    """Measure, print and write the section of RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (7)")
    parser.add_argument("--before", type=Path, default=None, metavar="SRC", help="another src/ to compare with")
    parser.add_argument("--label", default=None, help="what --before is, for RESULTS.md (its commit)")
    args = parser.parse_args()
    trees = {"now": SRC} | ({"before": args.before.resolve()} if args.before else {})
    load = os.getloadavg()[0]
    results = measure(trees, args.repeats)
    load = max(load, os.getloadavg()[0])
    # Imported only now: it imports torch, and a child's peak RSS (wait4) starts from its parent's at fork.
    from _common import machine_line, write_section

    torch_s, torch_mib = (statistics.median(v) for v in zip(*results["", "import torch"], strict=True))

    def cells(tree: str, name: str) -> list[str]:
        seconds, mib = (statistics.median(v) for v in zip(*results[tree, name], strict=True))
        return [f"{seconds:.3f}", f"{seconds / torch_s:.2f}x", f"{mib:.0f}"]

    names = list(trees)[::-1]  # before, now
    header = ["command"] + [f"{t} {c}" for t in names for c in ("s", "/ import torch", "peak RSS MiB")]
    rows = [[f"`{name}`", *(c for t in names for c in cells(t, name))] for name in COMMANDS]
    rows.append(['`python -c "import torch"`', *([f"{torch_s:.3f}", "1.00x", f"{torch_mib:.0f}"] * len(names))])
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    print(table)
    fast = all(statistics.median(s for s, _ in results["now", n]) <= TARGET * torch_s for n in list(COMMANDS)[:2])
    verdict = f"--version and --help {'within' if fast else 'NOT within'} {TARGET}x of `import torch`"
    print(verdict)
    before = f" `before` is {args.label or args.before}, `now` this checkout." if args.before else ""
    body = f"""Wall time of commands that need no torch, as the `cnnlab` console script runs them (median of
{args.repeats} interleaved rounds after a warm-up round), beside `python -c "import torch"` in the same run, and the
peak resident memory of each process (wait4). Command: `python benchmarks/startup.py --repeats {args.repeats}`.{before}
`train --help` still imports torch: its options come from engine/trainer.py and engine/recipes.py.

Machine: {machine_line()}; load average up to {load:.1f} during the run (other jobs shared the cores)

{table}

Target: {verdict}.
"""
    write_section("Start-up: commands that need no torch", body)
    print("written to RESULTS.md")


if __name__ == "__main__":
    main()
