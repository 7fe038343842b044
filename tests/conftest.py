"""Shared fixtures: the embedded digits loaded once, a small subset for fast training, a CLI runner."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.data.sources import Dataset, load_dataset, stratified_split


@pytest.fixture(scope="session")
def mnist_mini() -> Dataset:
    """The full embedded mnist-mini dataset."""
    return load_dataset("mnist-mini")


@pytest.fixture(scope="session")
def small_digits(mnist_mini: Dataset) -> Dataset:
    """800 training and 200 test digits from mnist-mini, class-balanced: enough to learn, fast to train."""
    _, train_idx = stratified_split(mnist_mini.train.labels, 0.2, seed=1)
    _, test_idx = stratified_split(mnist_mini.test.labels, 0.2, seed=1)
    return Dataset(
        "small-digits",
        mnist_mini.train.subset(train_idx),
        mnist_mini.test.subset(test_idx),
        mnist_mini.classes,
        default_augment=("crop",),
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m cnnlab ARGS` in a subprocess and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "cnnlab", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `cnnlab ARGS` in-process through the console script's entry point (argparse's SystemExit included):
    the exit code, stdout and stderr."""
    from cnnlab.cli import main

    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def main_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run `cnnlab ARGS` in-process: the exit code and the stderr lines."""
    code, _, err = run_main(args, capsys)
    return code, err.strip().splitlines()


@pytest.fixture
def trainer_models(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """The model of every fit() started in the test, in order, so a test can tamper with it mid-run."""
    from cnnlab.engine import trainer

    models: list[torch.nn.Module] = []
    original = trainer._Trainer.__init__

    def capture(self: object, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        models.append(self.model)  # type: ignore[attr-defined]

    monkeypatch.setattr(trainer._Trainer, "__init__", capture)
    return models


def write_pickle_payload(path: Path, marker: Path, wrap: object = None) -> Path:
    """torch.save a file whose unpickling would create `marker`: proof that a loader never ran it."""

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (str(marker), "w"))

    torch.save(wrap(Payload()) if callable(wrap) else {"payload": Payload()}, path)
    return path


def _thread_share() -> int:
    """This worker's share of (at most 2) cores between pytest-xdist's workers (`-n 2`: 1 thread each)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, os.cpu_count() or 1) // workers)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # Tests on a 2-core CI machine: keep torch from oversubscribing when pytest runs subprocesses too, and share
    # the cores between pytest-xdist's workers.
    torch.set_num_threads(_thread_share())


@pytest.fixture(autouse=True, scope="session")
def _private_data_locations(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read the user's $CNNLAB_DATA nor write to the user's cache (subprocesses inherit this)."""
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cnnlab-cache"))
    os.environ.pop("CNNLAB_DATA", None)


@pytest.fixture(autouse=True, scope="session")
def _few_threads_in_subprocesses() -> None:
    """Subprocesses (the CLI, notebook kernels) use this worker's share of the cores, as _few_threads does in-process.

    torch starts one OpenMP thread per core; a 2-thread subprocess beside another busy worker on 2 cores spins
    in its barriers: the default `cnnlab train` took 4 min 3 s that way and 54 s with one thread (2-core AMD EPYC).
    """
    os.environ["OMP_NUM_THREADS"] = str(_thread_share())


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="session")
def digit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lenet5-modern trained briefly on mnist-mini: a real run directory for evaluate/predict/explore tests."""
    from cnnlab.engine.trainer import TrainConfig, fit

    runs = tmp_path_factory.mktemp("runs")
    return fit(TrainConfig(epochs=2, max_steps=120, batch_size=64), runs_dir=runs, run_name="digits").run_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse test ids built from raw bytes: pytest-xdist needs every worker to collect the same ids."""
    # A bytes parameter becomes an id like "...\x1f\x8b..."; if the bytes carry a time stamp (gzip does) or
    # anything random, the two workers disagree and the whole run stops before the first test.
    raw = [item.nodeid for item in items if "\\x" in item.nodeid]
    if raw:
        raise pytest.UsageError(f"give these parameters explicit ids (raw bytes in the id): {raw[:3]}")
