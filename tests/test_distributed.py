"""Data-parallel training with torchrun on CPU (gloo): two processes, as CI can run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.data import BatchLoader, ImageSet, Normalization
from cnnlab.engine.inference import evaluate_run, load_run

TRAIN = ["train", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--quiet", "--json"]


def torchrun(*args: str, cwd: Path, nproc: int = 2, extra: tuple[str, ...] = (), env: dict | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`torchrun --standalone --nproc-per-node N -m cnnlab ARGS` on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "cnnlab", *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)


def test_global_batches_cover_every_sample_once_per_epoch() -> None:
    n, bs, ws = 103, 10, 3
    data = ImageSet(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).contiguous(), torch.zeros(n, dtype=torch.long))
    norm = Normalization((0.0,), (1.0,))
    seen: list[list[int]] = []
    lengths = set()
    for rank in range(ws):
        g = torch.Generator().manual_seed(5)  # every rank: the same seed, so the same permutation
        loader = BatchLoader(data, bs, norm, shuffle=True, generator=g, rank=rank, world_size=ws)
        lengths.add(len(loader))
        seen.append([int(v) for x, _ in loader for v in (x.flatten() * 255).round().tolist()])
    assert lengths == {4}, "every process takes the same number of steps"
    assert sorted(v for part in seen for v in part) == list(range(n)), "each sample exactly once across processes"
    assert not set(seen[0]) & set(seen[1])
    tiny = BatchLoader(ImageSet(data.images[:31], data.labels[:31]), bs, norm, rank=0, world_size=ws)
    assert len(tiny) == 1, "a last global batch of 1 sample for 3 processes is left out (documented)"


@pytest.mark.slow
def test_two_processes_train_write_once_and_match_single_process_metrics(tmp_path: Path) -> None:
    # Each worker records that it started and, from an atexit hook, whether Python finalised it: a finished worker must
    # leave with os._exit, since gloo threads can abort the process during finalisation (SIGABRT after a good run).
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, pathlib\n"
        "if 'LOCAL_RANK' in os.environ:  # a worker, not torchrun's agent\n"
        f"    d = pathlib.Path({str(hooks)!r})\n"
        "    (d / f'started-{os.environ[\"LOCAL_RANK\"]}').touch()\n"
        "    atexit.register(lambda: (d / f'finalised-{os.environ[\"LOCAL_RANK\"]}').touch())\n"
    )
    r = torchrun(*TRAIN, "--runs-dir", "runs", "--name", "ddp", "--scale-lr", "sqrt", cwd=tmp_path,
                 env={"PYTHONPATH": str(hooks)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in hooks.glob("*-*")) == ["started-0", "started-1"], "workers skip finalisation"
    result = json.loads(r.stdout)  # rank 0 alone prints the result
    # --scale-lr sqrt: Adam's default peak lr 3e-3 times sqrt(2 processes), the peak of its one-cycle schedule.
    groups = torch.load(tmp_path / "runs" / "ddp" / "last.ckpt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["max_lr"] for g in groups] == pytest.approx([3e-3 * 2**0.5] * len(groups))
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"], "rank 0 alone creates the run"
    config = json.loads((run / "config.json").read_text())
    assert config["runtime"]["world_size"] == 2 and config["runtime"]["global_batch"] == 128
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    losses = [float(row.split(",")[1]) for row in rows[1:]]
    assert losses[1] < losses[0], "the training loss goes down"
    # The test metrics printed by the 2-process run are those of the same weights evaluated in one process.
    single = evaluate_run(load_run(run))
    assert result["test_acc"] == pytest.approx(single.top1, abs=1e-9)
    assert result["test_top5"] == pytest.approx(single.top5, abs=1e-9)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_resumes_to_completion(tmp_path: Path) -> None:
    args = [a for a in TRAIN if a != "--quiet"]  # the resume notice is progress output
    r = torchrun(*args, "--runs-dir", "runs", "--name", "elastic", "--resume", "auto", "--checkpoint-every", "5",
                 cwd=tmp_path, extra=("--max-restarts=1",), env={"CNNLAB_FAULT_AT_STEP": "12"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "elastic"
    assert (run / "results.json").is_file()
    assert "injected fault: rank 1 exits with code 17 at step 12" in r.stderr
    # The agent reports the first failure it sees: rank 1's exit, or rank 0's broken connection if that came first.
    assert "failed (exitcode: " in r.stderr
    assert "resuming" in r.stderr and "(step 10)" in r.stderr, "the restarted group resumed from the checkpoint"
    assert json.loads((run / "results.json").read_text())["epochs_run"] == 2


def test_scale_lr_is_the_linear_or_square_root_rule_and_needs_a_warm_up(capsys: pytest.CaptureFixture) -> None:
    from cnnlab.engine.config import TrainConfig
    from cnnlab.engine.optim import build_optimizer, lr_scale
    from tests.conftest import main_error

    sgd = TrainConfig(optimizer="sgd", lr=0.1, scale_lr="linear")
    assert [lr_scale(sgd, n) for n in (1, 2, 8)] == [1.0, 2.0, 8.0]
    assert lr_scale(TrainConfig(scale_lr="sqrt"), 16) == 4.0 and lr_scale(TrainConfig(), 8) == 1.0
    opt = build_optimizer(torch.nn.Linear(3, 2), sgd, None, world_size=4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4] * len(opt.param_groups))
    code, err = main_error(["train", "--scale-lr", "linear", "--schedule", "cosine", "--epochs", "1"], capsys)
    assert code == 2 and "needs a warm-up" in err[-1]


def test_resume_auto_needs_a_name(tmp_path: Path) -> None:
    from cnnlab.cli import main

    assert main(["train", "--resume", "auto", "--runs-dir", str(tmp_path)]) == 2


def test_devices_relaunches_the_same_command_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.cli import main
    from cnnlab.engine import distributed

    calls: list[list[str]] = []
    monkeypatch.setattr(distributed, "launch", lambda args: calls.append(args))  # torchrun's launcher, in-process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--devices", "3", "--epochs", "2", "--devices=3", "--data", "mnist-mini"]) == 0
    (cmd,) = calls
    assert cmd[:3] == ["--standalone", "--nproc-per-node=3", "-m"]
    assert cmd[3:] == ["cnnlab", "train", "--epochs", "2", "--data", "mnist-mini"], "--devices itself is dropped"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--devices", "2"]) == 2, "already under torchrun: a usage error, not a fork bomb"


@pytest.mark.parametrize(
    ("args", "said"),
    [(["--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA devices"),
     (["--scale-lr", "linear", "--schedule", "cosine"], "--scale-lr needs a warm-up")],
)  # fmt: skip
def test_devices_refuses_a_data_parallel_option_before_starting_workers(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from cnnlab.engine import distributed
    from tests.conftest import main_error

    calls: list[list[str]] = []
    monkeypatch.setattr(distributed, "launch", lambda a: calls.append(a))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, err = main_error(["train", "--devices", "2", "--epochs", "1", *args], capsys)
    assert (code, calls) == (2, []) and said in err[-1], err


def test_two_processes_follow_one_time_budget_plan(tmp_path: Path) -> None:
    # Timing is collective (the same number of steps on every process) and rank 0's plan is everyone's: no hang.
    # --patience 0: early stopping would end the run before its planned last step. 25 s: two processes' set-up took
    # 11 s on a loaded 2-core machine, and a budget shorter than set-up plus a step is refused.
    r = torchrun("train", "--time-budget", "25", "--patience", "0", "--batch-size", "64", "--device", "cpu", "--json",
                 "--quiet", "--runs-dir", "runs", "--name", "budget", cwd=tmp_path, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    planned = json.loads((tmp_path / "runs" / "budget" / "config.json").read_text())["train"]["planned_steps"]
    assert result["steps"] == planned >= 1 and result["time_budget"] == 25


def test_the_launcher_names_the_worker_that_failed_not_those_torchrun_stopped(tmp_path: Path) -> None:
    # Rank 3 aborted (SIGABRT) without a word; torchrun then stopped ranks 0-2 with SIGTERM. The cause is rank 3.
    from types import SimpleNamespace

    from cnnlab.engine.distributed import _root_failure

    failures = {r: SimpleNamespace(exitcode=-15) for r in range(3)} | {3: SimpleNamespace(exitcode=-6)}
    failure = _root_failure(str(tmp_path), failures)
    assert (failure.rank, failure.message) == (3, "worker rank 3 was killed by signal 6 without an error message")
    only_stopped = _root_failure(str(tmp_path), {r: SimpleNamespace(exitcode=-15) for r in (2, 1)})
    assert only_stopped.rank == 1


def test_a_worker_whose_peer_stopped_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    # What a gloo collective raises on the surviving rank when another worker died (seen under plain torchrun).
    from cnnlab import cli, cli_train
    from cnnlab.engine import distributed

    gone = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:40310: "
                        "Connection reset by peer")  # fmt: skip
    assert distributed.peer_lost(gone) is None, "outside a process group it is just an error"
    monkeypatch.setattr(distributed, "_STARTED_A_GROUP", True)
    lost = [
        RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer "
                     "[127.0.0.1]:21883"),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:420] writev [127.0.0.1]:4321: Broken pipe"),
        torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:2041, remote process exited or there "
                                           "was a network error, NCCL version 2.21.5\nncclRemoteError: ..."),
        torch.distributed.DistBackendError("Process group watchdog: NCCL communicator was aborted on rank 1."),
        torch.distributed.DistNetworkError("failed to recv, got 0 bytes"),
    ]  # fmt: skip
    assert [distributed.peer_lost(e) is not None for e in lost] == [True] * len(lost)
    not_lost = [
        ValueError("shapes differ"),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms "
                     "for recv operation to complete"),  # stuck, not abandoned: no peer's error explains it
        ConnectionResetError("[Errno 104] Connection reset by peer"),  # e.g. an HTTP tracking server
        RuntimeError("API request to http://mlflow:5000 failed: Connection reset by peer"),
    ]  # fmt: skip
    assert [distributed.peer_lost(e) for e in not_lost] == [None] * len(not_lost)

    def fails(args: object) -> int:
        raise gone

    monkeypatch.setattr(cli_train, "cmd_train", fails)
    monkeypatch.delenv("CNNLAB_WORKER_REPORTS", raising=False)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnnlab: error: another process of the data-parallel group stopped")
