"""`cnnlab lr-find`: the learning-rate range test (engine/lr_find.py), with every option `cnnlab train` takes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnnlab.cli_common import EXIT_OK
from cnnlab.cli_train import _checked, add_train_options, typed_options
from cnnlab.engine.config import Option, TrainConfig
from cnnlab.engine.lr_defaults import END_LR, START_LR, STEPS, default_plot_path
from cnnlab.errors import UsageError


def add_lrfind_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab lr-find`: the train option table, the range, and where the plot goes."""
    p = sub.add_parser(
        "lr-find",
        description="Train for up to --steps steps with the learning rate rising exponentially from --start-lr to "
        "--end-lr (the model, data and optimizer `cnnlab train` would use with the same options), stop when the "
        "smoothed loss passes 4x its minimum, and suggest a rate: the steepest descent of the smoothed loss. "
        "Writes a plot (lr_find.png); saves no run. The options that steer the rate itself (--lr, --schedule, "
        "--epochs, --max-steps, --time-budget, --patience, --ema, --logger) are ignored.",
    )
    add_train_options(p)
    r = p.add_argument_group("range test")
    positive = _checked("float", Option("", "", lo=0.0, lo_open=True))
    r.add_argument("--steps", type=_checked("int", Option("", "", lo=3)), default=STEPS, metavar="N",
                   help=f"optimizer steps at most ({STEPS})")  # fmt: skip
    r.add_argument("--start-lr", type=positive, default=START_LR, metavar="LR", help=f"first rate ({START_LR:g})")
    r.add_argument("--end-lr", type=positive, default=END_LR, metavar="LR", help=f"last rate ({END_LR:g})")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", default=None, metavar="PNG",
                   help=f"where to write the plot ({default_plot_path()} in the current directory)")  # fmt: skip
    o.add_argument("--json", action="store_true", help="print the suggestion and the curve as one JSON document")
    o.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    p.set_defaults(func=cmd_lr_find, checkpoint_every=None)


def cmd_lr_find(args: argparse.Namespace) -> int:
    """`cnnlab lr-find`."""
    from cnnlab.engine import rundir
    from cnnlab.engine.lr_find import find_lr, range_config
    from cnnlab.reporting import make_reporter

    given = typed_options(args)
    cfg = TrainConfig(**given)
    if cfg.recipe:
        from cnnlab.engine.recipes import apply_recipe

        cfg = apply_recipe(cfg, cfg.recipe, keep=given)  # as in train: the options you typed win
    if args.end_lr <= args.start_lr:
        raise UsageError(f"--end-lr ({args.end_lr:g}) must be above --start-lr ({args.start_lr:g})")
    out = Path(args.output) if args.output else default_plot_path()
    if out.suffix.lower() != ".png":
        raise UsageError(f"--output {out}: the plot is a PNG; give a name ending in .png")
    rundir.check_writable(out.parent, "output")  # before minutes of training, not after
    range_config(cfg, args.steps).validate()  # a bad option is the one line on stderr, before the notice below
    reporter = make_reporter(quiet=args.quiet)
    reporter.message(f"lr-find: up to {args.steps} steps, lr from {args.start_lr:g} to {args.end_lr:g}")
    result = find_lr(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, reporter=reporter)
    rundir.make_dir(out.parent, "output")
    result.plot(out)
    if args.json:
        print(json.dumps({**result.to_dict(), "plot": str(out)}, indent=2))
        return EXIT_OK
    print(
        f"suggested lr {result.suggested_lr:.2g} (the steepest descent of the smoothed loss; lowest loss at "
        f"{result.min_loss_lr:.2g}) | {len(result.lrs)} steps, {result.stopped} | plot: {out}"
    )
    return EXIT_OK
