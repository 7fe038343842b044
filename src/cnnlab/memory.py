"""Memory a request needs against memory the machine has: checked before anything big is allocated.

A size a user types (an image side, a batch, a model option) can ask for terabytes; without a check the process is
killed by the kernel's OOM killer with no message, or an allocation fails deep inside torch. Every estimate here is
plain arithmetic on shapes, so it costs nothing and runs before the first byte is allocated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cnnlab.errors import UsageError

# Keep this share of the available memory free for the interpreter, libraries and what the estimates leave out.
HEADROOM = 0.85


def gib(n: float) -> str:
    """Bytes as a short human figure: '3.2 GiB', '512 MiB'."""
    if n >= 2**30:
        return f"{n / 2**30:,.1f} GiB"
    return f"{n / 2**20:,.0f} MiB"


def available_bytes(device: str = "cpu") -> int:
    """Memory that can still be allocated on `device` ('cpu', 'cuda', 'cuda:N', 'mps'): free RAM or free GPU memory."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return _available_ram()


def _available_ram() -> int:
    # MemAvailable: what the kernel can hand out without swapping (page cache included), the number `free` shows.
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
                    break
            else:
                raise OSError
    except (OSError, ValueError, IndexError):
        try:
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 2**62  # unknown (not Linux/Unix): do not refuse on a guess
    return min(ram, _cgroup_limit_left())


def _cgroup_limit_left() -> int:
    """What a container's memory limit (cgroup v2) still allows, or a huge number without one."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return 2**62
    return 2**62 if limit == "max" else max(0, int(limit) - used)


class OutOfMemory(UsageError):
    """A request whose sizes need more memory than the machine has: refused before allocating (exit code 2)."""


def check_fits(what: str, need: int, device: str = "cpu", hint: str = "") -> None:
    """Raise OutOfMemory naming `what`, the bytes it needs and those available, unless it fits with headroom."""
    have = available_bytes(device)
    if need > have * HEADROOM:
        where = "RAM" if not device.startswith(("cuda", "mps")) else f"{device} memory"
        # The hint may mention options ({batch_size}): Python shows the keyword, the command line the flag.
        raise OutOfMemory(
            f"{what} needs about {gib(need)} of {where}, {gib(have)} is available" + (f"; {hint}" if hint else ""),
            options=bool(hint),
        )


@dataclass(frozen=True)
class ModelMemory:
    """What a model needs, in bytes: its parameters, and per image what a training step and an evaluation keep."""

    params: int  # weights alone
    train_per_image: int  # every layer's output (kept for backward) and as much again for its gradient
    eval_per_image: int  # the input and the largest layer output, twice (the next one is made from it)

    def training(self, batch: int, optimizer_states: int) -> int:
        """Bytes of one training step: weights, gradients, optimizer state and the batch's activations."""
        return self.params * (2 + optimizer_states) + self.train_per_image * batch

    def eval_batch_that_fits(self, budget: int, wanted: int) -> int:
        """The largest evaluation batch, at most `wanted`, whose activations fit `budget` bytes beside the weights."""
        return max(1, min(wanted, (budget - self.params) // max(1, self.eval_per_image)))


def model_memory(build: Callable[[], Any], input_shape: tuple[int, int, int]) -> ModelMemory | None:
    """Estimate what the model that `build()` makes needs, without allocating: it runs on PyTorch's meta device.

    None when the model cannot run there (then nothing is refused on a guess).
    """
    import torch

    outputs: list[int] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel() * 4)  # float32 activations

    try:
        with torch.device("meta"):
            model = build()
            leaves = [m for m in model.modules() if not list(m.children())]
            handles = [m.register_forward_hook(hook) for m in leaves]
            try:
                model.eval()(torch.empty(1, *input_shape))
            finally:
                for h in handles:
                    h.remove()
    except Exception:  # a builder or forward the meta device cannot run: no estimate
        return None
    image = 4 * math.prod(input_shape)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelMemory(params, 2 * (sum(outputs) + image), 2 * max(outputs, default=0) + image)
