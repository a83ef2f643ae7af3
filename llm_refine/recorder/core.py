"""The engine-independent recorder: per-step sums into a device buffer, one all-reduce, rare host copies.

``capture(step)`` must run at the optimizer step while the reduced, not-yet-clipped gradients are
present, on EVERY rank (it may all-reduce). It never synchronises with the host: the (2,) sums go
into a preallocated device buffer; ``flush()`` copies the buffer to the host once every
``flush_every`` steps (or when the caller needs values: logging, checkpoint, end of training) and
rank 0 appends the records to the history file.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from ..history import HistoryWriter
from .backends.base import NormBackend

_NORMS = ("l1", "l2")


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class GradNormRecorder:
    """Records exact global ℓ1/ℓ2 gradient norms per optimizer step.

    ``writer_or_path``: a history path (rank 0 opens a :class:`HistoryWriter` on it with the
    backend's metadata plus ``meta``; other ranks write nothing) or an open ``HistoryWriter``
    (used as is on rank 0, ignored elsewhere). ``resume_after_step``: drop records past this step
    already in the file (resume from a checkpoint at global step N → N-1). ``param_groups``:
    optional list of parameter lists (e.g. ``[g["params"] for g in optimizer.param_groups]``);
    adds per-group norms under ``"groups"``, named by ``group_names`` (default "0", "1", ...).
    ``reduce_at_flush``: keep each step's *local* sums in the buffer and all-reduce the whole
    buffer once per flush instead of once per step (exact: the sums are linear). Then every flush
    is a collective, so all ranks must flush at the same steps (the Trainer callback and the
    accelerate hook do), and ``capture`` returns this rank's local sums. Used for DeepSpeed, where
    nothing needs the global norm inside the step (DeepSpeed clips by itself).
    ``fused``: compute both sums in one compiled pass over the gradients on CPU (``None``: yes,
    unless ``LLM_REFINE_FUSED_NORMS=0``; ``False``: force the two-pass fallback; ``True``: yes);
    see :mod:`llm_refine.recorder.fused`.
    Either way the recorder only reads the gradients.
    """

    def __init__(
        self,
        backend: NormBackend,
        writer_or_path: HistoryWriter | str | os.PathLike | None,
        flush_every: int = 50,
        *,
        meta: Mapping[str, Any] | None = None,
        resume_after_step: int | None = None,
        reduce_at_flush: bool = False,
        norms: Sequence[str] = _NORMS,
        param_groups: Sequence[Iterable[torch.nn.Parameter]] | None = None,
        group_names: Sequence[str] | None = None,
        fused: bool | None = None,
    ):
        if flush_every is None or int(flush_every) < 1:
            raise UserError(f"flush_every={flush_every!r}: must be a positive number of steps")
        unknown = [n for n in norms if n not in _NORMS]
        if unknown or not norms:
            raise UserError(f"norms={tuple(norms)!r}: choose from {_NORMS}")
        self.backend = backend
        if fused is not None:
            backend.fused = bool(fused)
        self.flush_every = int(flush_every)
        self.norms = tuple(norms)
        self.param_groups = [list(g) for g in param_groups] if param_groups is not None else None
        if self.param_groups is not None:
            names = list(group_names) if group_names is not None else [str(i) for i in range(len(self.param_groups))]
            if len(names) != len(self.param_groups):
                raise UserError(f"group_names has {len(names)} names for {len(self.param_groups)} parameter groups")
            self.group_names = names
            self._group_sums()  # fail at setup, not at the first step, if the backend can't do it
        self.rank = global_rank()
        self.meta = {**backend.meta(), **dict(meta or {}), "norms": list(self.norms)}
        self.writer: HistoryWriter | None = None
        if self.rank == 0 and writer_or_path is not None:
            if isinstance(writer_or_path, HistoryWriter):
                self.writer = writer_or_path
            else:
                self.writer = HistoryWriter(writer_or_path, self.meta, resume_after_step=resume_after_step)
        self._buf: torch.Tensor | None = None
        self._steps: list[int] = []
        self._skips: dict[int, str] = {}
        self.last: dict | None = None  # the latest flushed norm record (for logging)
        self.captured = 0
        self.reduce_at_flush = bool(reduce_at_flush)

    def _group_sums(self) -> torch.Tensor:
        group_sums = getattr(self.backend, "group_sums", None)  # ParamGradBackend only
        if group_sums is None:
            raise UserError(
                f"per-group norms are not supported by the {self.backend.engine} backend (its gradients are "
                "not per-parameter tensors, e.g. DeepSpeed's flat ZeRO partitions); drop per_group/param_groups"
            )
        return group_sums(self.param_groups)

    # -- per step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step_sums(self, reduce: bool = True) -> torch.Tensor:
        """This step's sums (global with ``reduce``, else local on the comm device), without
        recording them; ``capture`` records them."""
        sums = self.backend.local_sums()
        if self.param_groups is not None:
            g = self._group_sums().to(sums.device, sums.dtype)
            sums = torch.cat([sums.reshape(-1), g.reshape(-1)])
        return self.backend.reduce(sums) if reduce else self.backend.to_comm_device(sums)

    def capture(self, step: int) -> torch.Tensor:
        """Record the current gradients as optimizer step ``step`` (0-based). Call on every rank.

        Returns the global sums [Σ|g|, Σg²] as a device tensor (no host sync); with
        ``reduce_at_flush``, this rank's local sums."""
        if len(self._steps) >= self.flush_every:
            # Flush lazily, at the NEXT capture: by then the caller has had the chance to
            # mark_skipped() the previous step, so a skipped step is never written as norms.
            self.flush()
        sums = self.step_sums(reduce=not self.reduce_at_flush)
        if self._buf is None or self._buf.shape[1] != sums.numel() or self._buf.device != sums.device:
            if self._steps:
                self.flush()  # never drop pending rows when the buffer has to be reallocated
            self._buf = torch.empty((self.flush_every, sums.numel()), dtype=sums.dtype, device=sums.device)
        n = len(self._steps)
        self._buf[n].copy_(sums.reshape(-1))
        self._steps.append(int(step))
        self.captured += 1
        return sums

    def mark_skipped(self, step: int, reason: str = "fp16 overflow") -> None:
        """The engine skipped optimizer step ``step`` (e.g. inf/nan grads under a loss scaler):
        it is written as ``{"step", "skipped": true, "reason"}`` instead of norms."""
        self._skips[int(step)] = reason

    # -- host side --------------------------------------------------------------------------------
    def flush(self) -> list[dict]:
        """Copy pending sums to the host (one sync), write them (rank 0), return the records."""
        n = len(self._steps)
        if n and self.reduce_at_flush:
            # One all-reduce for every step since the last flush (a contiguous (n, k) block, already
            # on the comm device, so reduced in place); nothing when the backend needs no reduce.
            self.backend.reduce(self._buf[:n])
        host = self._buf[:n].cpu().double() if n else None  # the one device->host sync
        records: dict[int, dict] = {}
        for i, step in enumerate(self._steps):
            records[step] = self._record(step, host[i])
        for step, reason in self._skips.items():
            records[step] = {"step": step, "skipped": True, "reason": reason}
        out = [records[s] for s in sorted(records)]
        self._steps.clear()
        self._skips.clear()
        if self.writer is not None and out:
            self.writer.write(out)
        for r in reversed(out):
            if not r.get("skipped"):
                self.last = r
                break
        return out

    def _record(self, step: int, row: torch.Tensor) -> dict:
        vals = row.tolist()
        rec: dict[str, Any] = {"step": step}
        if "l1" in self.norms:
            rec["l1"] = float(vals[0])
        if "l2" in self.norms:
            rec["l2"] = math.sqrt(max(vals[1], 0.0)) if math.isfinite(vals[1]) else float(vals[1])
        if self.param_groups is not None:
            groups: dict[str, dict] = {k: {} for k in self.norms}
            for gi, name in enumerate(self.group_names):
                a, b = vals[2 + 2 * gi], vals[3 + 2 * gi]
                if "l1" in groups:
                    groups["l1"][name] = float(a)
                if "l2" in groups:
                    groups["l2"][name] = math.sqrt(max(b, 0.0)) if math.isfinite(b) else float(b)
            rec["groups"] = groups
        return rec

    def sync(self) -> list[dict]:
        """Flush and fsync (checkpoint time): everything captured so far is on disk."""
        out = self.flush()
        if self.writer is not None:
            self.writer.sync()
        return out

    def close(self) -> list[dict]:
        out = self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
