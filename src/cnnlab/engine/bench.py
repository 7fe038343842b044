"""Speed measurements behind `cnnlab bench`: the machine, its matmul peak, model throughput, time to accuracy.

Every result carries `machine_info()`, so a number is never separated from the hardware and versions it came from.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import cnnlab
from cnnlab.engine.config import TrainConfig
from cnnlab.engine.device import autocast, resolve_device, resolve_precision, synchronize
from cnnlab.engine.trainer import fit
from cnnlab.errors import UsageError
from cnnlab.memory import check_fits, model_memory
from cnnlab.models.registry import create_model, model_info


def _cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo ("model name", "flags"), or None where there is none."""
    try:
        match = re.search(rf"^{field}\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def cpu_model() -> str:
    """The CPU's name, from /proc/cpuinfo where there is one."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_matrix_isa() -> str:
    """The CPU's widest matrix/vector instructions (AMX, AVX-512 BF16, AVX-512, AVX2): what decides bf16's speed.

    Two CPUs that report the same model name in a VM ("AMD EPYC") can differ here, and with it whether bf16 is native.
    """
    flags = set((_cpuinfo("flags") or "").split())  # x86 Linux; elsewhere (macOS, ARM's "Features") torch's answer
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return torch.backends.cpu.get_cpu_capability()  # e.g. "AVX2", or "DEFAULT" on a CPU it has no kernels for


def machine_info() -> dict[str, Any]:
    """CPU, cores available to this process, GPUs, and the versions of Python, torch, torchvision and cnnlab."""
    import torchvision

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_isa": cpu_matrix_isa(),
        "cores": cores,
        "gpus": gpus,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cnnlab": cnnlab.__version__,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """The machine in one line, for printed results."""
    m = info or machine_info()
    gpu = ", ".join(m["gpus"]) or "no GPU"
    isa = f" ({m['cpu_isa']})" if m.get("cpu_isa") else ""
    return (f"{m['cpu']}{isa}, {m['cores']} cores, {gpu}; torch {m['torch']} ({m['torch_threads']} threads), "
            f"torchvision {m['torchvision']}, Python {m['python']}, cnnlab {m['cnnlab']}")  # fmt: skip


def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                seconds: float = 1.0) -> float:  # fmt: skip
    """Dense matrix-multiply GFLOP/s of an n x n product (n = 2048 on CPU, 8192 on GPU), best of repeated runs.

    On CPU n = 2048 already reaches the cores' rate (2-core AMD EPYC, fp32: 116 GFLOP/s at 2048, 91 at 4096) at an
    eighth of the work per product, so the peak costs about a second instead of five.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: library initialisation, kernel selection
    synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best / 1e9


@dataclasses.dataclass
class ThroughputConfig:
    """What `cnnlab bench throughput` measures: one model, one batch shape, training or inference."""

    model: str = "cnn-fast"
    batch_size: int = 64
    image_size: int | None = None  # None: the model's default
    channels: int | None = None  # None: the model's default
    num_classes: int = 10
    train: bool = True  # forward + backward + optimizer step; False: forward only, no grad
    device: str = "auto"
    precision: str = "auto"  # as TrainConfig.precision
    channels_last: bool = False
    compile: bool = False
    seconds: float = 3.0  # measure for at least this long after warm-up
    warmup: int = 3  # untimed steps first
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)


def throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    """Images/s and achieved GFLOP/s of a model on synthetic data, with the fp32 matmul peak measured beside it.

    Training FLOPs count 3x the forward (the backward computes gradients for inputs and weights).
    """
    info = model_info(cfg.model)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    size = cfg.image_size or info.default_image_size
    channels = cfg.channels or info.default_in_channels
    if cfg.batch_size < 1 or cfg.seconds <= 0 or cfg.warmup < 0:
        raise UsageError("--batch-size must be >= 1, --seconds > 0 and --warmup >= 0")
    flops = _checked_forward_flops(cfg, channels, size, device)
    step = _bench_step(cfg, channels, size, device, dtype)
    steps, elapsed = _timed_steps(step, cfg, device)
    images_s = steps * cfg.batch_size / elapsed
    achieved = images_s * flops * (3 if cfg.train else 1) / 1e9
    peak32 = matmul_peak(device, torch.float32)
    peak = matmul_peak(device, dtype) if dtype != torch.float32 else peak32
    return {
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "model_args"},
        "model_args": dict(cfg.model_args), "image_size": size, "channels": channels, "device": str(device),
        "precision": str(dtype).replace("torch.", ""), "steps": steps, "elapsed_s": elapsed, "images_per_s": images_s,
        "forward_gflops_per_image": flops / 1e9, "achieved_gflops_s": achieved, "matmul_peak_fp32_gflops_s": peak32,
        "fraction_of_fp32_peak": achieved / peak32, "machine": machine_info(), "matmul_peak_gflops_s": peak,
        "fraction_of_peak": achieved / peak,
    }  # fmt: skip


def _checked_forward_flops(cfg: ThroughputConfig, channels: int, size: int, device: torch.device) -> int:
    """Forward FLOPs of one image, after checking on the meta device that the measured steps fit in memory."""
    from cnnlab.inspect.zoo import count_macs

    shape = (channels, size, size)
    with torch.device("meta"):  # options and sizes checked, FLOPs and memory measured: nothing allocated yet
        probe = create_model(cfg.model, cfg.num_classes, channels, size, **cfg.model_args)
    need = _throughput_bytes(probe, shape, cfg)
    if need is not None:
        what = "training" if cfg.train else "inference"
        check_fits(f"bench throughput of {cfg.model} (batch {cfg.batch_size} x {channels}x{size}x{size}, {what})",
                   need, str(device))  # fmt: skip
    return 2 * count_macs(probe, shape)


def _bench_step(cfg: ThroughputConfig, channels: int, size: int, device: torch.device, dtype: torch.dtype
                ) -> Callable[[], None]:  # fmt: skip
    """One measured step on a fixed synthetic batch: a forward pass, or a full SGD training step."""
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.num_classes, channels, size, **cfg.model_args).to(device)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    x = torch.randn(cfg.batch_size, channels, size, size, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    run = torch.compile(model) if cfg.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if cfg.train else None
    scaler = torch.amp.GradScaler(device.type) if cfg.train and dtype == torch.float16 else None
    model.train(cfg.train)

    def step() -> None:
        if opt is None:
            with torch.no_grad(), autocast(device, dtype):
                run(x)
            return
        with autocast(device, dtype):
            loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return step


def _timed_steps(step: Callable[[], None], cfg: ThroughputConfig, device: torch.device) -> tuple[int, float]:
    """(steps, seconds) after the warm-up, synchronising every 5 steps until cfg.seconds have passed."""
    for _ in range(cfg.warmup):
        step()
    synchronize(device)
    steps, t0 = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if steps % 5 == 0 or cfg.seconds < 0.5:
            synchronize(device)
            if time.perf_counter() - t0 >= cfg.seconds:
                break
    return steps, time.perf_counter() - t0


def _throughput_bytes(probe: torch.nn.Module, shape: tuple[int, int, int], cfg: ThroughputConfig) -> int | None:
    """Peak bytes of the measured steps (SGD with momentum: one state per weight); None if it cannot be told."""
    est = model_memory(lambda: probe, shape)
    if est is None:
        return None
    if cfg.train:
        return est.training(cfg.batch_size, optimizer_states=1)
    return est.params + est.eval_per_image * cfg.batch_size


# --- time to accuracy ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainBenchConfig:
    """What `cnnlab bench train` races: a cnnlab recipe against the peer loop, over seeds, to a test accuracy."""

    data: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = True
    target: float = 0.91
    recipe: str = "fast"
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None  # None: the recipe's own
    time_budget: float | None = None  # seconds: plan the recipe's schedule to this budget instead of epochs
    device: str = "auto"
    precision: str | None = None  # None: the recipe's own (bf16 where native); "fp32" forces the fp32 path
    peer: bool = True  # also run the peer loop (CPU, as a student runs it)
    peer_max_epochs: int = 8  # give up on the peer after this many epochs


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def recipe_config(cfg: TrainBenchConfig, seed: int) -> TrainConfig:
    """The TrainConfig of one seed of `cfg.recipe`: the recipe's options, with what `cfg` sets winning over them."""
    from cnnlab.engine.recipes import apply_recipe

    base = TrainConfig(data=cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=seed, device=cfg.device)
    keep = {"data", "data_dir", "download", "seed", "device"}
    if cfg.epochs is not None:
        base.epochs = cfg.epochs
        keep.add("epochs")
    if cfg.time_budget is not None:
        base.time_budget = cfg.time_budget
    if cfg.precision is not None:
        base.precision = cfg.precision
        keep.add("precision")
    return apply_recipe(base, cfg.recipe, keep=keep)


def _recipe_run(cfg: TrainBenchConfig, seed: int, dataset: Any, say: Callable[[str], None]) -> dict[str, Any]:
    """One seed of cnnlab's recipe: test accuracy, seconds, and the seconds to the target if it was reached."""
    train_cfg = recipe_config(cfg, seed)
    say(f"seed {seed}: cnnlab --recipe {cfg.recipe} ...")
    r = fit(train_cfg, runs_dir=None, dataset=dataset)
    say(f"seed {seed}: cnnlab {r.test_acc:.2%} in {r.seconds:.1f} s")
    return {
        "seed": seed, "test_acc": r.test_acc, "seconds": r.seconds, "epochs": r.epochs_run, "steps": r.steps,
        "seconds_to_target": r.seconds if r.test_acc >= cfg.target else None, "precision": train_cfg.precision,
    }  # fmt: skip


def bench_train(cfg: TrainBenchConfig, on_event: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time to `target` test accuracy for cnnlab's recipe and the peer loop, back to back for each seed."""
    from cnnlab.data.sources import load_dataset
    from cnnlab.engine.peer import PEER_DATASETS, run_peer

    say = on_event or (lambda _: None)
    if not 0.0 <= cfg.target <= 1.0:
        raise UsageError(f"--target must be an accuracy in [0, 1], got {cfg.target}")
    if cfg.peer and cfg.data not in PEER_DATASETS:
        raise UsageError(f"--data {cfg.data}: the peer loop runs on {', '.join(PEER_DATASETS)}; add --no-peer")
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.data, cfg.data_dir, download=cfg.download)
    load_s = time.perf_counter() - t0
    ours, peers = [], []
    for seed in cfg.seeds:
        ours.append(_recipe_run(cfg, seed, dataset, say))
        if cfg.peer:
            say(f"seed {seed}: peer loop (torchvision DataLoader, batch 64, Adam 1e-3) ...")
            p = run_peer(cfg.data, cfg.data_dir, target=cfg.target, max_epochs=cfg.peer_max_epochs, seed=seed,
                         download=cfg.download,
                         on_epoch=lambda row: say(f"  peer epoch {row['epoch']}: {row['test_acc']:.2%} at "
                                                  f"{row['seconds']:.1f} s"))  # fmt: skip
            peers.append(p)
    ours_t = [r["seconds_to_target"] for r in ours if r["seconds_to_target"] is not None]
    peer_t = [p["seconds_to_target"] for p in peers if p["seconds_to_target"] is not None]
    result: dict[str, Any] = {
        "benchmark": "train",
        "data": cfg.data,
        "target": cfg.target,
        "recipe": cfg.recipe,
        "seeds": list(cfg.seeds),
        "load_seconds": load_s,
        "cnnlab": {
            "runs": ours,
            "mean_test_acc": _mean([r["test_acc"] for r in ours]),
            "mean_seconds": _mean([r["seconds"] for r in ours]),
            "reached": len(ours_t) == len(ours),
            "mean_seconds_to_target": _mean(ours_t) if len(ours_t) == len(ours) else None,
        },
        "machine": machine_info(),
    }
    if cfg.peer:
        result["peer"] = {
            "runs": peers,
            "reached": len(peer_t) == len(peers),
            "mean_seconds_to_target": _mean(peer_t) if len(peer_t) == len(peers) else None,
            "mean_seconds_per_epoch": _mean([p["curve"][0]["seconds"] for p in peers if p["curve"]]),
        }
        a, b = result["cnnlab"]["mean_seconds_to_target"], result["peer"]["mean_seconds_to_target"]
        result["speedup"] = b / a if a and b else None
    return result
