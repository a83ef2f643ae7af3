"""Logging for entry points. Library modules only call ``logging.getLogger(__name__)``; an entry
point (the ``llm-refine`` CLI, ``python -m llm_refine.train``, ``recipes/pretrain.py``) calls
`setup_logging` once, so llm-refine's INFO lines (per-stage lines, training progress) reach stdout
as plain lines and a terminal's progress bar stays intact around them."""

from __future__ import annotations

import logging
import sys

_HANDLER_NAME = "llm_refine.stdout"


class _LineHandler(logging.Handler):
    """One record per line on stdout; through tqdm.write when tqdm is there (keeps a bar whole)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            try:
                from tqdm.auto import tqdm

                tqdm.write(line, file=sys.stdout)
            except ImportError:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except Exception:  # pragma: no cover - logging must never raise into the caller
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach the stdout line handler to the ``llm_refine`` logger (idempotent) and return it."""
    root = logging.getLogger("llm_refine")
    if not any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        handler = _LineHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root


class stdout_logging:
    """``with stdout_logging():`` — llm-refine's INFO lines on stdout for the block only (entry
    points called in-process, e.g. by tests, leave the logging setup as they found it)."""

    def __enter__(self):
        root = logging.getLogger("llm_refine")
        self._saved = (list(root.handlers), root.level, root.propagate)
        return setup_logging()

    def __exit__(self, *exc):
        root = logging.getLogger("llm_refine")
        root.handlers[:], root.level, root.propagate = self._saved[0], self._saved[1], self._saved[2]
        return False
