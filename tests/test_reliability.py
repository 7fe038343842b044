"""Never lose a run: interrupts, kills and crashes at any step resume bit-exactly; nothing non-finite is saved."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cnnlab.data.sources import Dataset
from cnnlab.engine import Reporter, TrainConfig, fit
from cnnlab.engine.checkpoint import load_checkpoint, read_weights
from cnnlab.engine.trainer import TrainingInterrupted
from cnnlab.errors import CnnlabError


def cfg(**kw: Any) -> TrainConfig:
    """Short runs with every random part on: augmentation, dropout-free model, one-cycle schedule."""
    base = {"epochs": 3, "batch_size": 32, "patience": 0, "val_split": 0.2, "augment": ("crop", "rotate", "erase")}
    return TrainConfig(**{**base, **kw})


def same_run(a: Path, b: Path) -> None:
    """Two run directories hold identical weights, optimizer state and metrics."""
    ca, cb = load_checkpoint(a / "last.ckpt"), load_checkpoint(b / "last.ckpt")
    assert ca["step"] == cb["step"] and ca["epoch"] == cb["epoch"]
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    wa, wb = read_weights(a / "best.safetensors"), read_weights(b / "best.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "metrics.csv").read_text().splitlines()[:1] == (b / "metrics.csv").read_text().splitlines()[:1]
    rows = lambda p: [r.rsplit(",", 2)[0] for r in (p / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert rows(a) == rows(b), "every metric but the timings is identical"


class SignalAt(Reporter):
    """Sends this process a signal after a given global step, as a user pressing Ctrl-C would."""

    def __init__(self, step: int, sig: int = signal.SIGINT, times: int = 1) -> None:
        self.at, self.sig, self.times, self.count = step, sig, times, 0

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        self.count += 1
        if self.count == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_checkpoints_and_resumes_bit_exactly(
    small_digits: Dataset, tmp_path: Path, sig: int
) -> None:
    straight = fit(cfg(), runs_dir=tmp_path / "a", dataset=small_digits)
    # Compared with what they were, not with Python's defaults: a shell starts background jobs with SIGINT ignored.
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        TrainingInterrupted,
        match=r"interrupted by SIG\w+ at epoch 2, step 27; checkpoint saved, "
        r"resume with: cnnlab train --resume",
    ):
        fit(cfg(), runs_dir=tmp_path / "b", dataset=small_digits, reporter=SignalAt(27, sig))
    run = next((tmp_path / "b").iterdir())
    state = load_checkpoint(run / "last.ckpt")
    assert state["step"] == 27 and state["partial"]["batch"] == 7, "the step in progress was finished and saved"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before, "handlers are restored"
    fit(resume=run, dataset=small_digits)
    same_run(straight.run_dir, run)


class CrashAt(Reporter):
    """Dies at a given step without any chance to save, like a power cut."""

    def __init__(self, step: int) -> None:
        self.at, self.count = step, 0

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        self.count += 1
        if self.count == self.at:
            raise SystemExit("power cut")


def test_checkpoint_every_steps_bounds_the_loss_and_resumes_bit_exactly(small_digits: Dataset, tmp_path: Path) -> None:
    straight = fit(cfg(checkpoint_steps=6), runs_dir=tmp_path / "a", dataset=small_digits)
    with pytest.raises(SystemExit):
        fit(cfg(checkpoint_steps=6), runs_dir=tmp_path / "b", dataset=small_digits, reporter=CrashAt(35))
    run = next((tmp_path / "b").iterdir())
    assert load_checkpoint(run / "last.ckpt")["step"] == 30, "at most checkpoint_steps - 1 steps are lost"
    fit(resume=run, dataset=small_digits)
    same_run(straight.run_dir, run)


def test_a_second_interrupt_stops_at_once_and_leaves_files_loadable(small_digits: Dataset, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(checkpoint_steps=5), runs_dir=tmp_path, dataset=small_digits, reporter=SignalAt(23, times=2))
    run = next(tmp_path.iterdir())
    state = load_checkpoint(run / "last.ckpt")
    assert state["step"] == 20
    assert not [p for p in run.iterdir() if p.suffix == ".tmp" and not p.name.startswith(".")]


def test_non_finite_weights_are_never_checkpointed_mid_epoch(
    small_digits: Dataset, tmp_path: Path, trainer_models: list[torch.nn.Module]
) -> None:
    class Poison(Reporter):
        def step(self, epoch: int, step: int, loss: float | None) -> None:
            if epoch == 2 and step == 3:
                for p in trainer_models[0].parameters():
                    p.data.fill_(float("nan"))

    with pytest.raises(CnnlabError, match="non-finite loss at epoch 2, step 24"):
        fit(cfg(checkpoint_steps=2), runs_dir=tmp_path, dataset=small_digits, reporter=Poison())
    state = load_checkpoint(next(tmp_path.iterdir()) / "last.ckpt")
    assert state["step"] == 22 and all(torch.isfinite(v).all() for v in state["model"].values())


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(run: Path, target: int, proc: subprocess.Popen[str], timeout: float = 120) -> bool:
    """Poll last.ckpt (safe: it is replaced atomically) until it reaches `target` steps; False if proc ends first.

    A checkpoint is read only when the file was replaced since the last look, so polling does not take the CPU
    from the run it watches.
    """
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline and proc.poll() is None:
        ckpt = run / "last.ckpt"
        try:
            stat = ckpt.stat()
        except FileNotFoundError:
            stat = None
        version = stat and (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if version and version != seen:
            seen = version
            if load_checkpoint(ckpt)["step"] >= target:
                return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path: Path) -> None:
    """kill -9 the CLI at random steps (3 times), resume each time; the finished run equals an uninterrupted one.

    The kill points are random steps, not random seconds, so every kill lands inside training on any machine. Two
    epochs are enough for kills in both epochs and a resume across the epoch boundary (benchmarks/kill_resume.py
    kills a 40-epoch run 10 times).
    """
    args = ["--epochs", "2", "--batch-size", "32", "--checkpoint-every", "7", "--augment", "crop,rotate,erase",
            "--quiet"]  # fmt: skip
    straight = _cli(*args, "--name", "straight", cwd=tmp_path)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    total = load_checkpoint(tmp_path / "runs" / "straight" / "last.ckpt")["step"]  # 2 x 113 = 226
    run = tmp_path / "runs" / "killed"
    targets = sorted(random.Random(1234).sample(range(20, total - 60), 3))  # 21, 49 (epoch 1) and 132 (epoch 2)
    assert targets[0] < total // 2 < targets[-1], "kills in both epochs"
    proc = _cli(*args, "--name", "killed", cwd=tmp_path)
    for target in targets:
        assert _wait_for_step(run, target, proc), f"run ended before step {target}: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "results.json").exists()
        proc = _cli("--resume", str(run), "--quiet", cwd=tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    same_run(tmp_path / "runs" / "straight", run)


def test_on_nan_skip_skips_the_step_and_keeps_training(small_digits: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.engine import loss as training_loss  # the trainer's loss goes through torch's F.cross_entropy

    real = training_loss.F.cross_entropy
    calls = {"n": 0}

    def sometimes_nan(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training steps only, not evaluation
            calls["n"] += 1
            if calls["n"] in (5, 17):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training_loss.F, "cross_entropy", sometimes_nan)
    result = fit(cfg(epochs=2, on_nan="skip"), runs_dir=None, dataset=small_digits)
    assert result.skipped_steps == 2 and result.test_acc > 0.5
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    with pytest.raises(CnnlabError, match="non-finite loss at epoch 1, step 5"):
        calls["n"] = 0
        fit(cfg(epochs=2), runs_dir=None, dataset=small_digits)


def test_clip_grad_bounds_the_update(small_digits: Dataset) -> None:
    from cnnlab.engine import trainer

    def update_norm(clip: float | None) -> float:
        # Constant lr (a one-step one-cycle schedule would start near 0), plain SGD, no weight decay.
        options = cfg(
            optimizer="sgd", lr=0.1, weight_decay=0.0, clip_grad=clip, max_steps=1, augment=(), schedule="none"
        )
        t = trainer._Trainer(options, Reporter(), small_digits)
        before = [p.detach().clone() for p in t.model.parameters()]
        t.train_epoch()
        deltas = [(p.detach() - b).square().sum() for p, b in zip(t.model.parameters(), before, strict=True)]
        return float(torch.stack(deltas).sum().sqrt())

    assert update_norm(1e-6) <= 0.1 * 1e-6 * 1.9 * 1.001  # lr x max norm x (1 + Nesterov momentum) on step 1
    assert update_norm(None) > 1e-3


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(
    small_digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import cnnlab.fileio as fileio

    real_fsync = fileio.os.fsync
    full = {"on": False}

    def fsync(fd: int) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    class DiskFillsAfterEpoch1(Reporter):
        def epoch_end(self, row: dict[str, Any]) -> None:
            full["on"] = True

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(CnnlabError, match=r"cannot write .*: No space left on device"):
        fit(cfg(), runs_dir=tmp_path, dataset=small_digits, reporter=DiskFillsAfterEpoch1())
    run = next(tmp_path.iterdir())
    assert load_checkpoint(run / "last.ckpt")["epoch"] == 1
    assert read_weights(run / "best.safetensors")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "no temporary file is left behind"


@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("header length past the end", (10**6).to_bytes(8, "little") + b"{}"),
        ("absurd header size", (2**62).to_bytes(8, "little") + b"{"),
        ("header not JSON", (4).to_bytes(8, "little") + b"nope"),
        (
            "offsets past the data",
            (70).to_bytes(8, "little")
            + b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}     '
            + b"\0" * 8,
        ),
        ("shorter than a header", b"\x01\x02"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_malformed_safetensors_are_refused_cleanly(tmp_path: Path, label: str, data: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CnnlabError, match="not a valid safetensors file"):
        read_weights(path)
