"""The command-line conventions of every script and training loop, in one place.

- :class:`ArgumentParser`: underscore flags as in transformers' examples (``--output_dir``); the dashed spelling of
  any flag (``--output-dir``) is still accepted but not shown in ``--help``; ``--debug`` on every command; ``--help``
  keeps the description's lines (usage examples) and names each flag's default (:class:`HelpFormatter`).
- Range-checked argument types (:func:`probability`, :func:`positive_int`, ...): a threshold of 2 or NaN is a usage
  error, not an all-void result.
- :func:`run`: the ``__main__`` of every command. An error ends the command with ONE line on stderr
  (``<prog>: error: <message>``) and exit code 1 (2 for usage errors, whose line replaces argparse's usage block;
  130 when interrupted); ``--debug`` shows the traceback instead.
- :func:`prepare_output_dir` / :func:`check_output_file`: an output location is checked for writing before any model
  is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ArgumentParser",
    "HelpFormatter",
    "CliError",
    "check_output_file",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "prepare_output_dir",
    "probability",
    "run",
]


class CliError(Exception):
    """A user error with a message that says everything (printed as it is, without the exception's type)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with the description as written (module docstrings with their usage examples, line by line) and each
    flag's default after its help, as ``ArgumentDefaultsHelpFormatter`` does, except where there is nothing to say
    (``None``, ``False``) or the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text.lower():
            return action.help
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return action.help


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's conventions: dashed spellings of underscore flags accepted
    (hidden), a ``--debug`` flag, and :class:`HelpFormatter` (module docstrings as descriptions, defaults shown)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.hidden_aliases: dict[str, str] = {}
        self.add_argument("--debug", action="store_true",
                          help="On an error, show the full traceback instead of a one-line message.")

    def add_hidden_alias(self, alias: str, flag: str) -> None:
        """Accept `alias` (e.g. an earlier name, ``--model``) for `flag` without showing it in ``--help``."""
        self.hidden_aliases[alias] = flag

    def _underscore_spellings(self, args: Sequence[str]) -> list[str]:
        """``--output-dir X`` / ``--output-dir=X`` -> ``--output_dir ...`` for flags known only with underscores."""
        known = {option for action in self._actions for option in action.option_strings}
        out: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                out += args[i:]
                break
            if arg.startswith("--") and "-" in arg[2:] and not arg.startswith("---"):
                name, eq, value = arg.partition("=")
                underscored = "--" + name[2:].replace("-", "_")
                if name not in known and underscored in known:
                    arg = underscored + eq + value
            if arg.startswith("--"):
                name, eq, value = arg.partition("=")
                if name in self.hidden_aliases and name not in known:
                    arg = self.hidden_aliases[name] + eq + value
            out.append(arg)
        return out

    def error(self, message: str) -> NoReturn:
        """A usage error: one line (``--help`` shows the usage) and exit code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._underscore_spellings(args), namespace)


def _number(kind: Callable[[str], Any], low: float | None, high: float | None, low_open: bool = False,
            name: str = "") -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if kind is float else 'whole number'}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lowest = "-inf" if low is None else f"{low:g}"
            highest = "inf" if high is None else f"{high:g}"
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{lowest}, {highest}]")
        return value

    parse.__name__ = name or kind.__name__  # argparse names the type in its messages
    return parse


probability = _number(float, 0.0, 1.0, name="probability")
"""Argument type: a float in [0, 1] (thresholds, shares, weights)."""
positive_float = _number(float, 0.0, None, low_open=True, name="positive number")
"""Argument type: a float > 0."""
positive_int = _number(int, 1, None, name="positive integer")
"""Argument type: an int >= 1."""
non_negative_int = _number(int, 0, None, name="non-negative integer")
"""Argument type: an int >= 0."""
non_negative_float = _number(float, 0.0, None, name="non-negative number")
"""Argument type: a float >= 0."""
port = _number(int, 0, 65535, name="port")
"""Argument type: a TCP port number, 0-65535."""


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    if isinstance(error, CliError):
        return message
    missing = isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError))
    if missing and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    if isinstance(error, (ValueError, OSError, RuntimeError)) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a command's ``main(argv)`` and exit with its return code (an int; anything else counts as success);
    errors are one line (see the module docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in (args[: args.index("--")] if "--" in args else args)
    prog = Path(sys.argv[0]).name or "dearli"
    try:
        code = main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:  # every error of a command becomes one line
        if debug:
            raise
        print(f"{prog}: error: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def prepare_output_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """Check that files can be written in the folder `path` (created with its parents when `create`; otherwise its
    nearest existing ancestor is checked and nothing is created); raise :class:`CliError` naming the problem. Call it
    before loading a model, so that a bad output location fails in seconds."""
    path = Path(path)
    probe = path
    if not create:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write_test_"):
            pass
    except OSError as error:
        raise CliError(f"cannot write to the output directory {path}: {error.strerror or error}") from error
    return path


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output FILE`` and ``--output_dir DIR`` (the report as ``DIR/report.json``) of a command that writes one
    JSON report, plus ``--overwrite``; :func:`report_path` resolves them."""
    parser.add_argument("--output", default=None, help="write the JSON report to this file (checked before any work)")
    parser.add_argument("--output_dir", default=None, help="write the JSON report as OUTPUT_DIR/report.json instead")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing report file (never an input or a file inside an input folder)")


def report_path(args: argparse.Namespace, inputs: dict[str, Any] | None = None) -> Path | None:
    """The report file of :func:`add_report_arguments`' flags (checked writable, see :func:`check_output_file`), or
    ``None`` when neither is given. `inputs`: the command's input files and folders by flag (``None`` values are
    skipped); the report never replaces one of them or a file inside one."""
    if args.output and args.output_dir:
        raise CliError("give --output or --output_dir, not both")
    path = args.output or (Path(args.output_dir) / "report.json" if args.output_dir else None)
    return None if path is None else check_output_file(path, overwrite=args.overwrite, inputs=inputs)


def check_output_file(path: str | os.PathLike, overwrite: bool = False, inputs: dict[str, Any] | None = None) -> Path:
    """Check that the file `path` can be written (its folder is created) and, unless `overwrite`, does not exist.
    `inputs` (flag -> file or folder, ``None`` skipped): an existing `path` that is one of them or lies inside one is
    refused, `overwrite` or not."""
    path = Path(path)
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name")
    if path.exists():
        target = path.resolve()
        for flag, value in (inputs or {}).items():
            if value is None or not Path(value).exists():
                continue
            source = Path(value).resolve()
            if target == source:
                raise CliError(f"{path} is this command's input {flag}: write the output to another file")
            if source in target.parents:
                raise CliError(f"{path} is a file of this command's input {flag} {value}: write the output to another "
                               "file (no file of an input is replaced)")
        if not overwrite:
            raise CliError(f"{path} exists (pass --overwrite to replace it)")
    prepare_output_dir(path.parent if str(path.parent) else Path("."))
    return path
