"""`cnnlab bench train|throughput`: argument parsing and printing; the measuring lives in engine/bench.py."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cnnlab.cli_common import EXIT_OK, float_in, int_at_least, parse_model_args, positive_float


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`cnnlab bench` and its two measurements."""
    from cnnlab.engine.config import PRECISIONS
    from cnnlab.engine.recipes import list_recipes

    p = sub.add_parser("bench", description="Speed measurements. Every result names the machine (CPU, cores, GPU), "
                       "torch version and threads. Longer runs over seeds: the scripts in benchmarks/.")  # fmt: skip
    bsub = p.add_subparsers(dest="bench_command", metavar="MEASUREMENT", required=True)

    t = bsub.add_parser(
        "train",
        help="time to a test accuracy: a cnnlab recipe vs. the lecture's torchvision DataLoader loop",
        description="Train cnnlab's recipe and the peer loop (torchvision dataset + DataLoader(ToTensor, Normalize), "
        "batch 64, 2-conv+BN+pool CNN with 32/64 maps, Adam 1e-3, test evaluation after every epoch) back to back, "
        "and print the time each needs to reach --target test accuracy, and the ratio.",
    )
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist or kmnist (fashion-mnist)")
    t.add_argument("--data-dir", default=None, help="look here first for the dataset files")
    t.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="download if missing (on)")
    t.add_argument("--target", type=float_in(0, 1, hi_open=False), default=0.91, help="test accuracy (0.91)")
    t.add_argument("--recipe", choices=list_recipes(), default="fast", help="cnnlab's recipe (fast)")
    t.add_argument("--epochs", type=int_at_least(1), default=None, help="override the recipe's epochs")
    t.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="plan the recipe's schedule to this many seconds instead")  # fmt: skip
    t.add_argument("--seeds", type=int_at_least(1), default=1, help="seeds 0..N-1, each run by both (1)")
    t.add_argument("--device", default="auto", help="device for cnnlab's recipe (auto); the peer runs on the CPU")
    t.add_argument("--precision", choices=[p for p in PRECISIONS if p != "auto"], default=None,
                   help="override the recipe's (bf16 where native, else fp32); fp32 times that path")  # fmt: skip
    t.add_argument("--no-peer", dest="peer", action="store_false", help="time cnnlab's recipe only")
    t.add_argument("--peer-max-epochs", type=int_at_least(1), default=8, help="stop the peer after N epochs (8)")
    t.add_argument("--json", action="store_true", help="print one JSON document")
    t.set_defaults(func=cmd_bench_train)

    q = bsub.add_parser(
        "throughput",
        help="images/s and GFLOP/s of one model on synthetic data, beside the matmul peak",
        description="Train steps (forward, backward, SGD step) or inference on random data after a warm-up; "
        "achieved GFLOP/s counts 3x the forward FLOPs for training. The fp32 matmul peak (and the peak at the "
        "precision used) is measured in the same run.",
    )
    q.add_argument("--model", default="cnn-fast", help="a registered model (cnn-fast)")
    q.add_argument("--model-args", default=None, metavar="K=V,...", help="builder options")
    q.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per step (64)")
    q.add_argument("--image-size", type=int_at_least(1), default=None, help="side (the model's default)")
    q.add_argument("--channels", type=int_at_least(1), default=None, help="input channels (the model's default)")
    q.add_argument("--num-classes", type=int_at_least(1), default=10, help="classes (10)")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True, help="training steps (default)")
    mode.add_argument("--infer", dest="train", action="store_false", help="inference only")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    q.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast dtype (auto: bf16 on CUDA)")
    q.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    q.add_argument("--compile", action="store_true", help="torch.compile the model first")
    q.add_argument("--seconds", type=positive_float, default=3.0, help="measure at least this long (3)")
    q.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed steps first (3)")
    q.add_argument("--json", action="store_true", help="print one JSON document")
    q.set_defaults(func=cmd_bench_throughput)


def _say(args: argparse.Namespace) -> Any:
    return None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))


def cmd_bench_train(args: argparse.Namespace) -> int:
    """`cnnlab bench train`."""
    from cnnlab.engine.bench import TrainBenchConfig, bench_train, machine_line

    cfg = TrainBenchConfig(
        data=args.data, data_dir=args.data_dir, download=args.download, target=args.target, recipe=args.recipe,
        seeds=tuple(range(args.seeds)), epochs=args.epochs, time_budget=args.time_budget, device=args.device,
        precision=args.precision, peer=args.peer, peer_max_epochs=args.peer_max_epochs,
    )  # fmt: skip
    result = bench_train(cfg, _say(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(f"machine: {machine_line(result['machine'])}")
    target = f"{result['target']:.1%}"
    ours = result["cnnlab"]
    for r in ours["runs"]:
        epochs = f"{r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}"
        print(f"cnnlab --recipe {result['recipe']} seed {r['seed']}: {r['test_acc']:.2%} in {r['seconds']:.1f} s "
              f"({epochs}, {r['steps']} steps, {r['precision']})")  # fmt: skip
    ours_t = ours["mean_seconds_to_target"]
    print(f"cnnlab: mean {ours['mean_test_acc']:.2%} in {ours['mean_seconds']:.1f} s; "
          + (f"{target} reached by every seed, mean {ours_t:.1f} s" if ours_t else f"{target} NOT reached by every "
             "seed"))  # fmt: skip
    if "peer" in result:
        peer = result["peer"]
        for p in peer["runs"]:
            got = f"{target} at {p['seconds_to_target']:.1f} s" if p["seconds_to_target"] else f"{target} not reached"
            print(f"peer seed {p['seed']}: {got} (epoch {len(p['curve'])}: {p['test_acc']:.2%})")
        peer_t = peer["mean_seconds_to_target"]
        print(
            f"peer: {f'mean {peer_t:.1f} s to {target}' if peer_t else f'{target} not reached by every seed'}, "
            f"{peer['mean_seconds_per_epoch']:.1f} s per epoch"
        )
        if result.get("speedup"):
            print(f"cnnlab reaches {target} {result['speedup']:.1f}x sooner than the peer "
                  f"({ours_t / peer_t:.3f} of its time)")  # fmt: skip
        else:
            print(f"no ratio: {target} was not reached by every seed of both")
    return EXIT_OK


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    """`cnnlab bench throughput`."""
    from cnnlab.engine.bench import ThroughputConfig, machine_line, throughput

    cfg = ThroughputConfig(
        model=args.model, batch_size=args.batch_size, image_size=args.image_size, channels=args.channels,
        num_classes=args.num_classes, train=args.train, device=args.device, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile, seconds=args.seconds, warmup=args.warmup,
        model_args=parse_model_args(args.model_args),
    )  # fmt: skip
    r = throughput(cfg)
    if args.json:
        print(json.dumps(r, indent=2))
        return EXIT_OK
    what = "training" if r["train"] else "inference"
    print(f"machine: {machine_line(r['machine'])}")
    print(f"{r['model']} {what}, batch {r['batch_size']} x {r['channels']}x{r['image_size']}x{r['image_size']}, "
          f"{r['device']} {r['precision']}{', channels-last' if r['channels_last'] else ''}"
          f"{', compiled' if r['compile'] else ''}: {r['images_per_s']:,.0f} images/s")  # fmt: skip
    print(f"{r['achieved_gflops_s']:,.1f} GFLOP/s achieved ({r['forward_gflops_per_image'] * 1e3:.2f} MFLOP forward "
          f"per image{', x3 for training' if r['train'] else ''}); fp32 matmul peak "
          f"{r['matmul_peak_fp32_gflops_s']:,.0f} GFLOP/s -> {r['fraction_of_fp32_peak']:.0%} of it")  # fmt: skip
    if r["precision"] != "float32":
        print(f"{r['precision']} matmul peak {r['matmul_peak_gflops_s']:,.0f} GFLOP/s -> "
              f"{r['fraction_of_peak']:.0%} of it")  # fmt: skip
    return EXIT_OK
