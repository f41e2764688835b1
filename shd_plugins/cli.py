"""One command-line convention for every script of ``recipes/`` and ``eval/``.

A user error (a wrong path, a bad option combination, a model that does not fit the data) ends the script the way
argparse ends it for a bad flag: one ``<prog>: error: <message>`` line on stderr and exit status 2, no traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

__all__ = ['USER_ERRORS', 'user_errors', 'ParseKwargs']

#: Exceptions whose message tells the user what to fix.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


@contextlib.contextmanager
def user_errors(prog: str | None = None, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` raised inside into ``<prog>: error: <message>`` and ``SystemExit(2)``.

    Args:
        prog: Program name for the message; the script's file name when None (as argparse).
        cleanup: Called before exiting, e.g. to destroy a process group so torchrun peers are not left waiting.
    """
    try:
        yield
    except USER_ERRORS as e:
        if cleanup is not None:
            cleanup()
        print(f'{prog or os.path.basename(sys.argv[0])}: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None


class ParseKwargs(argparse.Action):
    """timm's ``ParseKwargs`` (``k=v`` words, values through ``ast.literal_eval``) with argparse's error for a bad word.

    timm's action raises a bare ``ValueError`` from inside ``parse_args`` for a word without ``=`` (``depth`` for
    ``depth=2``), which ends the script with a traceback; this checks the words first and otherwise delegates to
    timm's parsing, so every script reads model kwargs the same way.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [value for value in values if value and '=' not in value]
        if bad:
            parser.error(f'argument {option_string}: expected key=value words (e.g. depth=4), got {bad[0]!r}')
        from timm.utils import ParseKwargs as TimmParseKwargs

        TimmParseKwargs.__call__(self, parser, namespace, values, option_string)
