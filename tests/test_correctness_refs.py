"""Numbers checked against third-party references (issue 15.10): strict JSON, torch's 'same' padding with even
kernels, ceil-mode pooling formulas, and LeNet-5's multiply-accumulates counted one way everywhere."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.arithmetic import build_stack, conv_output_shape, parse_layers, walk
from cnnlab.cli import main
from cnnlab.inspect.summary import summarize, totals
from cnnlab.inspect.zoo import count_macs, own_rows, torchvision_rows
from cnnlab.models import create_model


def _strict(text: str) -> object:
    """json.loads that refuses NaN / Infinity (not JSON: RFC 8259), as browsers' JSON.parse and jq do."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _evaluate(formula: str) -> tuple[int, int]:
    """'H_out = ceil((13 + 2*0 - 1*(2 - 1) - 1) / 2) + 1 = 7' -> (value of the printed arithmetic, printed result)."""
    expr, _, result = formula.partition(" = ")[2].rpartition(" = ")
    return eval(expr, {"__builtins__": {}, "floor": math.floor, "ceil": math.ceil}), int(result)


# --- strict JSON ------------------------------------------------------------------------------------------------------


def test_zoo_json_writes_null_for_a_missing_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "vgg16", "--format", "json", "--source", "torchvision"]) == 0
    rows = {r["weights"]: r for r in _strict(capsys.readouterr().out)}
    assert rows["IMAGENET1K_FEATURES"]["acc1"] is None and rows["IMAGENET1K_FEATURES"]["acc5"] is None
    assert rows["IMAGENET1K_V1"]["acc1"] == pytest.approx(71.592)
    (features,) = [r for r in torchvision_rows("vgg16") if r.weights == "IMAGENET1K_FEATURES"]
    assert features.acc1 is None and features.acc5 is None
    assert main(["zoo", "vgg16", "--format", "csv", "--source", "torchvision"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "IMAGENET1K_FEATURES" in ln]
    assert "nan" not in line.lower() and line.startswith("vgg16,IMAGENET1K_FEATURES,224,,,")
    assert main(["zoo", "vgg16", "--source", "torchvision"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "IMAGENET1K_FEATURES" in ln]
    assert "nan" not in line.lower()


@pytest.mark.parametrize(
    "args",
    [
        ["zoo", "lenet*", "--format", "json"],
        ["shape", "--input", "3x32x32", "--layers", "conv 6 5; pool max 2 ceil=1; fc 10", "--json"],
        ["shape", "--model", "lenet5", "--json"],
        ["summary", "lenet5", "--json"],
        ["models", "lenet*", "--details", "--json"],
    ],
)
def test_every_json_document_is_strict_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    _strict(capsys.readouterr().out)


# --- 'same' padding with an even effective kernel ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "d", "hw"),
    [
        ((4, 4), (1, 1), (8, 8)),
        ((2, 3), (1, 1), (5, 7)),
        ((4, 2), (2, 3), (9, 10)),
        ((6, 6), (1, 1), (3, 3)),
        ((3, 3), (2, 1), (6, 6)),
        ((1, 2), (1, 1), (1, 1)),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's reference conv
def test_same_padding_with_an_even_kernel_is_torchs_asymmetric_padding(
    k: tuple[int, int], d: tuple[int, int], hw: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, k, padding="same", dilation=d)
    x = torch.randn(1, 2, *hw)
    expected = conv(x)
    (row,) = walk(parse_layers(f"conv 3 {k[0]}x{k[1]} p=same d={d[0]}x{d[1]}"), (2, *hw))
    assert row.out_shape == tuple(expected.shape[1:])
    (top, bottom), (left, right) = row.padding
    # The padding cnnlab prints is the one torch applies: the odd pixel goes to the bottom / right.
    by_hand = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, dilation=d)
    torch.testing.assert_close(by_hand, expected)
    for line in row.formula[:2]:
        value, result = _evaluate(line)
        assert value == result
    stack = build_stack(parse_layers(f"conv 3 {k[0]}x{k[1]} p=same d={d[0]}x{d[1]}"), (2, *hw))
    assert stack(x).shape == expected.shape
    if d == (1, 1):
        assert conv_output_shape((2, *hw), 3, k, padding="same") == tuple(expected.shape[1:])


def test_cli_shape_prints_the_asymmetric_same_padding(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shape", "--input", "1x8x8", "--layers", "conv 4 4 p=same"]) == 0
    out = capsys.readouterr().out
    assert "conv 4 4 p=same -> 4x8x8 = 8x8x4" in out
    assert "H_out = floor((8 + 1 + 2 - 1*(4 - 1) - 1) / 1) + 1 = 8" in out
    assert (
        "padding 'same': 1 top + 2 bottom, 1 left + 2 right (torch puts the odd row/column at the bottom/right)" in out
    )
    assert main(["shape", "--input", "1x8x8", "--layers", "conv 4 4 p=same", "--json"]) == 0
    (layer,) = _strict(capsys.readouterr().out)["layers"]
    assert layer["out_shape"] == [4, 8, 8] and layer["padding"] == [[1, 2], [1, 2]]


def test_same_padding_still_refuses_what_torch_refuses() -> None:
    from cnnlab.arithmetic import ShapeError

    with pytest.raises(ShapeError, match="needs stride 1"):
        walk(parse_layers("conv 6 4 p=same s=2"), (1, 8, 8))
    with pytest.raises(ShapeError, match=r"pooling .*'same'"):
        walk(parse_layers("pool max 2 p=same"), (1, 8, 8))


# --- ceil-mode pooling ------------------------------------------------------------------------------------------------


def test_ceil_mode_formula_says_ceil_and_its_arithmetic_gives_the_result(capsys: pytest.CaptureFixture[str]) -> None:
    (row,) = walk(parse_layers("pool max 2 ceil=1"), (1, 13, 13))
    assert row.out_shape == (1, 7, 7)
    assert row.formula[0] == "H_out = ceil((13 + 2*0 - 1*(2 - 1) - 1) / 2) + 1 = 7"
    assert main(["shape", "--input", "1x13x13", "--layers", "pool max 2 ceil=1"]) == 0
    out = capsys.readouterr().out
    assert "ceil((13 + 2*0 - 1*(2 - 1) - 1) / 2) + 1 = 7" in out and "floor" not in out


def test_ceil_mode_drops_a_last_window_that_starts_in_the_right_padding() -> None:
    (row,) = walk(parse_layers("pool max 2 p=1 ceil=1"), (1, 5, 5))
    assert row.out_shape == tuple(nn.MaxPool2d(2, padding=1, ceil_mode=True)(torch.zeros(1, 1, 5, 5)).shape[1:])
    assert row.formula[0] == "H_out = ceil((5 + 2*1 - 1*(2 - 1) - 1) / 2) + 1 - 1 = 3"
    assert any("would start at 6" in line and "torch drops it" in line for line in row.formula)


def test_every_pooling_formula_line_computes_torchs_output_size() -> None:
    for n, k, s, d, ceil, kind in itertools.product(range(1, 12), (1, 2, 3, 4), (1, 2, 3), (1, 2), (False, True),
                                                    ("max", "avg")):  # fmt: skip
        if kind == "avg" and d > 1:
            continue
        for p in range(k // 2 + 1):
            layer = (nn.MaxPool2d(k, s, p, d, ceil_mode=ceil) if kind == "max"
                     else nn.AvgPool2d(k, s, p, ceil_mode=ceil))  # fmt: skip
            try:
                expected = layer(torch.zeros(1, 1, n, n)).shape[-1]
            except RuntimeError:
                continue
            text = f"pool {kind} {k} s={s} p={p} d={d} ceil={int(ceil)}" if kind == "max" else (
                f"pool {kind} {k} s={s} p={p} ceil={int(ceil)}")  # fmt: skip
            (row,) = walk(parse_layers(text), (1, n, n))
            assert row.out_shape[-1] == expected, text
            value, result = _evaluate(row.formula[0])
            assert value == result == expected, (text, n, row.formula[0])
            assert row.formula[0].startswith("H_out = ceil(" if ceil else "H_out = floor("), row.formula[0]


# --- LeNet-5's multiply-accumulates -----------------------------------------------------------------------------------


def test_lenet5_macs_are_the_papers_count_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    # C1 6@28x28 from 5x5; C3 10x10 over its 60 connections (Table I); C5 120 x 16x5x5; F6 84 x 120.
    paper = 28 * 28 * 6 * 25 + 10 * 10 * 60 * 25 + 120 * 16 * 25 + 84 * 120
    assert paper == 325_680
    model = create_model("lenet5")
    assert totals(model, summarize(model, (1, 32, 32))).macs == paper
    assert count_macs(model, (1, 32, 32)) == paper
    (row,) = own_rows("lenet5")
    assert round(row.gflops * 1e9) == paper
    assert main(["zoo", "lenet5", "--format", "json", "--source", "ours"]) == 0
    (doc,) = _strict(capsys.readouterr().out)
    assert round(doc["gflops"] * 1e9) == paper
    assert main(["summary", "lenet5"]) == 0
    assert f"MACs {paper:,} in conv/linear layers, {paper:,} in all matrix products" in capsys.readouterr().out
    assert main(["shape", "--model", "lenet5", "--json"]) == 0
    assert sum(r["macs"] for r in _strict(capsys.readouterr().out)["layers"]) == paper


def test_a_full_connection_table_counts_like_a_dense_conv() -> None:
    # The custom count agrees with torch's own FLOP counter where C3 is dense (lenet5-modern), so only the missing
    # connections of the paper's table make the difference.
    modern = create_model("lenet5-modern")
    assert count_macs(modern, (1, 32, 32)) == totals(modern, summarize(modern, (1, 32, 32))).macs == 416_520
