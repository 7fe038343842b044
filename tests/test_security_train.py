"""Issue 15's training, run-directory and launcher cases: each input once ended in a traceback, `internal error`,
several lines, a warning, a killed process or a lost metrics row. Each now gets one named line (or works)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from cnnlab.engine import rundir
from cnnlab.engine.reporter import Reporter
from cnnlab.engine.trainer import TrainConfig, _Trainer, fit
from tests.conftest import main_error, run_cli

FAST = ["--epochs", "1", "--max-steps", "2", "--quiet"]

BAD_TRAIN = [
    (["--seed", "99999999999999999999999"], "--seed: must be a whole number in 0.."),
    (["--seed", "-1"], "--seed: must be a whole number in 0.."),
    (["--device", "xpu"], "--device xpu: not supported"),
    (["--device", "meta"], "--device meta: not supported"),
    (["--model", "cnn-compact", "--model-args", "width=nan"], "--model-args width=nan: not a finite number"),
    (["--model", "cnn-compact", "--model-args", "width=inf"], "--model-args width=inf: not a finite number"),
    (["--data", "~nonexistent-user-cnnlab"], "no such folder (cannot expand '~')"),
    (["--data", ""], "--data is empty"),
    (["--augment", ",,"], "--augment ',,': empty item"),
    (["--augment", "crop,"], "--augment 'crop,': empty item"),
    (["--name", "../escape"], "--name '../escape': give a plain directory name"),
    (["--name", ".."], "give a plain directory name"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_input_is_one_named_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, lines = main_error(["train", *args, "--runs-dir", str(tmp_path / "runs"), *FAST], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: ") and needle in lines[0], lines
    assert not list(tmp_path.iterdir()), "a refused command writes nothing (no run directory, nothing outside)"


def test_memory_error_names_both_numbers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, lines = main_error(["train", "--image-size", "100000", "--runs-dir", str(tmp_path), *FAST], capsys)
    assert code == 2 and len(lines) == 1
    assert "needs about" in lines[0] and "GiB of RAM" in lines[0] and "is available" in lines[0], lines


def test_a_model_too_big_for_memory_is_refused_before_the_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Once: decoded, then killed by the OOM killer at 23 GB in the first step, leaving a run with only config.json.
    folder = tmp_path / "photos"
    for c in "ab":
        (folder / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20, 16), (i * 20, 0, 0)).save(folder / c / f"{i}.png")
    runs = tmp_path / "runs"
    code, lines = main_error(
        ["train", "--data", str(folder), "--image-size", "3000", "--batch-size", "64", "--runs-dir", str(runs), *FAST],
        capsys,
    )
    assert code == 2 and len(lines) == 1, lines
    assert "training lenet5-modern on 3000x3000 images at batch 64 needs about" in lines[0], lines
    assert not runs.exists()


def test_the_suggested_time_budget_is_one_that_would_work(monkeypatch: pytest.MonkeyPatch, small_digits) -> None:
    # Once: "--time-budget 5: too short ... give at least 5 s". The advice must name more than what was refused.
    monkeypatch.setattr(_Trainer, "_time_steps", lambda self: (0.01, 0.0))
    cfg = TrainConfig(time_budget=5.0, epochs=1, device="cpu").validate()
    started = time.perf_counter() - 4.55  # 4.55 s of set-up already spent
    with pytest.raises(Exception, match="give at least") as err:
        _Trainer(cfg, Reporter(), small_digits, started)
    advised = int(str(err.value).rsplit("give at least ", 1)[1].split()[0])
    assert advised > 5, str(err.value)


def _trained(tmp_path: Path, small_digits, epochs: int = 2, name: str = "r") -> Path:
    cfg = TrainConfig(epochs=epochs, batch_size=64, device="cpu", patience=0)
    return fit(cfg, runs_dir=tmp_path, run_name=name, dataset=small_digits).run_dir


def test_resume_rewrites_the_metrics_the_checkpoint_holds(tmp_path: Path, small_digits) -> None:
    # The on-disk state of a kill between last.ckpt and metrics.csv in the final epoch: the checkpoint has both
    # epochs, metrics.csv one, and there is no results.json yet. Resume must not leave the log a row short.
    run = _trained(tmp_path, small_digits)
    full = (run / rundir.METRICS).read_text().splitlines()
    assert len(full) == 3
    (run / rundir.METRICS).write_text("\n".join(full[:2]) + "\n")
    (run / rundir.RESULTS).unlink()
    fit(resume=run, dataset=small_digits)
    assert (run / rundir.METRICS).read_text().splitlines() == full
    assert (run / rundir.RESULTS).is_file()


def test_resume_auto_on_a_finished_run_says_so_and_succeeds(
    tmp_path: Path, small_digits, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _trained(tmp_path, small_digits, epochs=1, name="done")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    messages: list[str] = []
    reporter = Reporter()
    reporter.message = messages.append  # type: ignore[method-assign]
    result = fit(TrainConfig(), runs_dir=tmp_path, run_name="done", resume="auto", reporter=reporter)
    assert result.run_dir == run and result.test_acc == json.loads(before["results.json"])["test_acc"]
    assert messages == [f"{run}: this run has already finished; nothing to resume"]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before, "nothing in the finished run changes"


def _config(run: Path) -> dict:
    return json.loads((run / rundir.CONFIG).read_text())


EDITS = [
    ("missing model", lambda c: c.pop("model"), "model is missing"),
    ("missing classes", lambda c: c["data"].pop("classes"), "data.classes must be a list"),
    ("wrong type", lambda c: c["model"].update(num_classes="ten"), "model.num_classes must be a whole number"),
    ("nan std", lambda c: c["data"].update(std=[float("nan")]), "data.std must be 1 finite numbers"),
    ("zero std", lambda c: c["data"].update(std=[0.0]), "data.std must be positive"),
    ("class count", lambda c: c["data"].update(classes=["a"]), "has 1 names for 10 model outputs"),
    ("not an object", lambda c: c.clear() or c.update(model=[]), "model is missing or not an object"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, small_digits) -> Path:
    """A finished 1-epoch run, copied by each test that tampers with it."""
    return _trained(tmp_path_factory.mktemp("runs"), small_digits, epochs=1, name="base")


def _copy(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to / run.name))


@pytest.mark.parametrize(("label", "edit", "needle"), EDITS, ids=[e[0] for e in EDITS])
def test_hand_edited_config_is_a_named_error(
    label: str, edit, needle: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished_run, tmp_path)
    config = _config(run)
    edit(config)
    (run / rundir.CONFIG).write_text(json.dumps(config))
    digit = Path(__file__).parents[1] / "docs" / "images" / "digit-7.png"
    for args in (["predict", str(run), str(digit)], ["evaluate", str(run)], ["visualize", "curves", str(run)]):
        code, lines = main_error(args, capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "config.json" in lines[0], (args, lines)


def test_hand_edited_train_options_on_resume_are_a_named_error(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished_run, tmp_path)
    (run / rundir.RESULTS).unlink()
    config = _config(run)
    config["train"]["epochs"] = "ten"
    (run / rundir.CONFIG).write_text(json.dumps(config))
    code, lines = main_error(["train", "--resume", str(run)], capsys)
    assert code == 2 and len(lines) == 1 and "option epochs: expected int, got str 'ten'" in lines[0], lines


def test_a_checkpoint_of_another_model_on_resume_is_a_named_error(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished_run, tmp_path)
    (run / rundir.RESULTS).unlink()
    state = torch.load(run / rundir.LAST, weights_only=True)
    other = _copy(finished_run, tmp_path / "other")
    config = _config(other)
    config["train"]["model"] = config["model"]["name"] = "lenet5"
    (other / rundir.CONFIG).write_text(json.dumps(config))
    (other / rundir.RESULTS).unlink()
    code, lines = main_error(["train", "--resume", str(other)], capsys)  # lenet5-modern's checkpoint, lenet5 run
    assert code == 2 and len(lines) == 1 and "last.ckpt: does not fit this run (model: tensor" in lines[0], lines
    state["rng"] = {"python": "garbage"}
    torch.save(state, run / rundir.LAST)
    code, lines = main_error(["train", "--resume", str(run)], capsys)
    assert code == 2 and len(lines) == 1 and "last.ckpt: does not fit this run" in lines[0], lines
    assert (run / rundir.LAST).is_file(), "the checkpoint is kept"


@pytest.mark.parametrize("kind", ["int8", "nan"])
def test_int8_or_nan_weights_are_refused(
    kind: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Once: int8 weights predicted one class everywhere (10%), NaN weights printed `nan%`.
    run = _copy(finished_run, tmp_path)
    state = safetensors.torch.load_file(run / rundir.BEST)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(torch.int8) if kind == "int8" else torch.full_like(state[key], math.nan)
    safetensors.torch.save_file(state, run / rundir.BEST)
    digit = Path(__file__).parents[1] / "docs" / "images" / "digit-7.png"
    code, lines = main_error(["predict", str(run), str(digit)], capsys)
    needle = "has dtype int8, the model expects float32" if kind == "int8" else "holds NaN or infinite values"
    assert code == 1 and len(lines) == 1 and needle in lines[0] and key in lines[0], lines


def test_metrics_with_non_numbers_are_a_named_error(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished_run, tmp_path)
    lines_csv = (run / rundir.METRICS).read_text().splitlines()
    lines_csv[1] = lines_csv[1].replace(lines_csv[1].split(",")[1], "lots", 1)
    (run / rundir.METRICS).write_text("\n".join(lines_csv) + "\n")
    code, lines = main_error(["visualize", "curves", str(run)], capsys)
    assert code == 2 and len(lines) == 1 and "metrics.csv, line 2: train_loss is not a number ('lots')" in lines[0]


def test_output_folders_that_do_not_exist_yet_are_made(finished_run: Path, tmp_path: Path) -> None:
    from cnnlab.cli import main

    assert main(["evaluate", str(finished_run), "--out", str(tmp_path / "new" / "eval")]) == 0
    assert (tmp_path / "new" / "eval" / "evaluation.json").is_file()
    assert main(["export", str(finished_run), "--format", "torchscript", "-o", str(tmp_path / "a" / "b" / "m.pt")]) == 0
    assert (tmp_path / "a" / "b" / "m.pt").is_file()


def test_non_latin_file_names_and_float_tiffs_print_no_warnings(finished_run: Path, tmp_path: Path) -> None:
    # Once: matplotlib's "Glyph missing" and PyTorch's "non-writable array" warnings after successful commands.
    digit = Path(__file__).parents[1] / "docs" / "images" / "digit-7.png"
    named = tmp_path / "数字七.png"
    named.write_bytes(digit.read_bytes())
    out = tmp_path / "pictures"
    for args in (["predict", str(finished_run), str(named)],
                 ["visualize", "gradcam", str(finished_run), str(named), "--out", str(out)]):  # fmt: skip
        r = subprocess.run([sys.executable, "-W", "error", "-m", "cnnlab", *args], capture_output=True, text=True,
                           check=False, env={**os.environ, "PYTHONWARNINGS": "error"})  # fmt: skip
        assert r.returncode == 0 and r.stderr == "", (args, r.stderr[-2000:])
    nan_tiff = tmp_path / "nan.tif"
    Image.fromarray(torch.full((28, 28), math.nan).numpy()).save(nan_tiff)
    r = run_cli("predict", str(finished_run), str(nan_tiff))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "NaN or infinite" in r.stderr, r.stderr


# --- torchrun: validate before launching, one line for a worker's failure ---------------------------------------------


def test_devices_validates_before_launching(tmp_path: Path) -> None:
    # Once: the error once per process, then torchrun's 47-line traceback (exit 1).
    r = run_cli("train", "--devices", "2", "--model", "lenet", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "cnnlab: error: unknown model 'lenet'; did you mean 'lenet5', 'lenet5-modern'? (see `cnnlab models`)"
    ]
    r = run_cli("train", "--devices", "4", "--data", "mnist", "--no-download", cwd=tmp_path)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("cnnlab: error: mnist: files not found"), lines
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_failing_worker_ends_the_launcher_with_its_line_and_code(tmp_path: Path) -> None:
    env = {**os.environ, "CNNLAB_FAULT_AT_STEP": "3", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--devices", "2", "--epochs", "1", "--device", "cpu",
                        "--quiet", "--name", "f"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, check=False)  # fmt: skip
    errors = [line for line in r.stderr.splitlines() if line.startswith("cnnlab: error:")]
    assert r.returncode == 17, r.stderr[-3000:]
    assert errors == ["cnnlab: error: worker rank 1 exited with code 17 without an error message"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_resume_auto_on_a_finished_run_succeeds_once(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "cnnlab",
        "train",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--device",
        "cpu",
        "--name",
        "twice",
        "--resume",
        "auto",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("this run has already finished; nothing to resume") == 1, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
