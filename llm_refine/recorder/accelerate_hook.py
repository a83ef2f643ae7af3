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
    ...  # unchanged loop: accelerator.backward / clip_grad_norm_ / optimizer.step
    hook.close()
"""

from __future__ import annotations

import os
import types
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import UserError
from .backends import detect_backend, grad_scale_of, world_size
from .core import GradNormRecorder

SKIP_REASON = "loss scaler overflow (inf/nan gradients)"


def _is_deepspeed(accelerator) -> bool:
    dt = getattr(accelerator, "distributed_type", None)
    return str(getattr(dt, "value", dt)).upper() == "DEEPSPEED"


class AccelerateGradNormHook:
    """Installs the recorder into a prepared accelerate setup.

    ``model`` / ``optimizer``: what ``accelerator.prepare`` returned (DDP / FSDP / fully_shard'ed
    module / DeepSpeed engine; ``AcceleratedOptimizer``). ``start_step``: the 0-based index of the
    next optimizer step (resume: the checkpoint's step count); records past it already in the file
    are dropped. ``step_fn``: overrides the internal counter (the Trainer passes its global_step).
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
    """

    def __init__(
        self,
        accelerator: Any,
        model: Any,
        optimizer: Any,
        output_path: str | os.PathLike | None,
        *,
        flush_every: int = 50,
        start_step: int = 0,
        step_fn: Callable[[], int] | None = None,
        norms: Sequence[str] = ("l1", "l2"),
        meta: Mapping[str, Any] | None = None,
        per_group: bool = False,
        reuse_norm: bool = False,
        expect_clip_call: bool = False,
    ):
        self.accelerator = accelerator
        self.reuse_norm = reuse_norm
        self.expect_clip_call = expect_clip_call
        self._sums = None
        self._param_ids: frozenset | None = None
        self.optimizer = optimizer
        self._step = int(start_step)
        self._step_fn = step_fn
        self._captured_at: int | None = None
        self._engine_handle = None
        self._restore: list[tuple[Any, str, Any]] = []

        n_acc = int(getattr(accelerator, "num_processes", 1))
        # torchrun sets WORLD_SIZE; accelerate may leave torch.distributed uninitialised then.
        n_launched = max(world_size(), int(os.environ.get("WORLD_SIZE", "1") or 1))
        if n_acc != n_launched:
            raise UserError(
                f"accelerate reports {n_acc} process(es) but {n_launched} were launched, so "
                "gradients are not reduced across ranks; on a CPU-only machine pass cpu=True to Accelerator "
                "(use_cpu=True in TrainingArguments)"
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
            resume_after_step=self.step - 1,
            # An engine that clips by itself (DeepSpeed) needs no global norm inside the step:
            # reduce the buffered per-step sums once per flush instead of once per step.
            reduce_at_flush=backend.clips_itself,
            norms=norms,
            param_groups=groups,
        )
        # Engines that own the optimizer step (DeepSpeed) hook it; otherwise wrap accelerate's.
        self._engine_handle = backend.install_step_hook(self._before_engine_step, self._after_engine_step)
        if self._engine_handle is None:
            self._wrap_clip()
            self._wrap_step()

    # -- the step index ---------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """0-based index of the optimizer step in progress / next to run."""
        return self._step_fn() if self._step_fn is not None else self._step

    def _capture_once(self) -> None:
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
        """Flush and fsync: call when saving a checkpoint."""
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
        """Remove the wrappers, flush and close the history file."""
        self.remove()
        return self.recorder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_MISSING = object()


def _is_number(x) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True
