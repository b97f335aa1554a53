"""How the ``knnfast`` command fails: one ``knnfast: <what> (<how to fix>)`` line on stderr
and an exit code that says which kind of failure it was (the table is in the top-level
``--help`` and the README). Tracebacks only with ``--debug``."""
from __future__ import annotations

import sys

EXIT_INTERNAL = 1       # an exception the command did not expect: a bug, report it
EXIT_USAGE = 2          # the command line (argparse's own code, kept for every usage error)
EXIT_DATA = 3           # the files: a model, corpus, datastore or index missing or mismatched
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)

#: (code, meaning) for --help and the README.
EXIT_CODES = ((0, "success"),
              (EXIT_INTERNAL, "internal error (a bug; --debug shows the traceback)"),
              (EXIT_USAGE, "usage error: an unknown option, a missing or invalid value"),
              (EXIT_DATA, "data error: a missing, unreadable or mismatched model, corpus, "
                          "datastore or index"),
              (EXIT_INTERRUPTED, "interrupted (Ctrl-C); the message says how to resume"))

DEBUG_HINT = "rerun with --debug for the traceback"

#: The Python API's words in library messages and what a command-line user types instead.
API_TO_CLI = (("pass resume=True", "pass --resume"), ("resume=True", "--resume"),
              ("overwrite=True", "--overwrite"), ("Datastore.create(..., --resume)", "--resume"))

#: First words of the remedy that ends a library message ("...; rebuild it").
FIX_VERBS = ("pass", "delete", "run", "open", "use", "rebuild", "upgrade", "free", "make",
             "remove", "resume", "check", "wait")


class CLIError(SystemExit):
    """A failure the user can fix: ``what`` went wrong and ``fix`` says how. A SystemExit
    (with ``exit_code``), so that code calling a command's helpers outside ``main`` still
    stops the program, never continuing past it."""
    exit_code = EXIT_DATA

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix, self.code = what, fix, self.exit_code

    def line(self) -> str:
        return f"knnfast: {self.what} ({self.fix})"


class UsageError(CLIError):
    """The command line is wrong (exit code 2)."""
    exit_code = EXIT_USAGE


class DataError(CLIError):
    """A file or the combination of files is wrong (exit code 3)."""
    exit_code = EXIT_DATA


def warn(text: str) -> None:
    """One ``knnfast: warning: ...`` line on stderr; the command goes on."""
    print(f"knnfast: warning: {text}", file=sys.stderr)


def from_library(error: BaseException, where: str = "") -> DataError:
    """A library exception as a one-line data error. The library's messages end with their
    own remedy after the last '; ' ("...; pass overwrite=True"): that becomes the fix, in
    command-line words."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for api, cli in API_TO_CLI:
        text = text.replace(api, cli)
    what, sep, fix = text.rpartition("; ")
    if not sep or not fix.split(" ", 1)[0] in FIX_VERBS:
        what, fix = text, DEBUG_HINT
    return DataError(f"{where}{what}", fix)
