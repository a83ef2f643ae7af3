"""``GradNormCallback``: one line in a HF Trainer to record exact global ℓ1/ℓ2 gradient norms.

    Trainer(..., callbacks=[GradNormCallback()])

Why it does not just use ``on_pre_optimizer_step``: the Trainer (transformers 5.x,
``_run_epoch``) clips the gradients in ``_clip_grad_norm`` BEFORE that event, and with DeepSpeed
accelerate steps the engine inside ``accelerator.backward``, before any event. So in
``on_train_begin`` the callback finds the Trainer, and installs an
:class:`~llm_refine.recorder.accelerate_hook.AccelerateGradNormHook` on its accelerator,
optimizer and wrapped model: the capture runs inside ``accelerator.clip_grad_norm_`` (which the
Trainer calls every optimizer step, with ``max_grad_norm`` or with ``inf`` just to report the
norm), before clipping; or before ``optimizer.step()`` if nothing called it; or, with DeepSpeed,
inside the ZeRO optimizer's ``step``. The step index is the Trainer's ``state.global_step``
before the step.

Host copies happen only at logging steps, checkpoint saves (before the checkpoint is written, so
a crash cannot leave a checkpoint newer than the history), every ``flush_every`` steps, and at
the end. On resume from a checkpoint at global step N the history keeps steps 0..N-1 only.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

from transformers import TrainerCallback

from ..errors import UserError
from .accelerate_hook import AccelerateGradNormHook


def find_trainer(start_frame=None):
    """The ``transformers.Trainer`` whose training loop is calling us (callbacks are not handed
    the Trainer itself; ``on_train_begin`` runs inside ``Trainer._inner_training_loop``)."""
    from transformers import Trainer

    frame = start_frame or inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


_DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def run_precision(trainer, args=None) -> str:
    """The compute precision the Trainer really runs: accelerate's mixed precision (set by
    ``args.bf16``/``args.fp16``, or by ``mixed_precision`` in an ``accelerate launch`` config, where
    ``args.bf16`` stays False), else the dtype of the trainable parameters (a model loaded in bf16
    without autocast runs in bf16), else fp32."""
    args = args if args is not None else getattr(trainer, "args", None)
    mp = str(getattr(getattr(trainer, "accelerator", None), "mixed_precision", None) or "no").lower()
    if mp in ("bf16", "fp16", "fp8"):
        return mp
    for flag in ("bf16", "fp16"):
        if getattr(args, flag, False):
            return flag
    model = getattr(trainer, "model", None)
    params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    if params:
        return _DTYPE_PRECISION.get(str(params[0].dtype).replace("torch.", ""), "fp32")
    return "fp32"


class GradNormCallback(TrainerCallback):
    """Records the global gradient ℓ1/ℓ2 norm of every optimizer step (pre-clip, loss scale undone).

    ``output_path``: default ``<args.output_dir>/gradnorms.jsonl`` (written by global rank 0).
    ``flush_every``: host-copy interval in steps (default ``args.logging_steps``).
    ``norms``: which norms to record. ``per_group``: also per optimizer parameter group.
    ``reuse_norm`` (opt-in): answer the Trainer's own norm/clip call from the recorder's sums (one
    read of the gradients per step instead of two), at the price of bit-identity: see
    :class:`~llm_refine.recorder.accelerate_hook.AccelerateGradNormHook`. By default the Trainer's
    clip runs unchanged, so training with the callback is bit-identical to training without it.
    ``trainer``: pass it when the callback cannot find the Trainer itself (a custom loop that
    calls ``on_train_begin`` outside ``Trainer.train``).
    """

    def __init__(
        self,
        output_path: str | os.PathLike | None = None,
        flush_every: int | None = None,
        norms: Sequence[str] = ("l1", "l2"),
        *,
        per_group: bool = False,
        log_norms: bool = True,
        reuse_norm: bool = False,
        trainer: Any = None,
    ):
        self.output_path = output_path
        self.flush_every = flush_every
        self.norms = tuple(norms)
        self.per_group = per_group
        self.log_norms = log_norms
        self.reuse_norm = reuse_norm
        self._trainer = trainer
        self.hook: AccelerateGradNormHook | None = None
        self._state = None
        self._pending_log: dict | None = None
        self._orig_log = None

    # -- setup ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        from .._compat import warn_if_untested

        warn_if_untested("transformers")  # the Trainer's loop is walked below
        warn_if_untested("accelerate")  # the hook wraps Accelerator.clip_grad_norm_
        if self.hook is not None:  # a second train() call on the same Trainer
            self._teardown()
        trainer = self._trainer or find_trainer(inspect.currentframe().f_back)
        if trainer is None:
            raise UserError(
                "GradNormCallback could not find the Trainer calling it; pass it: GradNormCallback(trainer=trainer)"
            )
        self._state = state
        path = self.output_path or os.path.join(args.output_dir, "gradnorms.jsonl")
        # state.logging_steps is the resolved interval (args.logging_steps may be a ratio < 1)
        flush_every = self.flush_every or max(1, int(getattr(state, "logging_steps", None) or args.logging_steps or 1))
        meta = {
            "source": "transformers.Trainer",
            "precision": run_precision(trainer, args),
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "max_grad_norm": float(args.max_grad_norm or 0.0),
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
        }
        self.hook = AccelerateGradNormHook(
            trainer.accelerator,
            trainer.model_wrapped,
            trainer.optimizer,
            path,
            flush_every=flush_every,
            start_step=state.global_step,
            step_fn=lambda: self._state.global_step,
            norms=self.norms,
            meta=meta,
            per_group=self.per_group,
            reuse_norm=self.reuse_norm,
            expect_clip_call=bool(args.max_grad_norm and args.max_grad_norm > 0),
            # The Trainer has its own checkpoints (start_step above) and its own logs (report_to).
            log_to_trackers=False,
            checkpointing=False,
        )
        if self.log_norms:
            self._wrap_log(trainer)

    def _wrap_log(self, trainer):
        # Trainer.log appends to log_history and then calls on_log for every callback (TensorBoard,
        # W&B, ...): adding our keys in on_log would be too late for log_history and for the
        # reporters that run before us, so the keys are merged into the train log dict itself.
        orig = trainer.log
        cb = self

        def log(logs, *args, **kwargs):
            if cb._pending_log and isinstance(logs, dict) and "loss" in logs:
                logs.update(cb._pending_log)
                cb._pending_log = None
            return orig(logs, *args, **kwargs)

        self._orig_log = (trainer, trainer.__dict__.get("log"))
        trainer.log = log

    # -- per step ---------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        if self.hook is None:
            return
        if control.should_save:
            self.hook.sync()  # before the checkpoint exists, so history >= checkpoint
        elif control.should_log or control.should_training_stop:
            self.hook.flush()
        if control.should_log:
            last = self.hook.recorder.last
            if last is not None and last["step"] == state.global_step - 1:
                self._pending_log = {f"grad_{k}_norm": last[k] for k in self.norms if k in last}

    def on_save(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.sync()

    def on_train_end(self, args, state, control, **kwargs):
        self._teardown()

    def _teardown(self):
        if self.hook is not None:
            self.hook.close()
            self.hook = None
        if self._orig_log is not None:
            trainer, old = self._orig_log
            if old is None:
                trainer.__dict__.pop("log", None)
            else:
                trainer.log = old
            self._orig_log = None
