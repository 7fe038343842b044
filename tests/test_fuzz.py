"""Fuzzing the parsers and image reader: any input ends in a result or a cnnlab error, never a crash.

The @example inputs are the corpus of inputs that once failed (or nearly did); they run first, every time.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.arithmetic import ShapeError, parse_layers, parse_shape, walk
from cnnlab.cli import parse_checkpoint_every, parse_model_args
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.kernels import parse_matrix, resolve_kernel

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.text(alphabet="0123456789-+.,;/ eE\n\tinfa", max_size=40))
@example("1/0")
@example("1e309")
@example("nan")
@example("1,2;3")
@example(";;")
def test_kernel_strings(text: str) -> None:
    try:
        m = parse_matrix(text)
    except UsageError:
        return
    assert m.ndim == 2 and m.size and np.isfinite(m).all()


@FUZZ
@given(st.text(max_size=30))
@example("3x32x32x")
@example("0x3x3")
@example("3 × 32 × 32")
def test_input_sizes(text: str) -> None:
    try:
        shape = parse_shape(text)
    except ShapeError:
        return
    assert len(shape) == 3 and min(shape) >= 1


@FUZZ
@given(st.text(alphabet="convtpolmaxvgfcbnrelu0123456789 =;spdgx", max_size=60))
@example("conv 3 3 g=0")
@example("tconv 3 4 s=1 p=2")
@example("pool max 2 p=2")
@example("fc 10; relu; bn")
def test_layer_stacks(text: str) -> None:
    try:
        rows = walk(parse_layers(text), (3, 16, 16))
    except ShapeError:
        return
    assert all(min(r.out_shape) >= 1 for r in rows)


@FUZZ
@given(st.text(max_size=30))
@example("gaussian:0:1")
@example("gaussian:3:-1")
@example("box:0")
def test_kernel_names(text: str) -> None:
    with contextlib.suppress(UsageError):
        resolve_kernel(text)


@FUZZ
@given(st.text(max_size=20))
@example("0m")
@example("-5")
@example("m")
def test_checkpoint_every_and_model_args(text: str) -> None:
    for parse in (parse_checkpoint_every, parse_model_args):
        with contextlib.suppress(UsageError):
            parse(text)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


@FUZZ
@given(st.data())
def test_image_files(tmp_path_factory: object, data: st.DataObject) -> None:
    """Random bytes, and real PNGs with random bytes cut off or flipped, read cleanly or fail cleanly."""
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "truncated":
        blob = PNG[: data.draw(st.integers(0, len(PNG) - 1))]
    else:
        i = data.draw(st.integers(0, len(PNG) - 1))
        blob = PNG[:i] + bytes([PNG[i] ^ data.draw(st.integers(1, 255))]) + PNG[i + 1 :]
    path = Path(tmp_path_factory.mktemp("fuzz")) / "x.png"  # type: ignore[attr-defined]
    path.write_bytes(blob)
    try:
        pixels, max_value = read_image(path)
    except CnnlabError:
        return
    assert pixels.ndim == 3 and max_value in (255, 65535)
