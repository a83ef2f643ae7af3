"""Record gradient norms in a custom accelerate training loop (also the engine of the Trainer callback).

Where the capture happens (the one subtle part):

- accelerate reduces gradients in ``accelerator.backward`` on the step's last micro-batch
  (``accelerator.sync_gradients`` True); the loop then (optionally) calls
  ``accelerator.clip_grad_norm_`` and ``optimizer.step()``. The hook wraps both, on the instances:
  the clip wrapper captures BEFORE clipping; the step wrapper captures before the step if no
  clip call did (no clipping), then, after the step, reports a loss-scaler skip
  (``optimizer.step_was_skipped``) and advances the step counter.
- DeepSpeed: accelerate runs ``engine.step()`` inside ``accelerator.backward``; the backend's own
  step hook is used instead (``NormBackend.install_step_hook``: DeepSpeed's model step).

Usage::

    hook = AccelerateGradNormHook(accelerator, model, optimizer, "out/gradnorms.jsonl")
    ...  # unchanged loop: accelerator.backward / clip_grad_norm_ / optimizer.step / save_state
    hook.close()  # or accelerator.end_training(), which closes the hook first

Checkpoints: the hook registers itself with ``accelerator.register_for_checkpointing``.
``accelerator.save_state`` calls :meth:`AccelerateGradNormHook.state_dict`, which flushes and
fsyncs the history first (the history on disk then holds every step before the saved step);
``accelerator.load_state`` calls :meth:`AccelerateGradNormHook.load_state_dict`, which restores
the step counter and truncates the history back to the saved step (records past it came from the
segment that was killed). Trackers: flushed norms also go to ``accelerator.log`` at tracker step
``history step + 1`` (the number of optimizer steps completed, as the Trainer's ``global_step``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import types
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import UserError
from ..history import HistoryWriter, read_jsonl
from .backends import detect_backend, grad_scale_of, world_size
from .core import GradNormRecorder

SKIP_REASON = "loss scaler overflow (inf/nan gradients)"
_log = logging.getLogger(__name__)


def _is_deepspeed(accelerator) -> bool:
    dt = getattr(accelerator, "distributed_type", None)
    return str(getattr(dt, "value", dt)).upper() == "DEEPSPEED"


class AccelerateGradNormHook:
    """Installs the recorder into a prepared accelerate setup.

    ``model`` / ``optimizer``: what ``accelerator.prepare`` returned (DDP / FSDP / fully_shard'ed
    module / DeepSpeed engine; ``AcceleratedOptimizer``). ``start_step``: default ``None``: the
    step comes from ``accelerator.load_state`` (the hook is registered for checkpointing) or is 0,
    and nothing in an existing history is dropped until it is known which; an int: the 0-based
    index of the next optimizer step (resume: the checkpoint's step count), records past it
    already in the file are dropped at once. ``step_fn``: overrides the internal counter (the
    Trainer passes its global_step).
    ``reuse_norm`` (opt-in, default False): answer ``accelerator.clip_grad_norm_`` calls on all the
    model's parameters from the recorder's sums (ℓ2: the same value up to rounding; clipping:
    torch's rule on the local shards), so the gradients are read once per step, not twice. The
    clip coefficient then comes from the recorder's float64-accumulated norm instead of torch's
    float32 one, so a clipped run is NOT bit-identical to the same run without the recorder
    (measured: losses differ by up to ~1e-7). Default: accelerate's own code runs unchanged and the
    recorder only reads the gradients before it, so the training is bit-identical.
    ``expect_clip_call``: the loop clips every step, so a step without an
    ``accelerator.clip_grad_norm_`` call means it clipped some other way: raise instead of
    recording post-clip norms (the Trainer callback sets it when ``max_grad_norm > 0``).
    ``log_to_trackers`` (default True): every flushed record also goes to ``accelerator.log``
    (``grad_l1_norm`` / ``grad_l2_norm`` at tracker step = history step + 1) when the
    accelerator has trackers (``init_trackers`` was called, before or after the hook was made).
    ``checkpointing`` (default True): register with ``accelerator.register_for_checkpointing``
    so ``save_state`` / ``load_state`` carry the hook's step and history position, and close the
    hook in ``accelerator.end_training()``. The Trainer callback turns both off (the Trainer
    has its own checkpoints and logs).
    """

    def __init__(
        self,
        accelerator: Any,
        model: Any,
        optimizer: Any,
        output_path: str | os.PathLike | None,
        *,
        flush_every: int = 50,
        start_step: int | None = None,
        step_fn: Callable[[], int] | None = None,
        norms: Sequence[str] = ("l1", "l2"),
        meta: Mapping[str, Any] | None = None,
        per_group: bool = False,
        reuse_norm: bool = False,
        expect_clip_call: bool = False,
        log_to_trackers: bool = True,
        checkpointing: bool = True,
    ):
        self.accelerator = accelerator
        self.reuse_norm = reuse_norm
        self.expect_clip_call = expect_clip_call
        self.log_to_trackers = bool(log_to_trackers)
        self._sums = None
        self._param_ids: frozenset | None = None
        self.optimizer = optimizer
        self._step = int(start_step or 0)
        self._step_fn = step_fn
        self._captured_at: int | None = None
        self._engine_handle = None
        self._restore: list[tuple[Any, str, Any]] = []
        self._closed = False
        self.output_path = Path(output_path) if output_path is not None else None
        # Where the step is still to be decided (no start_step): the first capture without a
        # load_state before it means a fresh run from step 0.
        self._position_known = start_step is not None

        n_acc = int(getattr(accelerator, "num_processes", 1))
        # torchrun sets WORLD_SIZE; accelerate may leave torch.distributed uninitialised then.
        n_launched = max(world_size(), int(os.environ.get("WORLD_SIZE", "1") or 1))
        if n_acc != n_launched:
            raise UserError(
                f"accelerate reports {n_acc} process(es) but {n_launched} were launched, so "
                "gradients are not reduced across ranks and each process trains alone; on a CPU-only "
                "machine set ACCELERATE_USE_CPU=1 in the environment (no script change), or pass "
                "cpu=True to Accelerator (use_cpu=True in TrainingArguments)"
            )
        backend = detect_backend(model, scale_fn=lambda: grad_scale_of(getattr(accelerator, "scaler", None), optimizer))
        if _is_deepspeed(accelerator) and backend.engine != "deepspeed":
            raise UserError(
                f"accelerate runs DeepSpeed but the model passed is a {type(model).__name__}, not the "
                "DeepSpeedEngine; pass the model accelerator.prepare returned"
            )
        groups = None
        if per_group:
            groups = [g["params"] for g in optimizer.param_groups]
        full_meta = {"source": "accelerate", **dict(meta or {})}
        self.recorder = GradNormRecorder(
            backend,
            output_path,
            flush_every,
            meta=full_meta,
            # start_step=None: keep the file as it is until the position is known.
            resume_after_step=self.step - 1 if start_step is not None else None,
            # An engine that clips by itself (DeepSpeed) needs no global norm inside the step:
            # reduce the buffered per-step sums once per flush instead of once per step.
            reduce_at_flush=backend.clips_itself,
            norms=norms,
            param_groups=groups,
        )
        if self.recorder.rank == 0 and (self.recorder.writer is not None or self.log_to_trackers):
            self.recorder.writer = _TrackingWriter(self.recorder.writer, self)
        if start_step is not None and self.step > 0:
            self._check_history(self.step)
        # Engines that own the optimizer step (DeepSpeed) hook it; otherwise wrap accelerate's.
        self._engine_handle = backend.install_step_hook(self._before_engine_step, self._after_engine_step)
        if self._engine_handle is None:
            self._wrap_clip()
            self._wrap_step()
        if checkpointing:
            accelerator.register_for_checkpointing(self)
            self._wrap_end_training()
        # A hook never closed still flushes at interpreter exit (with a warning): no silent loss.
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    # -- the step index ---------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """0-based index of the optimizer step in progress / next to run."""
        return self._step_fn() if self._step_fn is not None else self._step

    def _capture_once(self) -> None:
        if not self._position_known:
            self._settle_fresh_start()
        step = self.step
        if self._captured_at != step:
            self._sums = self.recorder.capture(step)
            self._captured_at = step

    def _is_all_params(self, params: list) -> bool:
        """``params`` are exactly the recorded model's trainable parameters (so the recorder's ℓ2
        answers a norm query about them)."""
        if self._sums is None:
            return False
        if self._param_ids is None:
            self._param_ids = frozenset(id(p) for p in self.recorder.backend.parameters())
        return frozenset(id(p) for p in params if getattr(p, "requires_grad", False)) == self._param_ids

    def _clip_from_sums(self, max_norm: float):
        """``accelerator.clip_grad_norm_(all params, max_norm)`` answered from the sums just
        captured (global, reduced, loss scale undone) instead of reading every gradient and
        all-reducing a second time: the Trainer calls it every step, with ``inf`` only to log
        ``grad_norm``. Clipping is torch's rule, ``g *= min(1, max_norm / (‖g‖ + 1e-6))``, applied
        to this rank's local gradient shards, after accelerate's own ``unscale_gradients()``."""
        total = self._sums[1].sqrt()
        if max_norm != float("inf"):
            self.accelerator.unscale_gradients()  # what accelerate does before clipping
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0).float()
            buckets: dict[torch.device, list[torch.Tensor]] = {}
            for _, g in self.recorder.backend.local_grads():
                buckets.setdefault(g.device, []).append(g)
            for dev, grads in buckets.items():
                torch._foreach_mul_(grads, coef.to(dev))
        return total.float()

    # -- torch engines: wrap accelerator.clip_grad_norm_ and optimizer.step --------------------------
    def _set(self, obj, name, value):
        self._restore.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def _wrap_clip(self):
        acc = self.accelerator
        orig = acc.clip_grad_norm_
        hook = self

        def clip_grad_norm_(parameters, max_norm, norm_type=2, *args, **kwargs):
            if acc.sync_gradients:
                hook._capture_once()  # before clipping: the recorded norm is the pre-clip one
                if hook.reuse_norm and norm_type == 2 and not args and not kwargs and _is_number(max_norm):
                    parameters = list(parameters)
                    if hook._is_all_params(parameters):
                        return hook._clip_from_sums(float(max_norm))
            return orig(parameters, max_norm, norm_type, *args, **kwargs)

        self._set(acc, "clip_grad_norm_", clip_grad_norm_)

    def _wrap_step(self):
        opt = self.optimizer
        orig = opt.step  # bound method (or an LR scheduler's wrapper of it)
        hook = self

        def step(opt_self, *args, **kwargs):
            sync = bool(hook.accelerator.sync_gradients)
            if sync:
                if hook.expect_clip_call and hook._captured_at != hook.step:
                    # The loop clips (it said so) but not through accelerator.clip_grad_norm_:
                    # the gradients here are already clipped, so recording them would be wrong.
                    raise UserError(
                        "gradients were clipped without accelerator.clip_grad_norm_, so the recorder "
                        "cannot see the pre-clip gradients; clip with accelerator.clip_grad_norm_"
                    )
                hook._capture_once()  # no clip call this step: grads are unclipped here
            out = orig(*args, **kwargs)
            if sync:
                if getattr(opt_self, "step_was_skipped", False):
                    hook.recorder.mark_skipped(hook.step, SKIP_REASON)
                hook._step += 1
            return out

        # An LR scheduler created earlier marked its own wrapper; keep the mark so torch does not
        # warn that step() was overridden after the scheduler was built.
        if getattr(orig, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        # A bound method, so an LR scheduler created later can re-wrap it (it uses __func__).
        self._set(opt, "step", types.MethodType(step, opt))

    # -- engines with their own step hook (DeepSpeed) ---------------------------------------------
    def _before_engine_step(self) -> None:
        self._capture_once()

    def _after_engine_step(self, skipped: bool) -> None:
        if skipped:
            self.recorder.mark_skipped(self.step, SKIP_REASON)
        self._step += 1

    # -- lifecycle ---------------------------------------------------------------------------------
    def flush(self) -> list[dict]:
        return self.recorder.flush()

    def sync(self) -> list[dict]:
        """Flush and fsync. ``accelerator.save_state`` does this by itself (``state_dict``); call it
        only for checkpoints written some other way."""
        return self.recorder.sync()

    def remove(self) -> None:
        """Undo the wrappers (the recorder stays open)."""
        for obj, name, old in reversed(self._restore):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)
        self._restore.clear()
        if self._engine_handle is not None:
            self._engine_handle.remove()
            self._engine_handle = None

    def close(self) -> list[dict]:
        """Remove the wrappers, flush and close the history file (``accelerator.end_training()``
        calls it). Idempotent."""
        if self._closed:
            return []
        self._closed = True
        atexit.unregister(self._atexit)
        self.remove()
        return self.recorder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- checkpoints (accelerator.register_for_checkpointing) ---------------------------------------
    def state_dict(self) -> dict:
        """Called by ``accelerator.save_state`` on every rank: flushes and fsyncs the history first,
        so the file on disk holds every step before ``step`` when the checkpoint exists."""
        self.recorder.sync()
        return {
            "format": "llm-refine/accelerate-hook",
            "version": 1,
            "step": int(self.step),  # the 0-based index of the next optimizer step
            "history_path": str(self.output_path) if self.output_path is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Called by ``accelerator.load_state`` on every rank: the step counter becomes the saved
        step N, and the history is truncated back to steps 0..N-1 (records past it were written
        by the segment that was killed). A history that then does not hold exactly 0..N-1 is
        warned about."""
        if not isinstance(state, Mapping) or state.get("format") != "llm-refine/accelerate-hook":
            raise UserError(
                "accelerator.load_state: the custom checkpoint object at the hook's position is not an "
                "AccelerateGradNormHook state (objects registered for checkpointing in another order?)"
            )
        step = int(state["step"])
        if not self._closed:
            self.recorder.flush()  # this process's pending rows go to the file first (then truncated)
        self._step = step
        self._captured_at = None
        self._position_known = True
        if self._closed or self.recorder.rank != 0 or self.output_path is None:
            return
        before = self._steps_on_disk()
        self._reopen(resume_after_step=step - 1)
        dropped = sum(1 for s in before if s >= step)
        if dropped:
            _log.info("%s: dropped %d records past step %d (written after the checkpoint)", self.output_path, dropped, step - 1)
        self._check_history(step, saved_path=state.get("history_path"))

    # -- the history file on rank 0 ---------------------------------------------------------------------
    def _steps_on_disk(self) -> list[int]:
        if self.output_path is None or not self.output_path.exists():
            return []
        _, records = read_jsonl(self.output_path)
        return [int(r["step"]) for r in records]

    def _reopen(self, *, resume_after_step: int | None, move_to: Path | None = None) -> None:
        w = self.recorder.writer
        if isinstance(w, _TrackingWriter) and w.inner is not None:
            w.inner.close()
        if move_to is not None:
            os.replace(self.output_path, move_to)
        inner = HistoryWriter(self.output_path, self.recorder.meta, resume_after_step=resume_after_step)
        self.recorder.writer = _TrackingWriter(inner, self)

    def _check_history(self, step: int, saved_path: str | None = None) -> None:
        """Warn unless the history holds exactly the steps 0..step-1 (rank 0)."""
        if self.recorder.rank != 0 or self.output_path is None:
            return
        steps = self._steps_on_disk()
        if steps == list(range(step)):
            return
        where = f"{self.output_path}"
        if saved_path and saved_path != str(self.output_path):
            where += f" (the checkpoint was saved by a hook writing {saved_path})"
        if not steps:
            what = "holds no records"
        elif steps[0] != 0:
            what = f"does not start at step 0 (first record: step {steps[0]})"
        else:
            have = set(steps)
            missing = [s for s in range(step) if s not in have]
            dup = len(steps) - len(have)
            what = f"is missing {len(missing)} of the steps 0..{step - 1}" + (f" (first: {missing[0]})" if missing else "")
            if dup:
                what += f" and has {dup} duplicate records"
        warnings.warn(
            f"gradient-norm history {where} {what}, but training resumes at step {step}: the refinement "
            "needs every step from 0 (was the earlier segment recorded to another file, or without the hook?)",
            stacklevel=3,
        )

    def _settle_fresh_start(self) -> None:
        """First capture with no load_state and no start_step: a fresh run from step 0. An existing
        history at the path belongs to another run: it is moved aside (never silently truncated)."""
        self._position_known = True
        if self.recorder.rank != 0 or self.output_path is None or self._closed:
            return
        steps = self._steps_on_disk()
        if not steps:
            return
        backup = _free_name(self.output_path)
        self._reopen(resume_after_step=None, move_to=backup)
        warnings.warn(
            f"{self.output_path} already held {len(steps)} records (steps {min(steps)}..{max(steps)}) and this "
            f"run starts at step 0 without accelerator.load_state: moved them to {backup} and started a new "
            "history (to continue that run, resume it with accelerator.load_state from its checkpoint)",
            stacklevel=4,
        )

    # -- trackers and end of training ---------------------------------------------------------------
    def _log(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Flushed records -> ``accelerator.log`` at tracker step = history step + 1 (rank 0)."""
        if not self.log_to_trackers or not getattr(self.accelerator, "trackers", None):
            return
        for r in records:
            if r.get("skipped"):
                continue
            values = {f"grad_{k}_norm": r[k] for k in self.recorder.norms if k in r}
            if values:
                self.accelerator.log(values, step=int(r["step"]) + 1)

    def _wrap_end_training(self) -> None:
        acc = self.accelerator
        orig = getattr(acc, "end_training", None)
        if orig is None:
            return
        hook = self

        def end_training(*args, **kwargs):
            hook.close()  # before the trackers finish and the process group goes
            return orig(*args, **kwargs)

        self._set(acc, "end_training", end_training)


class _TrackingWriter:
    """The recorder's writer on rank 0: the history file (if any) plus the accelerator's trackers."""

    def __init__(self, inner: HistoryWriter | None, hook: AccelerateGradNormHook):
        self.inner = inner
        self._hook = weakref.ref(hook)

    def write(self, records) -> None:
        records = list(records)
        if self.inner is not None:
            self.inner.write(records)
        hook = self._hook()
        if hook is not None:
            hook._log(records)

    def sync(self) -> None:
        if self.inner is not None:
            self.inner.sync()

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def _free_name(path: Path) -> Path:
    for i in range(10_000):
        cand = path.with_name(f"{path.name}.prev" + (str(i) if i else ""))
        if not cand.exists():
            return cand
    raise UserError(f"{path}: too many .prev copies next to it; remove some")


def _close_at_exit(ref) -> None:
    hook = ref()
    if hook is None or hook._closed:
        return
    rec = hook.recorder
    if rec.reduce_at_flush and world_size() > 1:
        # Flushing would be a collective at interpreter exit (DeepSpeed): not safe to start here.
        if rec.rank == 0:
            warnings.warn(f"AccelerateGradNormHook({hook.output_path}) was never closed: its buffered steps are "
                          "lost; call hook.close() or accelerator.end_training() at the end of training")
        return
    try:
        out = hook.close()
    except Exception as e:  # noqa: BLE001 - interpreter exit: report, never raise
        warnings.warn(f"AccelerateGradNormHook({hook.output_path}) was never closed and could not flush at exit: {e}")
        return
    if out and rec.rank == 0:
        warnings.warn(
            f"AccelerateGradNormHook({hook.output_path}) was never closed: wrote its last {len(out)} buffered "
            "steps at interpreter exit; call hook.close() or accelerator.end_training() at the end of training"
        )


_MISSING = object()


def _is_number(x) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True
