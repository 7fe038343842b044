"""`cnnlab` end to end, through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cnnlab
from tests.conftest import run_cli, run_main


def test_version_and_help() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"cnnlab {cnnlab.__version__} (torch ")
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for option in (
        "--model",
        "--data",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--schedule",
        "--label-smoothing",
        "--val-split",
        "--patience",
        "--augment",
        "--seed",
        "--device",
        "--runs-dir",
        "--resume",
        "--json",
        "mnist-mini",
    ):
        assert option in out.stdout, option


def test_console_script_is_the_same_program() -> None:
    script = Path(sys.executable).with_name("cnnlab")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout == run_cli("--version").stdout


def test_no_command_prints_help_and_exits_2() -> None:
    out = run_cli()
    assert out.returncode == 2 and "train" in out.stderr


def test_train_json_on_a_short_run(tmp_path: Path) -> None:
    out = run_cli("train", "--epochs", "1", "--max-steps", "30", "--runs-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) >= {
        "run_dir",
        "model",
        "data",
        "test_acc",
        "test_loss",
        "test_top5",
        "best_epoch",
        "epochs_run",
        "stopped_early",
        "seconds",
        "device",
    }
    assert doc["model"] == "lenet5-modern" and doc["data"] == "mnist-mini" and doc["epochs_run"] == 1
    assert 0.3 < doc["test_acc"] <= 1.0
    assert (Path(doc["run_dir"]) / "best.safetensors").is_file()
    assert "epoch 1/1" in out.stderr, "progress goes to stderr, leaving stdout for the JSON"


def test_interrupted_run_resumes_from_the_cli(tmp_path: Path) -> None:
    args = ["train", "--epochs", "2", "--max-steps", "60", "--runs-dir", str(tmp_path), "--name", "r"]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "r" / "results.json").unlink()  # pretend the run stopped before finishing
    out = run_cli("train", "--resume", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr and "test accuracy" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--data", "nope"], "unknown dataset 'nope'"),
        (["train", "--epochs", "-1"], "argument --epochs: must be at least 1, got -1"),
        (["train", "--epochs", "two"], "argument --epochs: expected a whole number, got 'two'"),
        (["train", "--val-split", "1"], "argument --val-split: must be in [0, 1), got 1"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["train", "--lr", "0"], "argument --lr: must be in (0, inf), got 0"),
        (["train", "--augment", "crop,blur"], "unknown augmentation 'blur'"),
        (["train", "--device", "cuda:3"], "--device cuda:3"),
        (["train", "--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
        (["train", "--resume", "no/such/run"], "no/such/run: no such run directory"),
        (["train", "--runs-dir", "{file}/runs"], "cannot create directory"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process through cnnlab.cli.main, the console script's own entry point (the tests above run it as a
    process): each case would otherwise pay a second's start-up of torch."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = [a.replace("{file}", str(blocker)) for a in args]
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_main(args, capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: "), stderr
    assert needle in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "runs").exists(), "a refused run leaves nothing behind"


def test_resume_of_a_finished_run_is_refused(tmp_path: Path) -> None:
    out = run_cli("train", "--epochs", "1", "--max-steps", "5", "--runs-dir", str(tmp_path), "--name", "done")
    assert out.returncode == 0, out.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}
    out = run_cli("train", "--resume", str(tmp_path / "done"))
    assert out.returncode == 2 and "already finished" in out.stderr
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}, "the run is untouched"


def test_models_lists_and_filters() -> None:
    out = run_cli("models", "lenet*", "--json")
    assert out.returncode == 0
    assert [m["name"] for m in json.loads(out.stdout)] == ["lenet5", "lenet5-modern"]
    out = run_cli("models", "zzz*")
    assert out.returncode == 1 and out.stderr.startswith("cnnlab: error: no model matches")


@pytest.mark.slow
def test_default_train_reaches_98_percent_on_mnist_mini(tmp_path: Path) -> None:
    """The Quickstart's promise: `cnnlab train` with no options, >= 98% on the held-out test split."""
    out = run_cli("train", "--json", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["model"] == "lenet5-modern" and doc["data"] == "mnist-mini"
    assert doc["test_acc"] >= 0.98, doc
    assert Path(tmp_path, doc["run_dir"]).parent == tmp_path / "runs"
