"""Kill `cnnlab train` with SIGKILL at random moments, resume each time, and check the result is bit-exact.

    python benchmarks/kill_resume.py [--kills 10] [--seed 0]

An uninterrupted run and an interrupted one (same options, --checkpoint-every 7) must end with identical
weights, optimizer state and metrics. Writes the counts to RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine_line, write_section

from cnnlab.engine.checkpoint import load_checkpoint

OPTIONS = ["--epochs", "40", "--batch-size", "32", "--checkpoint-every", "7", "--augment", "crop,rotate,erase",
           "--quiet"]  # fmt: skip


def train(cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start `cnnlab train` in the background."""
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def main() -> None:
    """Run the kill/resume loop and record what happened."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        assert train(cwd, *OPTIONS, "--name", "straight").wait() == 0
        proc, kills, steps = train(cwd, *OPTIONS, "--name", "killed"), 0, []
        run = cwd / "runs" / "killed"
        while kills < args.kills and not (run / "results.json").exists():
            time.sleep(rng.uniform(3.2, 5.0))  # start-up takes ~3 s; the kill lands anywhere after it
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                ckpt = run / "last.ckpt"
                steps.append(load_checkpoint(ckpt)["step"] if ckpt.exists() else 0)
                print(f"kill {kills}: last checkpoint at step {steps[-1]}")
            if not (run / "results.json").exists():
                proc = train(cwd, "--resume", str(run), "--quiet")
        assert proc.wait() == 0
        a, b = load_checkpoint(cwd / "runs/straight/last.ckpt"), load_checkpoint(run / "last.ckpt")
        exact = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        exact &= all(
            torch.equal(x, y)
            for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values(), strict=True)
        )
        strip = lambda p: [r.rsplit(",", 2)[0] for r in p.read_text().splitlines()]  # noqa: E731
        exact &= strip(cwd / "runs/straight/metrics.csv") == strip(run / "metrics.csv")
        total = b["step"]
    print(f"{kills} kills, resumed {kills} times; bit-exact: {exact}")
    body = f"""`cnnlab train {" ".join(OPTIONS)}` (LeNet-5 on mnist-mini, {total} steps) killed with SIGKILL
{kills} times at random moments and resumed with `--resume` after each kill; compared with the same run left
alone. Command: `python benchmarks/kill_resume.py --kills {args.kills} --seed {args.seed}`.

Machine: {machine_line()}

- kills: {kills}; checkpoint step at each kill: {", ".join(map(str, steps))}
- final weights, optimizer state and metrics.csv identical to the uninterrupted run: **{exact}**
"""
    write_section("Reliability: kill -9 and resume", body)


if __name__ == "__main__":
    main()
