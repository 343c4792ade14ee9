"""The command-line tools (`jaxseg-train`, `jaxseg-eval`, `jaxseg-predict`, `jaxseg-pseudo-labels`, `jaxseg-clip-es`,
`jaxseg-export`, `jaxseg-convert`, `jaxseg-make-dataset`; also `python tools/<name>.py`) and what they
share: arguments whose mistakes are one `error:` line, a quiet console, and expected failures reported as
one `error:` line with exit code 2. A traceback appears only with `--debug`, or for an exception that is
a bug."""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import warnings
from collections.abc import Callable

from jaxseg.errors import NonFiniteLossError, UserError

__all__ = ["EXPECTED", "ArgumentParser", "UserError", "error_line", "quiet_libraries", "read_json", "run"]

EXIT_ERROR = 2
# Failures that the user can fix from the message: bad input, a file the OS refuses, a diverged run.
EXPECTED = (UserError, OSError, NonFiniteLossError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the module docstring as help, `--debug`, and a usage mistake as one `error:` line."""

    def __init__(self, doc: str | None = None, **kwargs):  # subcommands' parsers come through **kwargs
        kwargs.setdefault("description", doc)
        kwargs.setdefault("formatter_class", argparse.RawTextHelpFormatter)
        super().__init__(**kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error")

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def error_line(error: BaseException) -> str:
    """`error: <message>`; continuation lines of a long message (a name diff) are indented."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
    first, *rest = message.strip().splitlines() or [""]
    return "\n".join([f"error: {first}"] + [f"  {line.strip()}" for line in rest])


def check_out_dir(out_dir: pathlib.Path, overwrite: bool) -> None:
    """Refuses an `--out_dir` that is a file, or a non-empty directory without `--overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} is not empty; pass --overwrite to write into it")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuses any of the options `names` that was given below 1."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")


def open_split(dataset: str, data_dir: str, split: str):
    """The TFDS data source of one split of a prepared dataset."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(dataset, data_dir=data_dir, split=split)
    except Exception as e:  # tfds raises its own errors for an unknown dataset, version or split
        raise UserError(f"cannot open split {split!r} of dataset {dataset!r} in {data_dir}: "
                        f"{str(e).splitlines()[0]}") from e


def read_json(path: str | pathlib.Path, what: str):
    """The JSON document in the file `path`, which the user gave as `what`."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from e


class _ConsoleFormatter(logging.Formatter):
    """Our progress notes as they are, anything worse prefixed with its level (`warning: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def quiet_libraries() -> None:
    """jaxseg's notes and warnings reach the console, of the libraries only errors: absl (orbax, tfds) logs
    informational warnings (a restored item it was not asked for, a builder config dump), and tfds draws
    progress bars that leave escape codes in logs."""
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormatter())
    logging.basicConfig(level=logging.ERROR, handlers=[handler], force=True)
    logging.getLogger("jaxseg").setLevel(logging.INFO)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # the tools that read no datasets run without it
        return
    tfds.disable_progress_bar()


def run(parser: ArgumentParser, body: Callable[[argparse.Namespace], int | None], argv=None) -> int:
    """Parses `argv`, runs `body(args)` and returns its exit code (0 for None); an expected failure is one
    `error:` line on stderr and exit code 2 (re-raised with --debug)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed: an exit code, also in-process
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    quiet_libraries()
    try:
        return body(args) or 0
    except EXPECTED as e:
        if getattr(args, "debug", False):
            raise
        print(error_line(e), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
