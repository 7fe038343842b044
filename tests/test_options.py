"""The option table: each train option, declared once, drives the CLI, the Python keywords, config.json, README."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cnnlab.cli import main
from cnnlab.engine.config import (
    README_END,
    README_START,
    TrainConfig,
    markdown_table,
    options,
    type_name,
)
from cnnlab.errors import OptionError, flag

ROOT = Path(__file__).resolve().parents[1]
CLI_OPTIONS = [(f.name, opt) for f, opt in options() if opt.cli]


def train_parser() -> argparse.ArgumentParser:
    from cnnlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_the_readme_table_is_generated_from_the_option_table() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_START in text and README_END in text
    current = text.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert current == markdown_table().strip(), "run: python -m cnnlab.engine.config README.md"


def test_every_option_has_help_a_group_and_a_default_of_its_type() -> None:
    from cnnlab.engine.config import GROUPS, check_types

    check_types(TrainConfig())  # every default has its declared type
    for f, opt in options():
        assert opt.help and opt.group in GROUPS, f.name


def _typed_value(name: str, opt: Any) -> tuple[list[str], Any]:
    """A non-default value for option `name` as typed on the command line, and what TrainConfig should hold."""
    f = next(f for f, _ in options() if f.name == name)
    default = getattr(TrainConfig(), name)
    kind = type_name(f)
    if opt.choices:
        value = next(c for c in opt.choices if c != default)
        return [flag(name), value], value
    if kind == "bool":
        return [flag(name) if not default else "--no-" + flag(name)[2:]], not default
    if kind == "int":
        lo = int(opt.lo or 0) + 1
        value = lo + 1 if default != lo + 1 else lo + 2
        return [flag(name), str(value)], value
    if kind == "float":
        hi = opt.hi if opt.hi is not None else 10.0
        value = ((opt.lo or 0.0) + hi) / 2
        value = value if value != default else value / 2
        return [flag(name), repr(value)], value
    if name == "model_args":
        return [flag(name), "width=8"], {"width": 8}
    if name == "augment":
        return [flag(name), "flip"], "flip"
    if name == "logger":
        return [flag(name), "tensorboard"], "tensorboard"
    if name == "recipe":
        return [flag(name), "fast"], "fast"
    return [flag(name), "something"], "something"


@pytest.mark.parametrize(("name", "opt"), CLI_OPTIONS, ids=[n for n, _ in CLI_OPTIONS])
def test_every_option_is_a_flag_that_reaches_the_config_and_counts_as_typed(name: str, opt: Any) -> None:
    from cnnlab.cli_train import typed_options

    argv, expected = _typed_value(name, opt)
    args = train_parser().parse_args(argv)
    given = typed_options(args)
    assert set(given) == {name}, given  # only what was typed: a recipe keeps everything else
    assert TrainConfig(**given).__dict__[name] == expected
    nothing = typed_options(train_parser().parse_args([]))
    assert nothing == {}


@pytest.mark.parametrize(
    ("change", "python", "cli"),
    [
        ({"unfreeze_after": 2}, "unfreeze_after needs freeze='features'", "--unfreeze-after needs --freeze features"),
        ({"patience": 3, "val_split": 0.0}, "patience needs a validation split (val_split > 0); use patience=0",
         "--patience needs a validation split (--val-split > 0); use --patience 0"),
        ({"ema": 1.5}, "ema must be a decay in (0, 1)", "--ema must be a decay in (0, 1)"),
        ({"logger": ("wandb",)}, "logger unknown logger 'wandb'", "--logger unknown logger 'wandb'"),
    ],
)  # fmt: skip
def test_library_errors_name_the_keyword_and_the_cli_names_the_flag(
    change: dict[str, Any], python: str, cli: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OptionError) as err:
        TrainConfig(**change).validate()
    assert python in str(err.value) and cli in err.value.cli_message()
    argv = ["train", "--runs-dir", str(tmp_path)]
    for name, value in change.items():
        typed = ",".join(value) if isinstance(value, tuple) else str(value)
        argv += [flag(name), typed]
    code = main(argv)
    err_text = capsys.readouterr().err
    assert code == 2 and cli in err_text and len(err_text.strip().splitlines()) == 1, err_text


def test_config_json_round_trips_every_option() -> None:
    cfg = TrainConfig(augment=("crop", "flip"), logger=("tensorboard",), model_args={"width": 8}, ema=0.99)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_resume_refuses_typed_options_and_names_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--resume", str(tmp_path), "--epochs", "6", "--accumulate", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "drop --accumulate, --epochs (only --device may change)" in err, err


def test_errors_keep_both_wordings_across_processes() -> None:
    """A worker process's error, pickled to its parent, still prints the keyword in Python and the flag on the CLI."""
    import pickle

    from cnnlab.errors import CnnlabError
    from cnnlab.memory import OutOfMemory

    for error in (
        OptionError("batch_size", "must be at least 1 with {accumulate=2}"),
        CnnlabError("photo.jpg: truncated; {on_bad_image=skip} leaves bad files out", options=True),
        OutOfMemory("training needs 9 GiB; lower {batch_size}", options=True),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and "--" not in str(again)
        assert again.cli_message() == error.cli_message() and "--" in again.cli_message()
