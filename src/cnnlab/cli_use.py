"""Commands that use a trained run: evaluate, predict, visualize, export (parsing and printing only)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from cnnlab.cli_common import EXIT_OK, int_at_least
from cnnlab.errors import UsageError


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where to run the model: cpu, cuda, cuda:N, mps, auto (cpu)")


def _load(args: argparse.Namespace) -> Any:
    from cnnlab.engine.device import resolve_device
    from cnnlab.engine.inference import load_run

    return load_run(args.run, device=resolve_device(args.device))


def _out_dir(args: argparse.Namespace, run: Path) -> Path:
    from cnnlab.engine.rundir import make_dir

    if not getattr(args, "out", None):
        return run
    return make_dir(Path(args.out), "out")


# --- evaluate ---------------------------------------------------------------------------------------------------------


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab evaluate`."""
    p = sub.add_parser(
        "evaluate",
        description="Evaluate a trained run (its best weights) on its own test split, or on another dataset or "
        "folder with the same classes. Writes confusion.png, misclassified.png and evaluation.json. A multi-label "
        "run reports mAP, exact match and per-label AP, precision, recall and F1 at its thresholds.",
    )
    p.add_argument("run", help="run directory (or a .safetensors/.ckpt file inside one)")
    p.add_argument("--data", default=None, help="another dataset name or image folder (default: the run's own)")
    p.add_argument("--data-dir", default=None, help="where to look for dataset files (as in train)")
    p.add_argument("--split", choices=("test", "val", "train", "all"), default="test", help="which split (test)")
    p.add_argument("--normalize", action="store_true", help="confusion.png shows row percentages, not counts")
    p.add_argument("--worst", type=int_at_least(0), default=16, help="misclassified images in the picture (16)")
    p.add_argument("--out", default=None, help="folder for the pictures and evaluation.json (default: the run)")
    p.add_argument("--json", action="store_true", help="print every number as one JSON document")
    _device_option(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`cnnlab evaluate`."""
    from cnnlab.engine.inference import evaluate_run
    from cnnlab.engine.rundir import safe_name
    from cnnlab.fileio import atomic_write_json
    from cnnlab.inspect.visualize import plot_confusion, plot_image_grid

    loaded = _load(args)
    ev = evaluate_run(loaded, data=args.data, data_dir=args.data_dir, split=args.split, worst=args.worst)
    out = _out_dir(args, loaded.path)
    suffix = "" if args.data is None and args.split == "test" else "-" + safe_name(f"{ev.data}-{args.split}")
    title = f"{loaded.record.model.name} on {ev.data} ({args.split}, {ev.n:,} images)"
    files = {}
    if not ev.multi_label:  # a multi-label image has no single predicted class to count
        files["confusion"] = plot_confusion(ev.confusion, ev.classes, out / f"confusion{suffix}.png", args.normalize,
                                            title=f"confusion matrix: {title}")  # fmt: skip
    worst = "images with a wrong label, highest loss first" if ev.multi_label else "most confident mistakes"
    files["misclassified"] = plot_image_grid(ev.images, ev.mistake_captions(), out / f"misclassified{suffix}.png",
                                             title=f"{worst}: {title}")  # fmt: skip
    doc = _finite({**ev.to_dict(), "files": {k: str(v) for k, v in files.items()}})
    files["json"] = atomic_write_json(out / f"evaluation{suffix}.json", doc)
    doc["files"]["json"] = str(files["json"])
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    _print_evaluation(ev, files)
    return EXIT_OK


def _finite(value: Any) -> Any:
    """NaN and infinities (the AP of a label without test images) as null: JSON has no NaN, strict parsers refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _print_evaluation(ev: Any, files: dict[str, Path]) -> None:
    from cnnlab.reporting import print_table

    print(ev.headline())
    if ev.multi_label:
        rows = [[r["class"], f"{r['ap']:.3f}" if r["ap"] == r["ap"] else "-", f"{r['threshold']:.2f}",
                 f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                for r in ev.report["per_class"]]  # fmt: skip
        for avg in ("macro", "micro"):
            a = ev.report[avg]
            rows.append([f"{avg} avg", f"{ev.mAP:.3f}" if avg == "macro" else "", "", f"{a['precision']:.3f}",
                         f"{a['recall']:.3f}", f"{a['f1']:.3f}", a["support"]])  # fmt: skip
        print_table(["label", "AP", "threshold", "precision", "recall", "F1", "support"], rows,
                    title="per-label metrics (a label is predicted at probability >= its threshold)")  # fmt: skip
        for path in files.values():
            print(path)
        return
    rows = [[r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
            for r in ev.report["per_class"]]  # fmt: skip
    for avg in ("macro", "weighted"):
        a = ev.report[avg]
        rows.append([f"{avg} avg", f"{a['precision']:.3f}", f"{a['recall']:.3f}", f"{a['f1']:.3f}", a["support"]])
    print_table(["class", "precision", "recall", "F1", "support"], rows, title="per-class metrics")
    if len(ev.classes) <= 20:
        cm = ev.confusion.tolist()
        print_table(["true \\ predicted", *ev.classes], [[c, *row] for c, row in zip(ev.classes, cm, strict=True)],
                    title="confusion matrix (rows: true class)")  # fmt: skip
    if ev.confused:
        pairs = ", ".join(f"{c['true']} -> {c['predicted']} ({c['count']})" for c in ev.confused)
        print(f"most confused (true -> predicted): {pairs}")
    for path in files.values():
        print(path)


# --- predict ----------------------------------------------------------------------------------------------------------


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab predict`."""
    p = sub.add_parser(
        "predict",
        description="Predict image files (or every file in folders) with a trained run, preprocessed exactly as in "
        "training; or, with --model NAME --pretrained, with torchvision's ImageNet weights and category names.",
    )
    p.add_argument("inputs", nargs="+", metavar="RUN IMAGE", help="RUN then IMAGE... (with --model: IMAGE... only)")
    p.add_argument("--top-k", type=int_at_least(1), default=5,
                   help="labels per image (5); a multi-label run gives every label above its threshold")  # fmt: skip
    p.add_argument("--model", default=None, help="a torchvision model with pretrained weights, instead of a RUN")
    p.add_argument("--pretrained", action="store_true", help="with --model: use torchvision's weights")
    p.add_argument("--weights", default=None, metavar="FILE", help="with --model: the weights from a local file")
    p.add_argument("--weights-name", default=None, help="with --model: which weights, e.g. IMAGENET1K_V2 (DEFAULT)")
    p.add_argument("--invert", action="store_true", help="invert grey levels first (dark digits on white paper)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per forward pass (256)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document")
    fmt.add_argument("--csv", action="store_true", help="CSV: file,rank,label,probability")
    _device_option(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """`cnnlab predict`."""
    from cnnlab.engine.inference import predict_files, predict_pretrained

    if args.model:
        if not (args.pretrained or args.weights or args.weights_name):
            raise UsageError("--model: add --pretrained (or --weights FILE) to predict with torchvision's weights")
        preds = predict_pretrained(args.model, args.inputs, args.top_k, args.weights_name, args.weights)
    else:
        if args.pretrained or args.weights or args.weights_name:
            raise UsageError("--pretrained/--weights need --model NAME (a RUN has its own weights)")
        if len(args.inputs) < 2:
            raise UsageError("predict: give a RUN and at least one IMAGE (or --model NAME --pretrained IMAGE...)")
        args.run = args.inputs[0]
        loaded = _load(args)
        preds = predict_files(loaded, args.inputs[1:], args.top_k, args.invert, args.batch_size)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    elif args.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "rank", "label", "probability"])
        for p in preds:
            for rank, (label, prob) in enumerate(zip(p.labels, p.probs, strict=True), start=1):
                w.writerow([p.file, rank, label, f"{prob:.6f}"])
            if not p.labels:  # a multi-label image with no label above its threshold still has its row
                w.writerow([p.file, "", "", ""])
        sys.stdout.write(buf.getvalue())
    else:
        for p in preds:
            top = "  ".join(f"{label} {prob:.1%}" for label, prob in zip(p.labels, p.probs, strict=True))
            print(f"{p.file}  {top or '(no label reaches its threshold)'}")
    return EXIT_OK


# --- visualize --------------------------------------------------------------------------------------------------------


def add_visualize_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab visualize {filters,activations,gradcam,curves,batch}`."""
    p = sub.add_parser(
        "visualize",
        description="Write PNG pictures of what a trained run learned; prints their paths. IMAGE is an image file, "
        "or test:N for the N-th image of the run's test split.",
    )
    vs = p.add_subparsers(dest="what", metavar="WHAT", required=True, parser_class=type(p))
    specs = {
        "filters": "the kernels of the first conv layer (or --layer) as a grid; RGB kernels in colour",
        "activations": "the activation maps of each conv stage (or --layer) for one image",
        "gradcam": "a Grad-CAM heat map over the image for the predicted (or --class) label; a multi-label run: one "
        "per label above its threshold",
        "curves": "loss and accuracy per epoch from metrics.csv",
        "batch": "a training batch as the model saw it: the resize cut, the augmentations, MixUp/CutMix",
    }
    for what, text in specs.items():
        q = vs.add_parser(what, help=text, description=text)
        q.add_argument("run", help="run directory")
        if what in ("activations", "gradcam"):
            q.add_argument("image", help="an image file, or test:N (the N-th test image of the run's data)")
            q.add_argument("--invert", action="store_true", help="invert grey levels first (dark digits on white)")
        if what in ("filters", "activations", "gradcam"):
            q.add_argument("--layer", action="append", default=None, help="layer name (see `cnnlab summary`)")
        if what == "gradcam":
            q.add_argument("--class", dest="target", default=None, help="class name or index (default: predicted)")
        if what == "batch":
            q.add_argument("--count", type=int, default=32, help="images in the batch (default 32)")
            q.add_argument("--seed", type=int, default=0, help="draw another batch with another seed (default 0)")
        q.add_argument("--out", default=None, help="folder for the PNG files (default: the run directory)")
        _device_option(q)
        q.set_defaults(func=cmd_visualize)


def _run_image(loaded: Any, spec: str, invert: bool) -> tuple[Any, str]:
    """uint8 (C, S, S) for IMAGE (a file, or test:N), and a short name for titles and file names."""
    if spec.startswith("test:"):
        from cnnlab.engine.inference import eval_data

        try:
            index = int(spec[5:])
        except ValueError:
            raise UsageError(f"{spec}: expected test:N with a whole number N") from None
        data, _ = eval_data(loaded, None, None, "test")
        if not 0 <= index < len(data):
            raise UsageError(f"{spec}: the test split has {len(data)} images (0..{len(data) - 1})")
        import torch

        image = data.final(torch.tensor([index]))[0]
        return (255 - image if invert else image), f"test{index}"
    from cnnlab.engine.inference import load_files_for_run

    return load_files_for_run(loaded, [Path(spec)], invert)[0], Path(spec).stem


def cmd_visualize(args: argparse.Namespace) -> int:
    """`cnnlab visualize WHAT RUN ...`."""
    from cnnlab.engine import rundir
    from cnnlab.engine.record import RunRecord

    if args.what == "curves":
        from cnnlab.inspect.visualize import plot_curves

        run = rundir.resolve_run(args.run)
        rows = rundir.read_metrics(run)
        if not rows:
            raise UsageError(f"{run / rundir.METRICS}: no epochs recorded yet")
        title = RunRecord.read(run).title
        path = plot_curves(rows, _out_dir(args, run) / rundir.CURVES, title=title, best_epoch=rundir.best_epoch(rows))
        print(path)
        return EXIT_OK
    loaded = _load(args)
    out = _out_dir(args, loaded.path)
    show = {"filters": _filters, "activations": _activations, "gradcam": _gradcam, "batch": _batch}[args.what]
    paths = show(args, loaded, out)
    for path in paths:
        print(path)
    return EXIT_OK


def _batch(args: argparse.Namespace, loaded: Any, out: Path) -> list[Path]:
    from cnnlab.engine.inference import training_batch
    from cnnlab.inspect.visualize import plot_image_grid

    if not 1 <= args.count <= 256:
        raise UsageError(f"--count: {args.count}: give 1 to 256 images")
    if args.seed < 0:
        raise UsageError(f"--seed: {args.seed}: must be 0 or more")
    images, captions, title = training_batch(loaded, args.count, args.seed)
    return [plot_image_grid(images, captions, out / "batch.png", title=title)]


def _filters(args: argparse.Namespace, loaded: Any, out: Path) -> list[Path]:
    from torch import nn

    from cnnlab.engine.rundir import safe_name
    from cnnlab.inspect.features import check_layers
    from cnnlab.inspect.visualize import plot_filters

    model = loaded.model
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    layers = args.layer or convs[:1]
    if not layers:
        raise UsageError(f"{loaded.record.model.name} has no conv layer")
    check_layers(model, layers)
    paths = []
    for name in layers:
        weight = getattr(model.get_submodule(name), "weight", None)
        if weight is None or weight.dim() != 4:
            raise UsageError(f"--layer {name}: not a convolution (no 4-D weight); conv layers: {', '.join(convs[:8])}")
        shape = "×".join(str(s) for s in weight.shape)
        title = f"{loaded.record.model.name} {name}: {weight.shape[0]} kernels, weights {shape}"
        paths.append(plot_filters(weight, out / f"filters_{safe_name(name)}.png", title))
    return paths


def _activations(args: argparse.Namespace, loaded: Any, out: Path) -> list[Path]:
    from cnnlab.engine.rundir import safe_name
    from cnnlab.inspect.features import activations, conv_layers_in_order, default_stages
    from cnnlab.inspect.visualize import plot_activation_maps

    image, label = _run_image(loaded, args.image, args.invert)
    x = loaded.prepare(image[None])
    layers = args.layer or default_stages(conv_layers_in_order(loaded.model, x))
    maps = activations(loaded.model, x, layers)
    paths = []
    for name, a in maps.items():
        shape = "×".join(str(s) for s in a.shape)
        if a.dim() != 3:
            raise UsageError(f"--layer {name}: output {shape} is not a stack of feature maps")
        title = f"{name} {shape} for {label}"
        paths.append(plot_activation_maps(a, out / f"activations_{label}_{safe_name(name)}.png", title, image=image))
    return paths


def _gradcam(args: argparse.Namespace, loaded: Any, out: Path) -> list[Path]:
    from cnnlab.engine.rundir import safe_name
    from cnnlab.inspect.features import grad_cam
    from cnnlab.inspect.visualize import plot_gradcam

    image, label = _run_image(loaded, args.image, args.invert)
    target = None
    if args.target is not None:
        if args.target in loaded.classes:
            target = loaded.classes.index(args.target)
        elif args.target.isdigit() and int(args.target) < len(loaded.classes):
            target = int(args.target)
        else:
            raise UsageError(f"--class {args.target!r}: not a class of this run ({', '.join(loaded.classes[:10])})")
    layers = args.layer or [None]
    targets: list[int | None] = [target]
    if target is None and loaded.multi_label:  # one picture per predicted label (the most probable if none is)
        from cnnlab.engine.inference import logits_of

        probs = loaded.probabilities(logits_of(loaded, image[None]))[0]
        above = (probs >= loaded.thresholds).nonzero().flatten()
        targets = sorted(above.tolist(), key=lambda k: -float(probs[k])) or [int(probs.argmax())]
        if not len(above):
            print(f"no label reaches its threshold: Grad-CAM of the most probable, {loaded.classes[targets[0]]}")
    paths = []
    for k in targets:
        cam = grad_cam(loaded.model, loaded.prepare(image[None]), layers[0], k, multi_label=loaded.multi_label)
        name = loaded.classes[cam.class_index]
        kind = "label" if loaded.multi_label else "class"
        title = f"Grad-CAM for {kind} '{name}' (p = {cam.prob:.2f}) at {cam.layer}, image {label}"
        paths.append(plot_gradcam(image.cpu(), cam.heatmap, out / f"gradcam_{label}_{safe_name(name)}.png", title))
    return paths


# --- export -----------------------------------------------------------------------------------------------------------


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab export`."""
    p = sub.add_parser(
        "export",
        description="Export the run's best weights with a dynamic batch size, run the exported file on a real batch "
        "of test images and fail if any logit differs by more than 1e-4. Writes <file>.json beside it with the "
        "preprocessing and class names.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--format", choices=("onnx", "torchscript"), required=True, help="onnx (needs cnnlab[onnx]) or torchscript"
    )
    p.add_argument("-o", "--output", default=None, help="file to write (default RUN/model.onnx or RUN/model.pt)")
    p.add_argument("--check-images", type=int_at_least(2), default=32, help="test images in the parity batch (32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """`cnnlab export`."""
    from cnnlab.engine.export import export_run
    from cnnlab.engine.inference import eval_data, load_run

    loaded = load_run(args.run)
    data, _ = eval_data(loaded, None, None, "test")
    import torch

    check = data.final(torch.arange(min(args.check_images, len(data))))
    result = export_run(loaded, args.format, check, args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.path} ({args.format}, {result.exporter}): parity on batches of {result.batch_sizes[0]} and "
              f"1 real test images, max |logit difference| {result.max_abs_diff:.2e} (limit 1e-4)")  # fmt: skip
        print(result.metadata)
    return EXIT_OK


# --- explore ----------------------------------------------------------------------------------------------------------


def add_explore_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab explore`."""
    p = sub.add_parser(
        "explore",
        description="Start a local web server with one page: draw or upload an image and see the run's prediction, "
        "its activation maps and the weighted sum behind any pixel; a kernel playground (works with no RUN); the "
        "run's layer table, curves and confusion matrix.",
    )
    p.add_argument("run", nargs="?", default=None, help="run directory (optional: without it, the kernel playground)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this computer only)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port (8000; 0 picks a free one)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="instead of serving, write the page as a static site into DIR (a new or empty folder, or a "
                   "site exported before): the network runs in the browser (ONNX Runtime Web, included), so any "
                   "static host serves it; needs cnnlab[onnx]")  # fmt: skip
    _device_option(p)
    p.set_defaults(func=cmd_explore)


def _export_site(args: argparse.Namespace) -> int:
    """`cnnlab explore RUN --export DIR`: the static site."""
    from cnnlab.explore.export import export_site

    if not args.run:
        raise UsageError("--export: name the RUN to export (cnnlab explore runs/NAME --export DIR)")
    if not args.export.strip():
        raise UsageError("--export: empty folder name")
    loaded = _load(args)
    done = export_site(loaded, Path(args.export))
    print(f"wrote {done['path']}: {done['bytes'] / 2**20:.1f} MiB, {done['test_images']:,} test images, "
          f"{done['channels']} channel views; serve it with any static file server, for example\n"
          f"  python -m http.server --directory {done['path']} 8000   (then open http://127.0.0.1:8000/)")  # fmt: skip
    return EXIT_OK


def cmd_explore(args: argparse.Namespace) -> int:
    """`cnnlab explore`."""
    import socket

    from cnnlab.explore.app import create_app
    from cnnlab.explore.server import WILDCARD_HOSTS, allowed_hosts_for, serve

    if args.port > 65535:
        raise UsageError(f"--port {args.port}: must be at most 65535")
    if args.export is not None:
        return _export_site(args)
    loaded = _load(args) if args.run else None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        anyname = ", by any name for this computer" if args.host in WILDCARD_HOSTS else ""
        print(f"cnnlab: warning: listening on {args.host}: other computers on the network can reach this page"
              f"{anyname}", file=sys.stderr)  # fmt: skip
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    app = create_app(loaded, allowed_hosts=allowed_hosts_for(args.host, port))
    app.state.explorer.warm_up()  # lazy start-up work now, not inside the first request
    print(f"cnnlab explore: http://{host}:{port}/  ({'run ' + str(loaded.path) if loaded else 'no run'}; Ctrl-C stops)",
          flush=True)  # fmt: skip
    serve(app, sock)
    return EXIT_OK
