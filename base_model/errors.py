"""The project's own bad-input errors, and how every entry point reports them: one line, exit 2.

    @entry_point
    def main(argv=None): ...

A bad flag, config key, file or row raises `InputError` (or `MissingInput` for a path that is not
there) naming it; the entry point prints `error: …` on stderr and exits with status 2, without a
traceback. `--debug` on the command line, or FLOWALIGN_DEBUG=1, shows the traceback instead.
Any other exception is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys

DEBUG_ENV = "FLOWALIGN_DEBUG"


class InputError(ValueError):
    """A bad input named by its file, flag or key (a ValueError, so callers that catch those still do)."""


class MissingInput(InputError, FileNotFoundError):
    """A named input path that does not exist (also a FileNotFoundError)."""


def entry_point(main):
    """Wrap `main(argv)`: strips `--debug`, and turns an InputError into `error: …` and exit 2."""

    @functools.wraps(main)
    def run(argv=None):
        args = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        args = [a for a in args if a != "--debug"]
        try:
            return main(args)
        except InputError as e:
            if debug:
                raise
            message = " ".join(str(e).split())  # one line, whatever the message holds
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return run
