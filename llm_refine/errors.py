"""User-facing errors.

A `UserError` is bad input the user can fix (a wrong path, a malformed file, an unknown option).
The CLI prints its message on one line and exits with code 2, without a traceback. Messages name
the thing that is wrong, the problem, and the fix.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""
