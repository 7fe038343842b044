"""Bad input to every command not covered elsewhere: one line `cnnlab: error: ...`, the right exit code."""

from __future__ import annotations

import pytest

from tests.conftest import main_error

CASES = [
    (["models", "--image-size", "0", "--details"], 2, "argument --image-size: must be at least 1"),
    (["models", "zzz*"], 1, "no model matches 'zzz*'"),
    (["models", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["zoo", "--format", "xml"], 2, "argument --format: invalid choice: 'xml'"),
    (["zoo", "nothing-like-this*"], 1, "no model matches"),
    (["zoo", "--sort", "speed"], 2, "argument --sort: invalid choice"),
    (["summary"], 2, "give a MODEL name or --layers"),
    (["summary", "lenet6"], 2, "unknown model 'lenet6'"),
    (["summary", "lenet5", "--input-size", "x"], 2, "--input-size 'x': expected three positive sizes"),
    (["summary", "--layers", "conv 6 5", "--input-size", "3,4,4"], 2, "layer 1 (conv 6 5): output would be 0x0"),
    (["summary", "--layers", "conv 6 5"], 2, "--input-size C,H,W is required with --layers"),
    (["summary", "vit_b_16", "--input-size", "3,28,28"], 2, "cannot run on 28x28 inputs"),
    (["kernels", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["train", "--checkpoint-every", "0"], 2, "--checkpoint-every '0': expected a number of steps"),
    (["train", "--checkpoint-every", "soon"], 2, "--checkpoint-every 'soon'"),
    (["train", "--on-nan", "ignore"], 2, "argument --on-nan: invalid choice: 'ignore'"),
    (["train", "--clip-grad", "-1"], 2, "argument --clip-grad: must be in (0, inf), got -1"),
    (["train", "--model-args", "width"], 2, "--model-args: expected KEY=VALUE items, got 'width'"),
    (["train", "--model", "cnn-compact", "--model-args", "bogus=1"], 2, "--model-args: cnn-compact does not take"),
    (["train", "--model", "lenet5", "--pretrained"], 2, "lenet5 has no pretrained weights"),
    (["train", "--model", "resnet18", "--weights", "missing.pth"], 2, "--weights missing.pth: no such file"),
    (["train", "--model", "resnet18", "--weights-name", "V7"], 2, "resnet18 has no weights 'V7'"),
    (["train", "--warmup", "1"], 2, "argument --warmup: must be in (0, 1)"),
    (["train", "--model", "cnn-fast", "--model-args", "stem=whiten,whiten_keep=12"], 2, "whiten_keep must be a whole"),
    (["train", "--resume", "runs/x", "--epochs", "6"], 2, "--resume continues a run with its own options; drop --epo"),
]


@pytest.mark.parametrize(("args", "code", "needle"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input(
    args: list[str],
    code: int,
    needle: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # any run directory would appear here
    got, lines = main_error(args, capsys)
    assert got == code, lines
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: ") and needle in lines[0], lines
    assert not list(tmp_path.iterdir()), "a refused command writes nothing"  # type: ignore[attr-defined]
