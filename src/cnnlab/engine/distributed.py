"""Data-parallel training through PyTorch's own engine: torchrun's environment, the process group, DDP.

`torchrun --nproc-per-node N -m cnnlab train ...` sets RANK, WORLD_SIZE, LOCAL_RANK (and the rendezvous); this
module reads them, starts the process group (nccl on CUDA, gloo on CPU), picks each process's device and sums
metrics across processes. A single process (no torchrun) sees world_size 1 and every function is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cnnlab.errors import UsageError

T = TypeVar("T")

FAULT_ENV = "CNNLAB_FAULT_AT_STEP"  # testing torchrun restarts: rank 1 dies at this step on the first attempt


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0


def env() -> DistEnv:
    """Read torchrun's variables; a plain `cnnlab train` is rank 0 of 1."""
    try:
        return DistEnv(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as e:
        raise UsageError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None


def setup(requested_device: str) -> tuple[DistEnv, str]:
    """Start the process group if torchrun launched us; return the environment and this process's device name."""
    e = env()
    if not e.enabled:
        return e, requested_device
    use_cuda = requested_device != "cpu" and not requested_device.startswith("mps") and torch.cuda.is_available()
    if use_cuda:
        if e.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {e.local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(e.local_rank)
        device = f"cuda:{e.local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        # A long timeout: rank 0 may spend minutes decoding an image folder while the others wait at a barrier.
        timeout = datetime.timedelta(minutes=30)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # After a torchrun restart the agent's store can still hold the dead attempt's addresses (seen here: gloo
        # connecting to a port of a killed worker); keys prefixed by the attempt number cannot be stale.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"cnnlab/attempt_{attempt}", store)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        global _STARTED_A_GROUP
        _STARTED_A_GROUP = True
    return e, device


_STARTED_A_GROUP = False  # set once this process has opened a process group (cli.entry then ends it with os._exit)


def started_a_group() -> bool:
    """Whether this process opened a process group (it is then a data-parallel worker until it exits)."""
    return _STARTED_A_GROUP


# What a collective raises on a surviving worker when another one has gone: gloo's socket errors (only with gloo in
# the message: a "Connection reset by peer" from an HTTP logger is not a lost peer) and NCCL's remote-error reports.
# A timeout is not one of them: a worker stuck in a collective has no peer whose own error would say why.
_GLOO_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
_NCCL_GONE = ("ncclRemoteError", "remote process exited", "NCCL communicator was aborted")


def peer_lost(error: BaseException) -> str | None:
    """One line for a collective that failed because another worker stopped, or None for any other error."""
    if not _STARTED_A_GROUP:
        return None
    text = str(error)
    gloo = "gloo" in text and any(marker in text for marker in _GLOO_GONE)
    if isinstance(error, dist.DistNetworkError) or gloo or any(marker in text for marker in _NCCL_GONE):
        return (
            "another process of the data-parallel group stopped, so this one cannot go on (that process's own error "
            "says why; with torchrun --max-restarts and --resume auto the group restarts from the last checkpoint)"
        )
    return None


def is_initialized() -> bool:
    """Whether a process group exists (started by us or by the caller)."""
    return dist.is_available() and dist.is_initialized()


def teardown(finished: bool = True) -> None:
    """Leave the process group (end of training, success or failure)."""
    if not is_initialized():
        return
    if finished:
        # Gloo's worker threads drop a finished collective's tensors a moment after the caller's wait() returns, and
        # that needs the GIL. The group outlives destroy_process_group() (DDP keeps a reference), so a thread still
        # waiting for the GIL when Python finalises is killed and the process aborts ("terminate called without an
        # active exception", SIGABRT) after training succeeded. Waiting here releases the GIL until every rank
        # arrives, and the threads finish. Not after an error: a peer may be inside another collective, and closing
        # our connections is what ends its wait.
        with contextlib.suppress(RuntimeError):  # a peer has already gone (it failed): nothing left to wait for
            barrier()
    dist.destroy_process_group()


def all_sum(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over all processes (one collective); unchanged in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    flat = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values])
    if flat.device.type == "cpu" or dist.get_backend() != "nccl":
        flat = flat.cpu()
    dist.all_reduce(flat)
    return list(flat.unbind())


def all_rows(value: torch.Tensor) -> torch.Tensor:
    """The rows (N_r, ...) of every process concatenated in rank order, on the CPU; as is in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value.detach().cpu())
    return torch.cat(parts)


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def from_rank0(value: T) -> T:
    """Rank 0's value (any picklable object) on every rank, so that all follow one decision; as is in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def maybe_inject_fault(step: int, e: DistEnv) -> None:
    """For the restart test: with $CNNLAB_FAULT_AT_STEP set, rank 1 dies at that step, on the first attempt only."""
    at = os.environ.get(FAULT_ENV)
    if at and e.rank == 1 and step == int(at) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        # Said before dying: which process the launcher reports first is a race (rank 0 may fail on the broken
        # connection before the agent sees rank 1's exit), so the restart test looks for this line.
        print(f"cnnlab: injected fault: rank 1 exits with code 17 at step {step} ({FAULT_ENV})", file=sys.stderr)
        sys.stderr.flush()
        os._exit(17)


# --- launching: `cnnlab train --devices N` ---------------------------------------------------------------------------

REPORT_ENV = "CNNLAB_WORKER_REPORTS"  # a folder where workers we launched leave their error, instead of on stderr


@dataclass(frozen=True)
class WorkerFailure:
    """Why a job of workers ended: the worker to blame, its one-line error and its exit code."""

    rank: int
    exit_code: int
    message: str


def report_failure(message: str, exit_code: int, internal: bool) -> bool:
    """In a worker launched by `launch`: leave the error for the launcher (which prints it once); True if left."""
    folder = os.environ.get(REPORT_ENV)
    if not folder or not env().enabled:
        return False
    record = {"rank": env().rank, "exit_code": exit_code, "message": message, "internal": internal,
              "time": time.time()}  # fmt: skip
    try:
        with open(os.path.join(folder, f"rank-{env().rank}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
    except OSError:
        return False
    return True


def launch(torchrun_args: list[str]) -> WorkerFailure | None:
    """Run torchrun's own launcher in this process with `torchrun_args`; None on success, else the root failure.

    torchrun itself would end a failed job with its own traceback and every worker's copy of the error. Here the
    workers leave their errors in a folder, and the launcher picks the one that caused the others: a named error
    before an internal one (a peer's "connection closed" follows the real failure), then the earliest.
    """
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet = [logging.getLogger(n) for n in ("torch.distributed.run", "torch.distributed.elastic",
                                             "torch.distributed.launcher")]  # fmt: skip
    levels = [lg.level for lg in quiet]
    with tempfile.TemporaryDirectory(prefix="cnnlab-workers-") as folder:
        os.environ[REPORT_ENV] = folder
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)  # torchrun's warnings and failure tables: the one line below says it
        try:
            run(parse_args(torchrun_args))
            return None
        except ChildFailedError as e:
            return _root_failure(folder, e.failures)
        finally:
            os.environ.pop(REPORT_ENV, None)
            for lg, level in zip(quiet, levels, strict=True):
                lg.setLevel(level)


def _root_failure(folder: str, failures: dict[int, Any]) -> WorkerFailure:
    reports = []
    for name in os.listdir(folder):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                reports.append(json.load(f))
        except (OSError, ValueError):
            continue
    named = sorted((r for r in reports if not r["internal"]), key=lambda r: r["time"])
    if named:
        r = named[0]
        return WorkerFailure(r["rank"], r["exit_code"], r["message"])
    reported = {r["rank"] for r in reports}
    silent = sorted(rank for rank in failures if rank not in reported)
    if silent:  # a worker that died without a word (killed, os._exit): the others only lost their peer
        # torchrun ends the surviving workers with SIGTERM once one fails: the worker that failed on its own (an
        # abort, a kill -9, an exit code) is the cause, whatever its rank.
        rank = min(silent, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, r))
        code = failures[rank].exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return WorkerFailure(rank, 1 if code < 0 else code, f"worker rank {rank} {how} without an error message")
    r = min(reports, key=lambda r: r["time"])
    return WorkerFailure(r["rank"], r["exit_code"], r["message"])
