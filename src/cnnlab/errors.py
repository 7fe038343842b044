"""Errors that the CLI turns into one line on stderr and an exit code (2 usage, 1 run time)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class CnnlabError(Exception):
    """A failure the user can act on; the CLI prints its message without a traceback.

    With `options=True` the message may mention options as {name} or {name=value}: Python sees the keyword
    (`on_bad_image='skip'`), the command line its flag (`--on-bad-image skip`, through `cli_message()`).
    """

    exit_code = 1

    def __init__(self, message: str = "", *, options: bool = False) -> None:
        self.template = message if options else None
        super().__init__(_spell(message, cli=False) if options else message)

    def cli_message(self) -> str:
        """The message in the command line's words."""
        return _spell(self.template, cli=True) if self.template is not None else str(self)

    def __reduce__(self) -> tuple:
        # Pickled (a worker process's error) with its template, so the parent can still spell flags.
        options = self.template is not None
        return (_rebuild, (type(self), self.template if options else str(self), options, self.__dict__))


def _rebuild(cls: type[CnnlabError], message: str, options: bool, state: dict) -> CnnlabError:
    error = CnnlabError.__new__(cls)
    CnnlabError.__init__(error, message, options=options)
    error.__dict__.update(state)
    return error


class UsageError(CnnlabError):
    """Bad input from the user: an unknown name, an impossible value, a missing file (exit code 2)."""

    exit_code = 2


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "") -> UsageError:
    """Build the error for an unknown registry name, suggesting the closest known names."""
    known = sorted(known)
    # Names that extend what was typed ('lenet' -> 'lenet5', 'lenet5-modern') say best what was meant; else look-alikes.
    prefixed = sorted((k for k in known if k.startswith(name) and k != name), key=len) if name else []
    close = prefixed[:3] or difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    elif len(known) <= 12:
        msg += f"; known: {', '.join(known)}"
    if hint:
        msg += f" ({hint})"
    return UsageError(msg)


def flag(name: str) -> str:
    """The command-line spelling of option `name`: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


class OptionError(UsageError):
    """An impossible option value. Its text names the Python keyword; `cli_message()` names the command-line flag.

    `why` may mention other options as {name} or {name=value}: `freeze='features'` in Python, `--freeze features`
    on the command line.
    """

    def __init__(self, name: str, why: str) -> None:
        self.option, self.why = name, why
        # "batch_size must be ...", or "model_args: lenet5 does not take ..." when `why` starts with a colon.
        super().__init__(f"{{{name}}}{'' if why.startswith(':') else ' '}{why}", options=True)


_MENTION = re.compile(r"\{(\w+)(?:=([^}]*))?\}")


def _spell(text: str, cli: bool) -> str:
    def one(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if cli:
            return flag(name) + (f" {value}" if value is not None else "")
        if value is None:
            return name
        return f"{name}={value}" if re.fullmatch(r"[-+.\deE]+|None|True|False", value) else f"{name}={value!r}"

    return _MENTION.sub(one, text)
