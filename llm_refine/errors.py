"""User-facing errors.

A `UserError` is bad input the user can fix (a wrong path, a malformed file, an unknown option).
The CLI prints its message on one line and exits with code 2, without a traceback. Messages name
the thing that is wrong, the problem, and the fix.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


def one_line(text) -> str:
    """``text`` with its line breaks turned into spaces: every error is one line on stderr."""
    return " ".join(str(text).split("\n"))


def run_reporting_errors(prog: str, fn) -> int:
    """``fn()``'s exit code; a `UserError` or an OSError (a bad path) becomes one line on stderr
    and exit code 2, Ctrl-C a line and 130. The one place entry points turn errors into exits."""
    import sys

    try:
        return int(fn() or 0)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our stdout went away (`llm-refine examples list | head`): not a user error.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as e:
        name = getattr(e, "filename", None) or ""
        print(f"{prog}: error: {name}: {one_line(e.strerror or e)}; check the path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
