"""Data-parallel scaling: training images/s with 1, 2, ... processes under torchrun, on CPU (gloo) or GPUs (nccl).

    python benchmarks/ddp_scaling.py --data fashion-mnist (CPU processes: 1 and 2, or up to --max-procs)
    python benchmarks/ddp_scaling.py --device cuda        (one process per GPU)

Each point runs `cnnlab train --devices N` (torchrun underneath) on --data (default mnist-mini; fashion-mnist gives
longer, steadier epochs) with lenet5-modern (or --model),
per-process batch --batch-size, for --epochs epochs, --seeds seeds, without and with --scale-lr; images/s is the
training split size over the median epoch time after the first epoch (which includes warm-up), of the point's fastest
run. Throughput is the whole job's, all processes together. Test accuracy is the mean over seeds, with its range.
Every run prints a `run {...}` line to stderr; `--replay LOG` renders the section from a saved log of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine_line, write_section

OPTIONS = ("device", "model", "data", "batch_size", "epochs")  # what a run line records, so a replay renders it


def run_point(nproc: int, args: argparse.Namespace, tmp: Path, scale_lr: str = "none", seed: int = 0) -> dict:
    """One `cnnlab train --devices N [--scale-lr RULE] --seed S` run; its images/s and test accuracy."""
    name = f"p{nproc}-{scale_lr}-s{seed}"
    cmd = [sys.executable, "-m", "cnnlab", "train", "--devices", str(nproc), "--model", args.model,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device,
           "--data", args.data, "--runs-dir", str(tmp), "--name", name, "--patience", "0", "--quiet",
           "--json", "--scale-lr", scale_lr, "--seed", str(seed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    config = json.loads((tmp / name / "config.json").read_text())
    with open(tmp / name / "metrics.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    epoch_s = statistics.median(seconds[1:] or seconds)
    point = {"procs": nproc, "scale_lr": scale_lr, "seed": seed, "epoch_s": epoch_s, "test_acc": result["test_acc"],
             "train_size": config["data"]["train_size"], "global_batch": config["runtime"]["global_batch"],
             **{k: getattr(args, k) for k in OPTIONS}, "machine": machine_line(), "cores": os.cpu_count()}  # fmt: skip
    print(f"run {json.dumps(point)}", file=sys.stderr, flush=True)  # --replay reads these lines back
    return point


def accuracy(runs: list[dict]) -> str:
    """Mean test accuracy over seeds, with the range when there are several."""
    accs = [r["test_acc"] for r in runs]
    mean = f"{statistics.mean(accs):.2%}"
    return mean if len(accs) == 1 else f"{mean} ({min(accs):.2%}-{max(accs):.2%})"


def replayed(log: Path) -> tuple[list[dict], argparse.Namespace]:
    """The run lines of a saved log, and the options they were measured with (which must agree)."""
    runs = [json.loads(line[4:]) for line in log.read_text().splitlines() if line.startswith("run {")]
    if not runs:
        raise SystemExit(f"--replay {log}: no `run {{...}}` lines in it")
    keys = (*OPTIONS, "machine", "cores")
    kinds = {tuple(r.get(k) for k in keys) for r in runs}
    rules = {r["scale_lr"] for r in runs} - {"none"}
    if len(kinds) > 1 or len(rules) > 1:
        raise SystemExit(f"--replay {log}: its runs differ in options, machine or --scale-lr rule (one run's log only)")
    got = argparse.Namespace(**dict(zip(keys, kinds.pop(), strict=True)), scale_lr=rules.pop() if rules else "linear")
    got.seeds = len({r["seed"] for r in runs})
    got.max_procs = max(r["procs"] for r in runs)
    return runs, got


def main() -> None:
    """Measure each process count over seeds (or replay a log of them) and write the RESULTS.md section."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    ap.add_argument("--max-procs", type=int, default=2, help="largest process count (powers of two up to it)")
    ap.add_argument("--model", default="lenet5-modern")
    ap.add_argument("--data", default="mnist-mini", help="dataset (fashion-mnist gives longer, steadier epochs)")
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per point: accuracy is their mean (and range)")
    ap.add_argument("--scale-lr", default="linear", choices=("linear", "sqrt"),
                    help="the rule also measured for N > 1 (linear measured best for short AdamW runs)")  # fmt: skip
    ap.add_argument("--replay", type=Path, metavar="LOG",
                    help="render the section from a finished run's `run {...}` lines (its options and machine), "
                         "without training")  # fmt: skip
    args = ap.parse_args()
    if args.seeds < 1 or args.max_procs < 1:
        ap.error("--seeds and --max-procs must be at least 1")
    replay = args.replay
    if replay:
        runs, args = replayed(replay)
        machine, cores = runs[0]["machine"], runs[0]["cores"]
    counts = [n for n in (1, 2, 4, 8, 16) if n <= args.max_procs]
    seeds = range(args.seeds)
    # (processes, rule, seed) of every run: without the rule at each count, then with it where N > 1.
    wanted = [
        (n, rule, s) for rule in ("none", args.scale_lr) for n in counts for s in seeds if n > 1 or rule == "none"
    ]
    if not replay:
        machine, cores = machine_line(), os.cpu_count()
        with tempfile.TemporaryDirectory() as tmp:
            runs = [run_point(n, args, Path(tmp), rule, s) for n, rule, s in wanted]
    pick = {(r["procs"], r["scale_lr"], r["seed"]): r for r in runs}
    if missing := [key for key in wanted if key not in pick]:
        raise SystemExit(f"--replay {replay}: no run for (processes, --scale-lr, seed) {missing[0]}")
    points = {n: [pick[n, "none", s] for s in seeds] for n in counts}
    scaled = {n: [pick[n, args.scale_lr, s] for s in seeds] for n in counts if n > 1}
    # Speed from every run of a point (with and without the rule: the same work per step): the fastest run's median
    # epoch, since on a shared VM other tenants only ever slow a run down (seen: the same run at 12 and 19 s/epoch).
    speed = {n: min(r["epoch_s"] for r in points[n] + scaled.get(n, [])) for n in counts}
    size = points[counts[0]][0]["train_size"]  # training images per epoch
    base = size / speed[counts[0]]
    single = statistics.mean(r["test_acc"] for r in points[counts[0]])
    gap = {n: statistics.mean(r["test_acc"] for r in scaled[n]) - single for n in scaled}
    lines = [
        f"Command: `python benchmarks/ddp_scaling.py --device {args.device} --max-procs {args.max_procs} --data "
        f"{args.data} --epochs {args.epochs} --batch-size {args.batch_size} --seeds {args.seeds} --scale-lr "
        f"{args.scale_lr}`: {args.model} on {args.data}, {args.batch_size} images per process per step, "
        f"{args.epochs} epochs, seeds {', '.join(map(str, seeds))}; images/s from the median epoch after the first, "
        "of the fastest run of a point. Threads per process: cores / N. Test accuracy: the mean over seeds "
        f"(lowest-highest). The last columns: the same runs with `--scale-lr {args.scale_lr}` (the peak lr grows "
        "with N), and its mean's distance from one process.",
        "",
        f"Machine: {machine}" + (f" (rendered by --replay from that run's log, {replay.name})" if replay else ""),
        "",
        "| processes | global batch | epoch s | images/s | speed-up | test accuracy | "
        f"with --scale-lr {args.scale_lr} | vs 1 process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {n} | {points[n][0]['global_batch']} | {speed[n]:.2f} | {size / speed[n]:,.0f} | "
          f"{size / speed[n] / base:.2f}x | {accuracy(points[n])} | "
          f"{accuracy(scaled[n]) if n in scaled else ''} | {f'{gap[n] * 100:+.2f} points' if n in gap else ''} |"
          for n in counts),
    ]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    write_section(f"Data-parallel scaling ({args.device}, {cores} cores)", body)


if __name__ == "__main__":
    main()
