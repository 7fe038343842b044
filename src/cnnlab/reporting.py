"""What the CLI shows: a rich progress bar on a terminal, one plain line per epoch elsewhere, and tables.

This module belongs to the CLI side; the library reports through engine.reporter.Reporter and never prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cnnlab.engine.record import Runtime
from cnnlab.engine.reporter import Reporter, TrainStart


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; give tables room instead.
    return Console(file=stream, width=None if stream.isatty() else 160, highlight=False)


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One line per epoch: train and validation loss/accuracy (multi-label: exact match, and validation mAP), learning
    rate, seconds."""
    acc = "exact" if "val_mAP" in row else "acc"
    text = (
        f"epoch {int(row['epoch']):>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.4f} "
        f"{acc} {row['train_acc']:.2%}"
    )
    if row.get("val_loss") is not None:
        text += f"  val loss {row['val_loss']:.4f} {acc} {row['val_acc']:.2%}"
    if row.get("val_mAP") is not None and row.get("val_loss") is not None:
        text += f" mAP {row['val_mAP']:.3f}"
    return text + f"  lr {row['lr']:.2e}  {row['seconds']:.1f}s"


class ConsoleReporter(Reporter):
    """Progress on stderr: a live bar over all steps on a terminal, plain epoch lines otherwise."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or _console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.epochs = 0

    def train_start(self, info: TrainStart) -> None:
        m, d, rt = info.record.model, info.record.data, info.record.runtime or Runtime("?", "?", "?", 0)
        train = info.record.train
        self.epochs = train.epochs if train else 0
        mixing = (
            "".join(f", {k} {v:g}" for k, v in (("mixup", train.mixup), ("cutmix", train.cutmix)) if v) if train else ""
        )
        steps = f"{info.steps_per_epoch} step{'s' if info.steps_per_epoch != 1 else ''}/epoch"
        self.console.print(
            f"training {m.name} ({m.params:,} params) on {d.name}: {d.train_size:,} train / "
            f"{d.val_size:,} val / {d.test_size:,} test images of {d.channels}x{d.image_size}x"
            f"{d.image_size}, augment {','.join(d.augment) or 'none'}{mixing}; {rt.device} {rt.precision}, {steps}"
        )
        if info.run_dir:
            self.console.print(f"run directory: {info.run_dir}")
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True,
            )  # fmt: skip
            done = info.start_epoch * info.steps_per_epoch
            self.task = self.progress.add_task(
                "train",
                total=info.total_steps,
                completed=min(done, info.total_steps),
                epoch=info.start_epoch + 1,
                epochs=self.epochs,
                loss="-",
            )
            self.progress.start()

    def epoch_start(self, epoch: int, steps: int) -> None:
        if self.progress:
            self.progress.update(self.task, epoch=epoch)

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        if self.progress:
            fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self.progress.update(self.task, advance=1, **fields)

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.console.print(epoch_line(row, self.epochs))

    def message(self, text: str) -> None:
        self.console.print(text)

    def plan_changed(self, total_steps: int, epochs: int) -> None:
        self.epochs = epochs
        if self.progress:
            self.progress.update(self.task, total=total_steps, epochs=epochs)

    def train_end(self, result: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live bar (also on errors, so the terminal is left clean)."""
        if self.progress:
            self.progress.stop()
            self.progress = None


class LineProgress:
    """`LABEL: n/total ITEM` on stderr: one line rewritten in place on a terminal, a plain line each elsewhere."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.in_place = self.stream.isatty()
        self.shown = False

    def __call__(self, number: int, total: int, item: str) -> None:
        """Show that item `number` of `total` is under way."""
        line = f"{self.label}: {number}/{total} {item}"
        self.stream.write(f"\r\x1b[K{line}" if self.in_place else line + "\n")  # \x1b[K: erase the previous one
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """Erase the line on a terminal, so that what follows starts on a clean one."""
        if self.in_place and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def make_reporter(quiet: bool = False) -> Reporter:
    """The CLI's reporter: silent with --quiet."""
    return Reporter() if quiet else ConsoleReporter()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Print a table on stdout."""
    table = Table(*columns, title=title, show_lines=False, header_style="bold")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    _console(stderr=False).print(table)
