"""Progress in a Jupyter notebook: one live bar and a growing table of epochs, updated in place (no extra packages)."""

from __future__ import annotations

import html
import sys
import time
from typing import Any

from cnnlab.engine.record import Runtime
from cnnlab.engine.reporter import Reporter, TrainStart


def in_notebook() -> bool:
    """Whether this Python runs inside a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab)."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return type(shell).__name__ in ("ZMQInteractiveShell", "Shell") or "google.colab" in sys.modules


class NotebookReporter(Reporter):
    """A progress bar and an epoch table in the cell's output, redrawn at most 10 times a second."""

    def __init__(self) -> None:
        from IPython.display import display

        self._display = display
        self.handle: Any = None
        self.header, self.rows, self.notes = "", [], []
        self.done = self.total = self.epochs = 0
        self.loss: float | None = None
        self.last_draw = 0.0

    def train_start(self, info: TrainStart) -> None:
        """Show what is trained, on what, where."""
        m, d, rt = info.record.model, info.record.data, info.record.runtime or Runtime("?", "?", "?", 0)
        self.epochs = info.record.train.epochs if info.record.train else 0
        self.total = info.total_steps
        self.done = min(info.start_epoch * info.steps_per_epoch, self.total)
        self.header = (
            f"training {m.name} ({m.params:,} params) on {d.name}: {d.train_size:,} train / "
            f"{d.val_size:,} val / {d.test_size:,} test images; {rt.device} {rt.precision}"
            + (f"; run directory {info.run_dir}" if info.run_dir else "")
        )
        self.handle = self._display(self._html(), display_id=True, raw=False)

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        """Advance the bar."""
        self.done += 1
        if loss is not None:
            self.loss = loss
        if time.monotonic() - self.last_draw > 0.1:
            self._draw()

    def epoch_end(self, row: dict[str, Any]) -> None:
        """Add the epoch's row."""
        self.rows.append(row)
        self._draw()

    def plan_changed(self, total_steps: int, epochs: int) -> None:
        """A time budget's new plan: the bar's length."""
        self.epochs, self.total = epochs, total_steps
        self._draw()

    def message(self, text: str) -> None:
        """A notice under the table."""
        self.notes.append(text)
        self._draw()

    def train_end(self, result: Any) -> None:
        """The final numbers."""
        self.done = self.total
        self.notes.append(f"{result.headline()} in {result.seconds:.1f} s")
        self._draw()

    def _draw(self) -> None:
        self.last_draw = time.monotonic()
        if self.handle is not None:
            self.handle.update(self._html())

    def _html(self) -> Any:
        from IPython.display import HTML

        loss = f" loss {self.loss:.4f}" if self.loss is not None else ""
        bar = f"<progress value='{self.done}' max='{max(self.total, 1)}' style='width:60%'></progress> "
        bar += f"step {self.done}/{self.total}{loss}"
        cols = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
        if any("val_mAP" in r for r in self.rows):  # multi-label: acc is the exact-match ratio, mAP is what counts
            cols = (*cols[:5], "val_mAP", *cols[5:])
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in self.rows)
        notes = "".join(f"<div>{html.escape(n)}</div>" for n in self.notes)
        table = f"<table><tr>{head}</tr>{body}</table>" if self.rows else ""
        return HTML(f"<div>{html.escape(self.header)}</div><div>{bar}</div>{table}{notes}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else html.escape(str(value))
