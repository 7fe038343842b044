"""The `cnnlab` command: argument parsing and printing only; every command is a thin call into the library."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cnnlab import cli_bench, cli_cache, cli_lrfind, cli_train, cli_use
from cnnlab.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    int_at_least,
    parse_model_args,  # noqa: F401  (importable from here, as it always was)
)
from cnnlab.cli_train import parse_checkpoint_every  # noqa: F401
from cnnlab.errors import CnnlabError, UsageError


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab models`."""
    p = sub.add_parser(
        "models",
        description="List registered models: cnnlab's own and every torchvision classification builder.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'resnet*' (default: all)")
    p.add_argument("--pretrained", action="store_true", help="only models with pretrained weights")
    p.add_argument(
        "--details",
        action="store_true",
        help="build each model for --in-channels/--image-size and say what cnnlab changed to fit",
    )
    p.add_argument("--in-channels", type=int_at_least(1), default=None, help="input channels for --details")
    p.add_argument("--image-size", type=int_at_least(1), default=None, help="input side for --details")
    p.add_argument("--num-classes", type=int_at_least(1), default=10, help="classes for --details (10)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """`cnnlab models [PATTERN]`."""
    from cnnlab.models import list_models, model_info

    names = [n for n in list_models(args.pattern) if not args.pretrained or "pretrained" in model_info(n).tags]
    if not names:
        raise CnnlabError(f"no model matches {args.pattern!r}; see `cnnlab models`")
    rows = []
    for n in names:
        i = model_info(n)
        row: dict[str, Any] = {
            "name": n,
            "family": i.family,
            "input": f"{i.default_in_channels}x{i.default_image_size}x{i.default_image_size}",
            "description": i.description,
        }
        if args.details:
            row.update(_model_details(n, args))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2, allow_nan=False))
        return EXIT_OK
    from cnnlab.reporting import print_table

    if not args.details:
        print_table(["name", "family", "default input", "description"], [list(r.values()) for r in rows])
        return EXIT_OK
    for r in rows:
        print(f"{r['name']} ({r['family']}) for {r['built_for']}: {r['params']:,} params")
        for change in r["changes"] or ["no changes: used as designed"]:
            print(f"    {change}")
    return EXIT_OK


def _model_details(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cnnlab.models import create_model, model_info

    info = model_info(name)
    c = args.in_channels or info.default_in_channels
    size = args.image_size or info.default_image_size
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=args.num_classes, in_channels=c, image_size=size)
    except UsageError as e:
        return {"built_for": f"{c}x{size}x{size}", "params": 0, "changes": [f"cannot build: {e}"]}
    return {
        "built_for": f"{c}x{size}x{size}, {args.num_classes} classes",
        "params": sum(p.numel() for p in model.parameters()),
        "changes": getattr(model, "cnnlab_changes", []),
    }


def add_zoo_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab zoo`."""
    p = sub.add_parser(
        "zoo",
        description="The zoo table. Acc@1/Acc@5 come from torchvision's weights metadata; Params and GFLOPS are "
        "measured by cnnlab on the meta device at each weights' input size. GFLOPS = billions of multiply-"
        "accumulates per image, as torchvision's table counts them (torch's FlopCounterMode counts 2 FLOPs per "
        "MAC; cnnlab halves it).",
    )  # fmt: skip
    p.add_argument("pattern", nargs="?", default="*", help="wildcard over model names (default: all)")
    p.add_argument("--format", choices=("table", "csv", "json", "markdown"), default="table", help="(table)")
    p.add_argument("--source", choices=("all", "torchvision", "ours"), default="all", help="which models (all)")
    p.add_argument("--sort", choices=("name", "acc1", "params", "gflops"), default="name", help="(name)")
    p.set_defaults(func=cmd_zoo)


def cmd_zoo(args: argparse.Namespace) -> int:
    """`cnnlab zoo`."""
    from cnnlab.inspect.zoo import matches_torchvision, own_rows, torchvision_rows
    from cnnlab.reporting import LineProgress

    progress = LineProgress("zoo")  # every torchvision weights entry is measured: a minute for all of them
    try:
        rows = torchvision_rows(args.pattern, progress) if args.source != "ours" else []
    finally:
        progress.close()
    rows += own_rows(args.pattern) if args.source != "torchvision" else []
    if not rows:
        raise CnnlabError(f"no model matches {args.pattern!r}")
    key = {"name": lambda r: (r.model, r.weights), "acc1": lambda r: -(r.acc1 or 0), "params": lambda r: r.params,
           "gflops": lambda r: r.gflops}[args.sort]  # fmt: skip
    rows.sort(key=key)
    if args.format == "json":
        # allow_nan=False: strict JSON (a missing accuracy is null, never NaN), as JSON.parse and jq require.
        doc = [{**r.to_dict(), "matches_torchvision": matches_torchvision(r)} for r in rows]
        print(json.dumps(doc, indent=2, allow_nan=False))
        return EXIT_OK
    header = ["model", "weights", "input", "Acc@1", "Acc@5", "Params", "GFLOPS", "= torchvision"]

    def fmt(r: Any) -> list[str]:
        check = "yes" if matches_torchvision(r) else ("-" if r.tv_params is None else "NO")
        acc = (f"{r.acc1:.3f}" if r.acc1 is not None else "-", f"{r.acc5:.3f}" if r.acc5 is not None else "-")
        return [r.model, r.weights, str(r.input_size), *acc, f"{r.params / 1e6:.1f}M", f"{r.gflops:.3f}"
                if r.gflops >= 0.001 else f"{r.gflops:.2e}", check]  # fmt: skip

    table = [fmt(r) for r in rows]
    if args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["model", "weights", "input", "acc1", "acc5", "params", "gmacs", "matches_torchvision"])
        writer.writerows([r.model, r.weights, r.input_size, r.acc1, r.acc5, r.params, f"{r.gflops:.6f}",
                          matches_torchvision(r)] for r in rows)  # fmt: skip
    elif args.format == "markdown":
        print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
        print("\n".join("| " + " | ".join(row) + " |" for row in table))
    else:
        from cnnlab.reporting import print_table

        print_table(header, table, title="GFLOPS = GMACs per image (as torchvision's table)")
    return EXIT_OK


def add_summary_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab summary`."""
    p = sub.add_parser(
        "summary",
        description="A per-layer table like torchinfo or Keras summary(), from a real forward pass "
        "(on the meta device for torchvision models: no memory, no compute).",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="a registered model name (or use --layers)")
    p.add_argument("--layers", help="a layer stack as in `cnnlab shape --layers`, e.g. 'conv 6 5'")
    p.add_argument("--input-size", default=None, help="C,H,W (default: the model's own; e.g. 3,32,32)")
    p.add_argument(
        "--num-classes", type=int_at_least(1), default=None, help="classes (default 10; 1000 for torchvision models)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    """`cnnlab summary MODEL`."""
    from cnnlab import arithmetic as ar
    from cnnlab.inspect.summary import summarize, totals

    if bool(args.model) == bool(args.layers):
        raise UsageError("give a MODEL name or --layers (one of them)")
    if args.layers:
        if not args.input_size:
            raise UsageError("--input-size C,H,W is required with --layers, e.g. --input-size 3,32,32")
        shape = ar.parse_shape(args.input_size, "--input-size")
        import torch

        with torch.device("meta"):  # shapes only: any input size, nothing allocated
            model, title = ar.build_stack(ar.parse_layers(args.layers), shape), args.layers
    else:
        model, shape = _summary_model(args)
        title = args.model
    rows = summarize(model, shape)
    tot = totals(model, rows)
    if args.json:
        print(json.dumps({"model": title, "input": list(shape), "layers": _layer_dicts(rows), "params": tot.params,
                          "trainable": tot.trainable, "macs": tot.macs, "activation_bytes": tot.activation_bytes},
                         indent=2, allow_nan=False))  # fmt: skip
        return EXIT_OK
    _print_layer_table(title, shape, rows)
    from cnnlab.inspect.zoo import count_macs

    all_macs = count_macs(model, shape)
    print(
        f"params {tot.params:,} ({tot.trainable:,} trainable) | MACs {tot.macs:,} in conv/linear layers, "
        f"{all_macs:,} in all matrix products (FlopCounterMode / 2) | "
        f"activations {tot.activation_bytes / 2**20:.2f} MiB per image (float32)"
    )
    return EXIT_OK


def _summary_model(args: argparse.Namespace) -> tuple[Any, tuple[int, int, int]]:
    from cnnlab.models import model_info

    classes = args.num_classes or (1000 if "torchvision" in model_info(args.model).tags else 10)
    return _model_to_walk(args.model, args.input_size, "--input-size", classes)


def _model_to_walk(name: str, input_text: str | None, option: str, num_classes: int
                   ) -> tuple[Any, tuple[int, int, int]]:  # fmt: skip
    """A registered model and its (C, H, W) input for a per-layer walk, on the meta device (nothing allocated)."""
    import torch

    from cnnlab import arithmetic as ar
    from cnnlab.models import create_model, model_info

    info = model_info(name)
    shape = ar.parse_shape(input_text, option) if input_text else (info.default_in_channels,
                                                                   info.default_image_size,
                                                                   info.default_image_size)  # fmt: skip
    # Shapes only, on the meta device: a ViT-H/14 walk in a second without 2.5 GB, a 100000x100000 input without 40 GB.
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, in_channels=shape[0], image_size=shape[1]), shape


def _layer_dicts(rows: list[Any]) -> list[dict[str, Any]]:
    return [{"name": r.name, "kind": r.kind, "out_shape": list(r.out_shape), "params": r.params, "macs": r.macs}
            for r in rows]  # fmt: skip


def _print_layer_table(title: str, shape: tuple[int, ...], rows: list[Any], extra: Sequence[list[str]] = ()) -> None:
    from cnnlab import arithmetic as ar
    from cnnlab.reporting import print_table

    table = [[r.name, r.kind, _shape_both(r.out_shape), f"{r.params:,}", f"{r.macs:,}"] for r in rows]
    print(f"{title} on input {ar.fmt_shape(shape)}")
    print_table(["layer", "type", "output (C x H x W = H x W x C)", "params", "MACs"], [*table, *extra])


def add_kernels_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab kernels`."""
    p = sub.add_parser(
        "kernels",
        description="List the named kernels that `cnnlab filter --kernel` accepts, with matrices.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_kernels)


def cmd_kernels(args: argparse.Namespace) -> int:
    """`cnnlab kernels`."""
    from cnnlab.kernels import describe_gain, format_matrix, list_kernels, resolve_kernel

    kernels = [resolve_kernel(n) for n in list_kernels()]
    if args.json:
        print(json.dumps([{"name": k.name, "description": k.description, "matrices": [m.tolist() for m in
                           k.matrices]} for k in kernels], indent=2))  # fmt: skip
        return EXIT_OK
    for k in kernels:
        print(f"{k.name}: {k.description}")
        blocks = [format_matrix(m) for m in k.matrices]
        for row in zip(*blocks, strict=True):
            print("    " + "      ".join(row))
        print(f"    ({describe_gain(k)})\n")
    print("Also: gaussian:SIZE:SIGMA, box:SIZE, a matrix inline ('0,-1,0;-1,5,-1;0,-1,0'), or a .txt/.json/.npy file.")
    return EXIT_OK


def add_filter_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab filter`."""
    from cnnlab.kernels import PADDINGS

    p = sub.add_parser(
        "filter",
        description="Apply kernels to an image by cross-correlation, exactly as nn.Conv2d computes it (--convolve "
        "flips the kernel for true convolution). Colour images are filtered per channel. IMAGE may be `sample`, "
        "a photo that ships with matplotlib.",
    )  # fmt: skip
    p.add_argument(
        "image",
        metavar="IMAGE",
        help="PNG/JPEG/BMP/TIFF/WebP file (8- or 16-bit), `sample`, or a small "
        "grayscale picture as a .txt/.csv/.json/.npy matrix of 0..255 values",
    )
    p.add_argument(
        "--kernel",
        "-k",
        action="append",
        default=[],
        metavar="K",
        help="named kernel (see `cnnlab kernels`), gaussian:SIZE:SIGMA, box:SIZE, an inline matrix "
        "'0,-1,0;-1,5,-1;0,-1,0', or a .txt/.json/.npy file; repeat to chain",
    )
    p.add_argument("--out", "-o", default=None, help="output image (default <image>_<kernel>.png here)")
    p.add_argument("--gray", action="store_true", help="convert a colour image to grayscale first")
    p.add_argument(
        "--padding",
        choices=PADDINGS,
        default="zero",
        help="border handling; valid = no padding, the output shrinks by kernel-1 (zero)",
    )
    p.add_argument("--convolve", action="store_true", help="flip the kernel: true convolution, not correlation")
    rng = p.add_mutually_exclusive_group()
    rng.add_argument(
        "--clip", dest="range", action="store_const", const="clip", help="cut values to the image range (default)"
    )
    rng.add_argument(
        "--abs", dest="range", action="store_const", const="abs", help="absolute value, then cut (edges of both signs)"
    )
    rng.add_argument(
        "--normalize",
        dest="range",
        action="store_const",
        const="normalize",
        help="rescale min..max to the full range (for edge maps)",
    )
    p.add_argument(
        "--side-by-side", action="store_true", help="also write <out>-side-by-side.png: the original beside the result"
    )
    p.add_argument(
        "--explain",
        metavar="X,Y",
        default=None,
        help="print the weighted sum behind output pixel (column X, row Y, from 0) per channel",
    )
    p.add_argument("--pool", choices=("max", "avg"), default=None, help="pool after the kernels (or alone)")
    p.add_argument("--size", type=int_at_least(1), default=2, help="pooling window (2)")
    p.add_argument("--stride", type=int_at_least(1), default=None, help="pooling stride (default: --size)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_filter, range="clip")


def _parse_xy(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--explain {text!r}: expected X,Y such as 14,10") from None
    return x, y


def cmd_filter(args: argparse.Namespace) -> int:
    """`cnnlab filter IMAGE --kernel K ...`."""
    from cnnlab.filtering import run_filter

    if not args.kernel and not args.pool:
        raise UsageError("give at least one --kernel (see `cnnlab kernels`) or --pool")
    xy = _parse_xy(args.explain) if args.explain else None
    report = run_filter(
        args.image,
        args.kernel,
        out=args.out,
        gray=args.gray,
        padding=args.padding,
        convolve=args.convolve,
        value_range=args.range,
        side_by_side=args.side_by_side,
        explain=xy,
        pool_kind=args.pool,
        pool_size=args.size,
        pool_stride=args.stride,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    for text in report.explanations:
        print(text + "\n")
    for line in report.summary_lines():
        print(line)
    return EXIT_OK


def add_shape_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab shape`."""
    p = sub.add_parser(
        "shape",
        description="Convolution arithmetic with torch's formulas: out = floor((in + 2p - d(k-1) - 1)/s) + 1 "
        "(ceil with ceil=1, where torch drops a last window that would start in the right padding; p=same pads an "
        "even kernel's extra row/column at the bottom/right, as torch does). Shapes are C x H x W as in torch; the "
        "lecture's H x W x C order is shown beside them.",
    )  # fmt: skip
    p.add_argument("--input", default=None, help="input C x H x W, e.g. 3x32x32 (with --model: its default)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--conv",
        metavar="OUT,K[,S[,P]]",
        help="one conv layer: out channels, kernel, stride, padding (a number, same or valid)",
    )
    what.add_argument("--pool", metavar="KIND,K[,S[,P]]", help="one pooling layer, e.g. max,2")
    what.add_argument("--tconv", metavar="OUT,K[,S[,P[,OP]]]", help="one transposed conv layer")
    what.add_argument(
        "--layers",
        metavar="STACK",
        help="a stack such as 'conv 6 5; pool max 2; conv 16 5; "
        "pool max 2; fc 120; fc 84; fc 10' (options: s= p= d= g= op= bias= ceil=; also gap, "
        "flatten, bn, relu)",
    )
    what.add_argument("--model", help="walk a registered model instead")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_shape)


def _shorthand_layer(args: argparse.Namespace) -> str:
    """--conv 6,5,1,2 -> 'conv 6 5 s=1 p=2' (and likewise --pool / --tconv)."""
    if args.conv:
        kind, parts, keys = "conv", args.conv.split(","), ["", "", "s", "p"]
    elif args.pool:
        kind, parts, keys = "pool", args.pool.split(","), ["", "", "s", "p"]
    else:
        kind, parts, keys = "tconv", args.tconv.split(","), ["", "", "s", "p", "op"]
    if len(parts) < 2 or len(parts) > len(keys):
        raise UsageError(f"--{kind} {','.join(parts)!r}: expected {len(keys)} values at most, at least 2")
    words = [kind] + [f"{k}={v}" if k else v for k, v in zip(keys, (p.strip() for p in parts), strict=False)]
    return " ".join(words)


def cmd_shape(args: argparse.Namespace) -> int:
    """`cnnlab shape`."""
    from cnnlab import arithmetic as ar

    if args.model:
        return _shape_of_model(args)
    if not args.input:
        raise UsageError("--input is required, e.g. --input 3x32x32")
    shape = ar.parse_shape(args.input)
    layers = ar.parse_layers(args.layers) if args.layers else [ar.parse_layer(_shorthand_layer(args))]
    rows = ar.walk(layers, shape)
    if args.json:
        print(
            json.dumps(
                {
                    "input": list(shape),
                    "layers": [_row_dict(r) for r in rows],
                    "params": sum(r.params for r in rows),
                    "macs": sum(r.macs for r in rows),
                },
                indent=2,
                allow_nan=False,
            )
        )
        return EXIT_OK
    print(f"input {ar.fmt_shape(shape)} (C x H x W; {ar.lecture_shape(shape)} as H x W x C)")
    if len(rows) == 1:
        r = rows[0]
        print(f"{r.layer} -> {_shape_both(r.out_shape)}")
        for line in r.formula:
            print(f"  {line}")
        print(f"  MACs = {r.macs:,}; receptive field {_rf(r)}")
        return EXIT_OK
    from cnnlab.reporting import print_table

    table = [[r.index, r.layer, _shape_both(r.out_shape), f"{r.params:,}", f"{r.macs:,}", _rf(r)] for r in rows]
    table.append(["", "total", "", f"{sum(r.params for r in rows):,}", f"{sum(r.macs for r in rows):,}", ""])
    print_table(["#", "layer", "output (C x H x W = H x W x C)", "params", "MACs", "receptive field"], table)
    return EXIT_OK


def _shape_both(shape: tuple[int, ...]) -> str:
    from cnnlab import arithmetic as ar

    return f"{ar.fmt_shape(shape)} = {ar.lecture_shape(shape)}" if len(shape) == 3 else ar.fmt_shape(shape)


def _rf(row: Any) -> str:
    return "whole input" if row.receptive_field is None else f"{row.receptive_field[0]}x{row.receptive_field[1]}"


def _row_dict(r: Any) -> dict[str, Any]:
    return {"index": r.index, "layer": r.layer, "in_shape": list(r.in_shape), "out_shape": list(r.out_shape),
            "params": r.params, "macs": r.macs, "receptive_field": list(r.receptive_field) if r.receptive_field
            else None, "padding": [list(p) for p in r.padding] if r.padding else None,
            "formula": r.formula}  # fmt: skip


def _shape_of_model(args: argparse.Namespace) -> int:
    from cnnlab.inspect.summary import summarize

    model, shape = _model_to_walk(args.model, args.input, "--input", num_classes=10)
    rows = summarize(model, shape)
    if args.json:
        doc = {"model": args.model, "input": list(shape), "layers": _layer_dicts(rows)}
        print(json.dumps(doc, indent=2, allow_nan=False))
        return EXIT_OK
    total = ["total", "", "", f"{sum(r.params for r in rows):,}", f"{sum(r.macs for r in rows):,}"]
    _print_layer_table(args.model, shape, rows, [total])
    return EXIT_OK


@dataclass(frozen=True)
class Command:
    """A `cnnlab` command: the line `cnnlab --help` shows for it, and the function that adds its parser."""

    help: str
    builder: Callable[[argparse._SubParsersAction], None]  # called for the command being run only (train's: torch)


COMMANDS: dict[str, Command] = {
    "train": Command("train a model (default: LeNet-5 on the embedded MNIST subset)", cli_train.add_train_parser),
    "lr-find": Command(
        "learning-rate range test: the training loss at rising rates, and a suggested --lr",
        cli_lrfind.add_lrfind_parser,
    ),
    "models": Command("list registered models", add_models_parser),
    "kernels": Command("list the named image kernels with their matrices", add_kernels_parser),
    "filter": Command("apply image kernels (or pooling) to an image; explain one output pixel", add_filter_parser),
    "shape": Command("conv/pool output shapes, parameters, MACs and receptive field, layer by layer", add_shape_parser),
    "zoo": Command(
        "params, GFLOPS and ImageNet accuracy of every torchvision weights entry (and ours)", add_zoo_parser
    ),
    "summary": Command("per-layer table: output shape, params, MACs, totals", add_summary_parser),
    "evaluate": Command(
        "top-1/top-5, per-class metrics and the confusion matrix of a trained run", cli_use.add_evaluate_parser
    ),
    "predict": Command("top-k labels with probabilities for image files", cli_use.add_predict_parser),
    "visualize": Command(
        "pictures of a trained run: filters, activation maps, Grad-CAM, curves", cli_use.add_visualize_parser
    ),
    "export": Command("export a trained run to ONNX or TorchScript, with a parity check", cli_use.add_export_parser),
    "explore": Command(
        "a local web page: draw a digit, watch the prediction and every activation map; kernel playground",
        cli_use.add_explore_parser,
    ),
    "bench": Command("speed: time to accuracy against the peer loop; model throughput", cli_bench.add_bench_parser),
    "cache": Command(
        "list the cached decoded images and downloaded datasets with their sizes; clear them",
        cli_cache.add_cache_parser,
    ),
}


class _Commands(argparse._SubParsersAction):
    """The subcommands: a builder's `add_parser(name)` gets the one-line help from COMMANDS."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """Add the parser of command `name`."""
        kwargs.setdefault("help", COMMANDS[name].help)
        return super().add_parser(name, **kwargs)


class _Version(argparse.Action):
    """`--version`: the line is composed only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show program's version number and exit")  # fmt: skip

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        """Print the versions on stdout and exit 0."""
        sys.stdout.write(version_line() + "\n")
        parser.exit()


def version_line() -> str:
    """`cnnlab X (torch Y, torchvision Z)`, read from the installed files: importing torch would take seconds."""
    import cnnlab

    return f"cnnlab {cnnlab.__version__} (torch {_version_of('torch')}, torchvision {_version_of('torchvision')})"


def _version_of(package: str) -> str:
    """A package's `__version__` (torch: '2.6.0+cu124', with its build) from its version.py, without importing it."""
    if package in sys.modules:
        return str(sys.modules[package].__version__)
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)  # the release without the build ('2.6.0')
    except PackageNotFoundError:
        return "not installed"


def build_parser(commands: Iterable[str] | None = None) -> Parser:
    """The `cnnlab` argument parser, with the options of `commands` only (of every command when None).

    Every command is listed either way. Building a command's options imports what they need (`train`: torch), so
    main() builds only the command being run: `cnnlab --help`, `cnnlab shape ...` and `cnnlab kernels` start fast.
    """
    parser = Parser(
        prog="cnnlab",
        description="Convolutional neural networks from a single 3x3 kernel to the ImageNet model zoo.",
        epilog="Run `cnnlab COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, action=_Commands)
    wanted = None if commands is None else set(commands)
    for name, command in COMMANDS.items():
        if wanted is None or name in wanted:
            command.builder(sub)
        else:
            sub.add_parser(name)  # listed; its options are built when it runs
    return parser


def entry() -> NoReturn:
    """The `cnnlab` command itself (the console script, `python -m cnnlab`): main(), then the process exits."""
    code = main()
    _end_worker_process(code)
    sys.exit(code)


def _end_worker_process(code: int) -> None:
    """A data-parallel worker leaves without finalising Python: its gloo threads can abort the process at exit.

    gloo's worker threads release a collective's buffers a moment after it completes, and that needs the GIL. When
    the interpreter finalises while one still waits for it, the thread is torn down and the C++ runtime aborts the
    process ("terminate called without an active exception", SIGABRT): torchrun then reports a failed job although
    training finished and every file was written. A barrier before leaving the group narrowed the window but 8
    processes on 2 cores still hit it (1 of 16 runs). The run's files are closed by now (the trainer's `finally`,
    loggers that write synchronously), so flushing stdio and leaving with os._exit loses nothing and skips the
    finalisation the abort happens in. Python's fit() under torchrun does not pass here (see docs/distributed.md).
    """
    distributed = sys.modules.get("cnnlab.engine.distributed")  # not imported: not a worker (and stays torch-free)
    if distributed is None or not distributed.started_a_group():
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what was printed is lost, so not a success (as Python's 120)
            code = code or 120
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `cnnlab` command (argv: sys.argv[1:] when None); every error becomes one line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser([a for a in argv if not a.startswith("-")][:1])  # the command: its first word
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args.argv = argv  # the command as typed (--devices relaunches it under torchrun)
        return args.func(args)
    except CnnlabError as e:
        if debug:
            traceback.print_exc()
        # The library names Python keywords (batch_size); on the command line the user typed flags (--batch-size).
        text = e.cli_message()
        if not _left_for_launcher(text, e.exit_code, internal=False):
            sys.stderr.write(f"cnnlab: error: {text}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("cnnlab: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        distributed = sys.modules.get("cnnlab.engine.distributed")
        lost = distributed.peer_lost(e) if distributed is not None else None
        message = lost or f"internal error: {type(e).__name__}: {first} (rerun with --debug for details)"
        if not _left_for_launcher(message, EXIT_FAILURE, internal=True):
            sys.stderr.write(f"cnnlab: error: {message}\n")
        return EXIT_FAILURE


def _left_for_launcher(message: str, code: int, internal: bool) -> bool:
    """A worker of `cnnlab train --devices N` hands its error to the launcher, which prints the root cause once."""
    if not os.environ.get("CNNLAB_WORKER_REPORTS"):
        return False
    from cnnlab.engine.distributed import report_failure

    return report_failure(message, code, internal)
