"""`cnnlab train`: its parser is generated from the option table (engine/config.py); the command calls fit()."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cnnlab.cli_common import EXIT_OK, parse_model_args
from cnnlab.engine.config import GROUPS, Option, TrainConfig, describe_range, options, out_of_range, type_name
from cnnlab.errors import UsageError, flag

# What `--resume RUN` may be given besides: where to run and how to print (the run's own options are kept).
RESUME_MAY_CHANGE = {"device"}


def _shown(value: Any) -> str:
    """An option's value as typed: tuples as comma lists, dicts as KEY=VALUE lists."""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_checkpoint_every(text: str | None) -> dict[str, Any]:
    """'500' -> every 500 steps; '10m' -> every 10 minutes."""
    if not text:
        return {}
    try:
        if text.endswith("m"):
            minutes = float(text[:-1])
            if minutes > 0:
                return {"checkpoint_minutes": minutes}
        elif int(text) > 0:
            return {"checkpoint_steps": int(text)}
    except ValueError:
        pass
    raise UsageError(f"--checkpoint-every {text!r}: expected a number of steps (500) or minutes (10m), above 0")


def launch_torchrun(argv: Sequence[str], nproc: int) -> int:
    """`cnnlab train --devices N ...` -> `torchrun --standalone --nproc-per-node N -m cnnlab train ...`."""
    from cnnlab.engine import distributed

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            rest.append(arg)
    torchrun_args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "cnnlab", *rest]
    print(f"cnnlab: launching {nproc} processes: torchrun {' '.join(torchrun_args)}", file=sys.stderr)
    failure = distributed.launch(torchrun_args)
    if failure is None:
        return EXIT_OK
    sys.stderr.write(f"cnnlab: error: {failure.message}\n")
    return failure.exit_code


def _checked(kind: str, opt: Option) -> Callable[[str], Any]:
    """Parse an int or float from the command line and check it against the option's declared bounds."""

    def parse(text: str) -> Any:
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind == 'int' else 'a number'}, "
                                             f"got {text!r}") from None  # fmt: skip
        if isinstance(value, float) and not math.isfinite(value) and (opt.lo is not None or opt.hi is not None):
            raise argparse.ArgumentTypeError(f"must be {describe_range(opt)}, got {text}")
        if out_of_range(opt, value):
            raise argparse.ArgumentTypeError(f"must be {describe_range(opt)}, got {text}")
        return value

    return parse


def _default_text(value: Any) -> str:
    if value is None:
        return "default: none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | dict):
        return _shown(value) if value else "none"
    return _shown(value)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab train`, one per entry of the option table (plus where to write and how to print).

    Every table option defaults to SUPPRESS: the parsed namespace holds exactly the options the user typed, so a
    recipe knows what not to override and --resume what it would ignore.
    """
    p = sub.add_parser(
        "train",
        help="train a model (default: LeNet-5 on the embedded MNIST subset)",
        description="Train a model and write a run directory (config.json, metrics.csv, best.safetensors, "
        "last.ckpt, curves.png, results.json). With no options: lenet5-modern on mnist-mini, >= 98% test "
        "accuracy in well under a minute on 2 CPU cores. Every option is also a keyword of cnnlab.train().",
    )
    groups = add_train_options(p)
    _add_run_options(groups["run"], p)
    p.set_defaults(func=cmd_train)


def add_train_options(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Every option of the table as a flag of `p`, in its group (returned by name); defaults are SUPPRESSed."""
    from cnnlab.data.catalog import BUILTIN_SOURCES
    from cnnlab.engine.recipes import RECIPES, list_recipes

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    defaults = TrainConfig()
    extra = {
        "data": " Known: " + "; ".join(f"{name}: {what}" for name, what in BUILTIN_SOURCES.items()),
        "recipe": " " + "; ".join(f"{r.name}: {r.measured}" for r in RECIPES.values()),
    }
    for f, opt in options():
        if not opt.cli:
            continue
        kind = type_name(f)
        help_text = f"{opt.help}{extra.get(f.name, '')} ({_default_text(getattr(defaults, f.name))})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.choices is not None or f.name == "recipe":
            kwargs["choices"] = list(opt.choices or list_recipes())
        elif kind in ("int", "float"):
            kwargs["type"] = _checked(kind, opt)
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        groups[opt.group].add_argument(flag(f.name), dest=f.name, **kwargs)
    return groups


def _add_run_options(g: argparse._ArgumentGroup, p: argparse.ArgumentParser) -> None:
    """Where the run is written, resumed, launched, and how the result is printed: not training options."""
    g.add_argument(
        "--checkpoint-every",
        metavar="N|Nm",
        default=None,
        help="also checkpoint inside epochs: every N steps, or every N minutes with 'm' (e.g. 500, 10m)",
    )
    g.add_argument("--runs-dir", default="runs", help="parent directory of run directories (runs)")
    g.add_argument("--name", default=None, help="run directory name (default <date>_<time>_<model>_<data>)")
    g.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue a stopped run exactly, with its own options (only --device may change); 'auto' with --name: "
        "resume runs-dir/NAME if it exists unfinished, else start it (for torchrun --max-restarts)",
    )
    d = p.add_argument_group("several processes (torchrun / DDP)")
    d.add_argument(
        "--devices",
        type=_checked("int", Option("", "", lo=1)),
        default=1,
        metavar="N",
        help="train with N processes on this machine (one per GPU, or CPU processes): launches torchrun for you",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the final metrics as one JSON document on stdout")
    o.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def typed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The train options the user typed, as TrainConfig keywords (text options parsed)."""
    names = {f.name for f, _ in options()}
    given = {name: value for name, value in vars(args).items() if name in names}
    if "model_args" in given:
        given["model_args"] = parse_model_args(given["model_args"])
    given.update(parse_checkpoint_every(args.checkpoint_every))
    return given


def cmd_train(args: argparse.Namespace) -> int:
    """`cnnlab train`."""
    from cnnlab.engine import distributed
    from cnnlab.engine.trainer import fit
    from cnnlab.reporting import make_reporter

    if args.devices > 1 and distributed.env().enabled:
        raise UsageError("--devices: already running under torchrun; drop --devices (torchrun sets the count)")
    given = typed_options(args)
    cfg = TrainConfig(**given)
    ignored = sorted(set(given) - RESUME_MAY_CHANGE) + (["name"] if args.name is not None else [])
    if args.resume and args.resume != "auto" and ignored:
        # A resumed run continues with its own options: a typed --epochs 6 would silently do nothing.
        flags = ", ".join(
            dict.fromkeys("--checkpoint-every" if n.startswith("checkpoint_") else flag(n) for n in ignored)
        )
        raise UsageError(f"--resume continues a run with its own options; drop {flags} (only --device may change)")
    if cfg.time_budget is not None and "epochs" in given:
        raise UsageError("--epochs and --time-budget: give one; a time budget plans the number of epochs itself")
    if cfg.recipe and not args.resume:
        from cnnlab.engine.recipes import apply_recipe

        cfg = apply_recipe(cfg, cfg.recipe, keep=given)  # every option the user typed wins over the recipe
    if args.devices > 1:
        from cnnlab.engine.setup import preflight

        # Options, model, data and memory are checked once here: a worker's error would arrive N times.
        preflight(cfg, runs_dir=args.runs_dir, run_name=args.name, resume=args.resume)
        return launch_torchrun(args.argv, args.devices)
    reporter = make_reporter(quiet=args.quiet or not distributed.env().is_main)
    if cfg.recipe and not args.resume:
        reporter.message(_recipe_banner(cfg, given))
    device = cfg.device if args.resume and cfg.device != "auto" else None
    try:
        result = fit(
            cfg, runs_dir=args.runs_dir, run_name=args.name, reporter=reporter, resume=args.resume, device=device
        )
    finally:
        getattr(reporter, "close", lambda: None)()  # leave the terminal clean on errors and interrupts
    if distributed.env().is_main:  # rank 0 prints the result for the whole job
        _print_result(result, args.json)
    return EXIT_OK


def _recipe_banner(cfg: TrainConfig, given: dict[str, Any]) -> str:
    """The recipe's own values, and which of them the typed options replaced."""
    from cnnlab.engine.recipes import get_recipe

    recipe = get_recipe(cfg.recipe)
    mine = [f"{flag(k)} {_shown(getattr(cfg, k))}" for k in recipe.settings if k in given]
    return f"recipe {cfg.recipe}: {recipe.summary}" + (f"; yours win: {', '.join(mine)}" if mine else "")


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    early = ", stopped early" if result.stopped_early else ""
    early += f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""
    print(
        f"{result.headline()}"
        f" | {result.epochs_run} epoch{'s' if result.epochs_run != 1 else ''} (best {result.best_epoch}{early})"
        f" | {result.seconds:.1f} s"
        + (f" of a {result.time_budget:g} s budget" if result.time_budget else "")
        + f" on {result.device} | {result.run_dir}"
    )
