"""Errors in what a user gave (config, data, checkpoint, mesh, cache), and how commands report them.

Every such error class derives from `UserError` as well as its builtin base. A command's entry point
runs through `cli`: a `UserError` ends the command in one line naming the cause, exit status 2, with
no traceback; `--debug` (or `ELVA_DEBUG=1`) shows the traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Marks an error whose cause is the input (named in the message), not the program."""


def cli(main: Callable, argv: Sequence[str] | None = None, *, prog: str):
    """``main(argv)`` with known errors reported in one line (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ELVA_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        return main(args)
    except UserError as e:
        if debug:
            raise
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        print(f"{prog}: error: {msg} [{type(e).__name__}; --debug or ELVA_DEBUG=1 for the traceback]", file=sys.stderr)
        raise SystemExit(2) from None
