"""Time to accuracy and throughput: cnnlab's recipes against the lecture's peer loop, over seeds.

    python benchmarks/speed.py train        # --recipe fast vs the peer, time to 91%, 3 seeds     (~9 min, 2 cores)
    python benchmarks/speed.py budget       # --recipe accurate --time-budget 175, 3 seeds          (~9 min)
    python benchmarks/speed.py long         # --recipe accurate --time-budget 595, --long-seeds N (3) (~10 min each)
    python benchmarks/speed.py throughput   # the recipes' nets (and ResNet-50 on a GPU) vs the matmul peak (~3 min)
    python benchmarks/speed.py all

Fashion-MNIST must be present (apt install dataset-fashion-mnist, or --data-dir). Each writes its section of
RESULTS.md: the date, machine, versions, per-seed numbers, means, and the peer's numbers from the same run. The
sections of train, budget and long are named after the CPU and precision, so a later run on the same kind of machine
replaces them; `--label 'a slower VM'` adds the label to those names, so that a second machine of the same kind (two
VMs of one CPU model at different speeds) gets sections of its own. `--precision fp32` forces the fp32 path on a
machine whose recipes would run bf16 (its sections say fp32). The throughput section is named after the machine
alone (CPU, its widest matrix instructions, cores, GPU): it measures both precisions.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _common import machine_line, say, write_section

from cnnlab.engine.bench import ThroughputConfig, TrainBenchConfig, bench_train, recipe_config, throughput
from cnnlab.engine.recipes import get_recipe
from cnnlab.engine.trainer import fit


def where(args: argparse.Namespace, precision: str) -> str:
    """The machine part of a section's title: CPU, cores, GPU, precision, and --label if given.

    One section per CPU and precision: the recipes must hold on each (an Intel Xeon with AMX, AMD EPYCs with and
    without AVX-512), so a run on one machine does not overwrite another's. --label keeps apart two machines that
    read the same, such as two VMs of one CPU model that run at different speeds.
    """
    label = f", {args.label}" if args.label else ""
    return f"{machine_name()}, {precision}{label}"


def machine_name() -> str:
    """The machine in a section's title: CPU with its widest matrix instructions, cores, GPU."""
    return machine_line().split("; ")[1]


def forced(args: argparse.Namespace) -> tuple[str, str]:
    """For a section's text: the command-line words that force a precision, and the note after it ('' for neither
    where the recipe chose)."""
    return (f" --precision {args.precision}", " (forced)") if args.precision else ("", "")


def run_train(args: argparse.Namespace) -> None:
    """Section 'Time to 91%': the fast recipe and the peer, back to back per seed."""
    cfg = TrainBenchConfig(data_dir=args.data_dir, target=args.target, recipe="fast", seeds=tuple(range(args.seeds)),
                           device=args.device, precision=args.precision)  # fmt: skip
    r = bench_train(cfg, say)
    ours, peer = r["cnnlab"], r["peer"]
    rows = ["| seed | cnnlab test acc | cnnlab seconds | peer epochs to target | peer seconds to target "
            "| peer s/epoch |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for o, p in zip(ours["runs"], peer["runs"], strict=True):
        got = f"{p['seconds_to_target']:.1f}" if p["seconds_to_target"] else f"not in {len(p['curve'])} epochs"
        rows.append(f"| {o['seed']} | {o['test_acc']:.2%} | {o['seconds']:.1f} | {len(p['curve'])} | {got} | "
                    f"{p['curve'][0]['seconds']:.1f} |")  # fmt: skip
    ours_t, peer_t = ours["mean_seconds_to_target"], peer["mean_seconds_to_target"]
    verdict = (f"**cnnlab reaches {args.target:.0%} in {ours_t:.1f} s on average, the peer in {peer_t:.1f} s: "
               f"{r['speedup']:.1f}x sooner ({ours_t / peer_t:.3f} of the peer's time; issue #19's target <= 1/16 = "
               f"0.0625).**"
               if ours_t and peer_t
               else "**The target was not reached by every seed of both (see the table).**")  # fmt: skip
    curves = "; ".join(f"seed {p['seed']}: " + ", ".join(f"{c['test_acc']:.2%}@{c['seconds']:.0f}s" for c in p["curve"])
                       for p in peer["runs"])  # fmt: skip
    precision = ours["runs"][0]["precision"]
    flag, how = forced(args)
    write_section(
        f"Time to 91% on Fashion-MNIST: cnnlab --recipe fast vs the peer loop ({where(args, precision)})",
        f"""
Command: `cnnlab bench train --data fashion-mnist --target {args.target} --seeds {args.seeds}{flag}` (run by
`python benchmarks/speed.py train{flag}`). Machine: {machine_line()}

cnnlab: `cnnlab train --data fashion-mnist --recipe fast` ({get_recipe("fast").summary}; {precision} on this
machine{how}), one test evaluation at the end. Its seconds are the whole `fit()`
(model build, training, test evaluation); loading the dataset took {r["load_seconds"]:.2f} s before it. The peer:
torchvision `FashionMNIST` + `DataLoader(ToTensor, Normalize)`, batch 64, conv32-BN-pool + conv64-BN-pool + dense
128 (421,834 parameters), Adam 1e-3, a test evaluation after every epoch; its seconds count from its first step and
include those evaluations.

{chr(10).join(rows)}

Means: cnnlab {ours["mean_test_acc"]:.2%} in {ours["mean_seconds"]:.1f} s; peer {peer["mean_seconds_per_epoch"]:.1f} s
per epoch. Peer test accuracy after each epoch: {curves}.

{verdict}
""",
    )


def _train_rows(results: list[Any]) -> tuple[list[str], float, float]:
    rows = ["| seed | test acc | seconds | epochs | steps |", "| --- | --- | --- | --- | --- |"]
    for seed, res in results:
        rows.append(f"| {seed} | {res.test_acc:.2%} | {res.seconds:.1f} | {res.epochs_run} | {res.steps} |")
    return rows, statistics.fmean(r.test_acc for _, r in results), statistics.fmean(r.seconds for _, r in results)


def run_budget(args: argparse.Namespace, budget: float, seeds: int, section: str, target: float, limit: int) -> None:
    """Sections for `--recipe accurate --time-budget B`: `target` accuracy (mean of seeds) within `limit` seconds."""
    if seeds < 1:
        raise SystemExit("speed.py: --seeds and --long-seeds must be at least 1")
    bench = TrainBenchConfig(data_dir=args.data_dir, recipe="accurate", time_budget=budget, device=args.device,
                             precision=args.precision)  # fmt: skip
    results = []
    for seed in range(seeds):
        cfg = recipe_config(bench, seed)  # fit() loads the dataset: the budget counts its loading, as the CLI's does
        say(f"seed {seed}: cnnlab train --recipe accurate --time-budget {budget:g} ...")
        res = fit(cfg, runs_dir=None)
        say(f"seed {seed}: {res.test_acc:.2%} in {res.seconds:.1f} s")
        results.append((seed, res))
    rows, mean_acc, mean_total = _train_rows(results)
    flag, how = forced(args)
    section = f"{section} ({where(args, cfg.precision)})"
    met = mean_acc >= target and mean_total <= limit
    lowest = min(r.test_acc for _, r in results)
    goal = (f"Target: >= {target:.1%} within {limit} s: **{'met' if met else 'NOT met'}** (mean {mean_acc:.2%}, lowest "
            f"seed {lowest:.2%}, in a mean {mean_total:.1f} s).")  # fmt: skip
    write_section(
        section,
        f"""
Command: `cnnlab train --data fashion-mnist --recipe accurate --time-budget {budget:g} --seed N{flag}` (run
by `python benchmarks/speed.py {args.which}{flag}`). Machine: {machine_line()}

The recipe: {get_recipe("accurate").summary}; all 60,000 training images; {cfg.precision} on this machine{how}.
The time budget times a few steps, then plans the one-cycle schedule to end within it, and re-plans a quarter into
the first epoch, after every epoch, and inside an epoch when the steps slow down enough to end late, at the pace
measured (so runs differ in steps when the machine's speed drifts). Seconds are the whole `fit()`: loading the
dataset, timing, training, evaluation (Python start-up, ~3 s, comes before it).

{chr(10).join(rows)}

{goal}
""",
    )


def run_throughput(args: argparse.Namespace) -> None:
    """Section 'Training throughput' of this machine: the recipes' nets (and ResNet-50 at 224 on a GPU) vs the
    matmul peak, in bf16 and fp32."""
    import torch

    def case(model: str, precision: str, channels_last: bool = True, **model_args: Any) -> ThroughputConfig:
        return ThroughputConfig(model=model, batch_size=128, precision=precision, channels_last=channels_last,
                                device=args.device, seconds=5.0, model_args=model_args)  # fmt: skip

    nets = [("cnn-fast (the default, 16-64-128)", {})] + [
        (f"`{name}` recipe's net", dict(get_recipe(name).settings["model_args"])) for name in ("fast", "accurate")
    ]
    cases = [(label, case("cnn-fast", p, **kw)) for label, kw in nets for p in ("bf16", "fp32")]
    cases.append(("cnn-fast (the default, 16-64-128)", case("cnn-fast", "fp32", channels_last=False)))
    if torch.cuda.is_available():
        cases.append(("resnet50", ThroughputConfig(model="resnet50", batch_size=256, image_size=224, channels=3,
                                                   num_classes=1000, precision="bf16", channels_last=True,
                                                   device="cuda", seconds=10.0)))  # fmt: skip
    rows = ["| model | options | batch | input | device, precision | layout | images/s | GFLOP/s | fp32 matmul peak "
            "| of fp32 peak | of peak at its precision |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    # A shared VM's speed drifts, by up to 2x within minutes: the cases take turns, `--repeats` rounds of them, so a
    # slow stretch is spread over the cases rather than falling on one, and each row gives the median round and range.
    runs: list[list[dict[str, Any]]] = [[] for _ in cases]
    for round_ in range(args.repeats):
        for (label, c), got in zip(cases, runs, strict=True):
            say(f"round {round_ + 1}/{args.repeats}: {label} batch {c.batch_size} {c.precision} ...")
            got.append(throughput(c))
    # The matmul peak is the device's, not the case's: the best of every measurement on that device (per precision),
    # so one product timed in a slow moment does not put a case above "100% of the peak".
    peaks: dict[tuple[str, str], float] = {}
    for r in (r for got in runs for r in got):
        for key, value in (("float32", r["matmul_peak_fp32_gflops_s"]), (r["precision"], r["matmul_peak_gflops_s"])):
            peaks[r["device"], key] = max(peaks.get((r["device"], key), 0.0), value)
    for (label, c), got in zip(cases, runs, strict=True):
        r = sorted(got, key=lambda x: x["images_per_s"])[(len(got) - 1) // 2]  # the median; the lower of two middles
        low, high = min(x["images_per_s"] for x in got), max(x["images_per_s"] for x in got)
        spread = f" ({low:,.0f}-{high:,.0f})" if len(got) > 1 else ""
        opts = ",".join(f"{k}={v}" for k, v in c.model_args.items()) or "-"
        peak32, peak = peaks[r["device"], "float32"], peaks[r["device"], r["precision"]]
        rows.append(f"| {label} | {opts} | {r['batch_size']} | {r['channels']}x{r['image_size']}x{r['image_size']} | "
                    f"{r['device']} {r['precision']} | {'NHWC' if r['channels_last'] else 'NCHW'} | "
                    f"{r['images_per_s']:,.0f}{spread} | {r['achieved_gflops_s']:,.0f} | {peak32:,.0f} | "
                    f"{r['achieved_gflops_s'] / peak32:.0%} | {r['achieved_gflops_s'] / peak:.0%} |")  # fmt: skip
    gpu = "" if torch.cuda.is_available() else (
        "\nGPU targets of issue #19 (Fashion-MNIST >= 94% in <= 5 s and ResNet-50 224x224 AMP channels-last >= 3,000 "
        "images/s on one H100/H200): **not measured** - this run had no GPU.\n")  # fmt: skip
    if runs[0][0]["device"].startswith("cuda"):
        bf16 = "on a GPU, bf16 products run on its tensor cores, far above its fp32 rate."
    else:
        isa = runs[0][0]["machine"]["cpu_isa"]  # the machine the rounds ran on, as each result records it
        units = {"AMX": "the CPU's AMX tile units", "AVX-512 BF16": "AVX-512 BF16 dot-product instructions"}.get(isa)
        bf16 = (f"bf16 products run on {units}, so the bf16 peak is above the fp32 one." if units else
                "this CPU has no native bf16 instructions: oneDNN emulates bf16, slower than fp32, which is why the "
                "recipes use fp32 here.")  # fmt: skip
    write_section(
        f"Training throughput vs the matmul peak ({machine_name()})",
        f"""
Command: `cnnlab bench throughput --model cnn-fast --batch-size 128 --precision bf16 --channels-last` and variants
(`--model-args` for the recipes' nets; run by `python benchmarks/speed.py throughput`). Machine: {machine_line()}

Training steps (forward, backward, SGD step) on synthetic 1x28x28 batches after a warm-up, at least 5 s each;
{args.repeats} rounds of all the cases in turn. images/s: the median round (the range over the rounds); GFLOP/s:
that round's, counting 3x the forward FLOPs. The fp32 matmul peak is the best fp32 matrix product (n = 2048 on a CPU,
8192 on a GPU) of all the rounds on the device; the last column divides by the best product in the case's precision:
{bf16}

{chr(10).join(rows)}
{gpu}""",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=("train", "budget", "long", "throughput", "all"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="throughput: rounds of all the cases (the median is shown)")
    p.add_argument("--long-seeds", type=int, default=3)
    p.add_argument("--target", type=float, default=0.91)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="override the recipes' precision (bf16 where native, else fp32): fp32 times that path on a "
                   "CPU with native bf16")  # fmt: skip
    p.add_argument(
        "--label",
        default="",
        help="added to the section titles, to keep apart two machines that read the "
        "same (e.g. 'a slower VM'); the sections of train, budget and long",
    )
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.which in ("train", "all"):
        run_train(args)
    if args.which in ("budget", "all"):
        run_budget(args, 175.0, args.seeds, "94% within 3 minutes: --recipe accurate --time-budget 175", 0.94, 180)
    if args.which in ("long", "all"):
        section = "95% within 10 minutes: --recipe accurate --time-budget 595"
        run_budget(args, 595.0, args.long_seeds, section, 0.95, 600)
    if args.which in ("throughput", "all"):
        run_throughput(args)


if __name__ == "__main__":
    main()
