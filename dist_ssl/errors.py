"""The base class of errors that are the user's to fix, and how an entry point reports one.

A bad config key, a missing shard, an unreadable checkpoint, a malformed experiment file: the
user fixes the input and runs again, so a traceback would only hide the one line that matters.
Every such error class of the package subclasses :class:`UserError` (keeping its old base too,
e.g. ``ConfigError(UserError, ValueError)``, so ``except ValueError`` still catches it), and
every command-line entry point catches ``UserError`` and hands it to :func:`exit_with_message`.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys

# argparse's own exit code for bad arguments; a bad input file is the same kind of mistake
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (arguments, config, data, checkpoint, experiment file);
    ``str()`` is one line naming the file or key and what is wrong."""


def exit_with_message(prog: str, exc: BaseException, code: int = EXIT_USER_ERROR) -> int:
    """Print ``<prog>: error: <message>`` (argparse's format) on stderr; return ``code``."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code
