"""Time and accuracy of the Quickstart's `cnnlab train` (LeNet-5 on mnist-mini), as a user runs it, over seeds.

python benchmarks/quickstart.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from _common import machine_line, write_section


def main() -> None:
    """Run `cnnlab train --seed S --json` per seed and record wall time, fit time and test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "cnnlab", "train", "--seed", str(seed), "--json", "--quiet"],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=True,
            )
            wall = time.perf_counter() - t0
        doc = json.loads(out.stdout)
        rows.append((seed, doc["test_acc"], doc["best_epoch"], doc["epochs_run"], doc["seconds"], wall))
        print(f"seed {seed}: test acc {doc['test_acc']:.2%}, fit {doc['seconds']:.1f} s, command {wall:.1f} s")
    accs, fits, walls = ([r[i] for r in rows] for i in (1, 4, 5))
    table = "\n".join(f"| {s} | {a:.2%} | {b} / {e} | {f:.1f} | {w:.1f} |" for s, a, b, e, f, w in rows)
    body = f"""`cnnlab train` with no options: lenet5-modern on mnist-mini (3,600 train / 400 validation / 1,000
test digits), 40 epochs, AdamW + one-cycle, label smoothing 0.1, shift augmentation.
Command: `python benchmarks/quickstart.py`.

Machine: {machine_line()}

| seed | test accuracy | best / epochs | fit seconds | command seconds (with start-up) |
| --- | --- | --- | --- | --- |
{table}
| **mean** | **{statistics.mean(accs):.2%}** | | **{statistics.mean(fits):.1f}** | **{statistics.mean(walls):.1f}** |
"""
    write_section("Quickstart: cnnlab train", body)
    print(f"mean test accuracy {statistics.mean(accs):.2%}; written to RESULTS.md")


if __name__ == "__main__":
    main()
