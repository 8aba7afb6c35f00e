"""The base class of errors that are the user's to fix, and how an entry point reports one.

A bad config key, a missing shard, an unreadable checkpoint, a malformed experiment file: the
user fixes the input and runs again, so a traceback would only hide the one line that matters.
Every such error class of the package subclasses :class:`UserError` (keeping its old base too,
e.g. ``ConfigError(UserError, ValueError)``, so ``except ValueError`` still catches it), and
every command-line entry point catches ``UserError`` and hands it to :func:`exit_with_message`.
Anything else is a bug and keeps its traceback. :func:`run_command` is that shared ``main()``
body; :func:`first_line` cuts a library's exception down to the line a user's message quotes.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional

# argparse's own exit code for bad arguments; a bad input file is the same kind of mistake
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (arguments, config, data, checkpoint, experiment file);
    ``str()`` is one line naming the file or key and what is wrong."""


def exit_with_message(prog: str, exc: BaseException, code: int = EXIT_USER_ERROR) -> int:
    """Print ``<prog>: error: <message>`` (argparse's format) on stderr; return ``code``."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code


def run_command(prog: str, run: Callable[[Any], int], args: Any, level: int = logging.INFO,
                errors: tuple[type[BaseException], ...] = (UserError, OSError)) -> int:
    """The ``main()`` body of a ``cli_<command>.py`` after its argument parsing: log records as
    ``<prog>: <message>`` on stderr at ``level``, return ``run(args)``; one of ``errors`` becomes
    one ``<prog>: error: ...`` line and exit code 2 instead of a traceback (an OSError too by
    default: disk full or a missing file is the user's to fix, its message names the file)."""
    logging.basicConfig(level=level, format=f"{prog}: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except errors as e:
        return exit_with_message(prog, e)


def first_line(e: BaseException, max_chars: Optional[int] = 300) -> str:
    """The first non-empty line of ``str(e)`` (at most ``max_chars``; None = all of it), or the
    exception's type name when it has no message: parser and loader errors can run to pages."""
    lines = str(e).strip().splitlines()
    return lines[0][:max_chars] if lines else type(e).__name__
