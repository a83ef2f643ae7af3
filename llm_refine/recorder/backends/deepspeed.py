"""DeepSpeed backend of the gradient-norm recorder: ZeRO-0/1/2/3, optimizer offload, bf16/fp16.

What is measured is the gradient the optimizer applies: after the data-parallel reduction, at the
accumulation boundary, before clipping, with the fp16 loss scale undone. DeepSpeed keeps that
gradient in a different place for every optimizer wrapper, so the backend picks a *layout* once,
from the engine's optimizer class, and reads the tensors of that layout at each step:

================  ===================================================  ======================
layout            where the reduced, pre-clip gradient is              shared across ranks
================  ===================================================  ======================
``params``        ``p.grad`` of the basic optimizer (ZeRO-0, fp32)     replicated (DDP-like)
``lp_params``     ``p.grad`` of ``fp16_groups`` (ZeRO-0 fp16/bf16,     replicated
                  ``FP16_Optimizer``); scaled by ``cur_scale``
``bf16_opt``      ``BF16_Optimizer.get_grads_for_norm()`` (bf16 with   replicated
                  fp32 grad accumulation, ZeRO-1)
``zero12``        ``averaged_gradients[g]``: this rank's partition      partitioned
``zero12_off``    ``single_partition_of_fp32_groups[g].grad`` (CPU)     partitioned
``zero3``         ``averaged_gradients[g][i]``, one piece per param,    partitioned
                  trimmed to the param's real elements
``zero3_off``     slices of ``fp32_partitioned_groups_flat[g].grad``    partitioned
================  ===================================================  ======================

Replicated layouts are summed locally and not all-reduced (summing them across ranks would count
each gradient world-size times); partitioned layouts give this rank's share and the recorder core
all-reduces the two sums over the partition's process group.

The hook: the only call that runs once per optimizer step, after every reduction and before any
clipping, for *all* these layouts is ``DeepSpeedEngine._take_model_step`` (ZeRO-0 fp32 clips in the
engine, just before ``optimizer.step``; every other wrapper clips inside its own ``step``). It is
also what ``engine.step()`` runs at the accumulation boundary when accelerate / the HF Trainer call
it from inside ``accelerator.backward``, so callback hooks, which come too late there, are not
needed. Verified against deepspeed 0.19.8; when a DeepSpeed version lacks that method the hook falls
back to the optimizer's ``step`` and refuses the one setup where that would be after clipping.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import UserError
from .base import NormBackend, sums_of

__all__ = ["DeepSpeedBackend", "StepHookHandle", "install_step_hook", "zero3_real_elements"]

# ---------------------------------------------------------------------------------------------
# Small pure helpers


def zero3_real_elements(partition_numel: int, ds_numel: int, partition_rank: int) -> int:
    """How many leading elements of a ZeRO-3 gradient piece are real (the rest is padding).

    A parameter of ``ds_numel`` elements is cut into pieces of ``partition_numel`` (the last ones
    padded, possibly entirely); rank ``r`` owns elements ``[r*n, (r+1)*n)``.
    """
    return max(0, min(partition_numel, ds_numel - partition_rank * partition_numel))


def _dtype_name(engine) -> str:
    if engine.fp16_enabled():
        return "fp16"
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp32"


def _model_parallel_size(engine) -> int:
    """Tensor/model-parallel degree, 1 when none: grads then are not plain DP shards."""
    size = 1
    autotp = getattr(engine, "autotp_size", None)
    if callable(autotp):
        size = max(size, int(autotp() or 1))
    mpu = getattr(engine, "mpu", None)
    for name in ("get_tensor_model_parallel_world_size", "get_model_parallel_world_size"):
        fn = getattr(mpu, name, None)
        if callable(fn):
            try:
                size = max(size, int(fn()))
            except Exception:  # the groups module answers only once its groups exist
                pass
            break
    return size


def _flag(obj, name: str) -> bool:
    value = getattr(obj, name, False)
    return bool(value() if callable(value) else value)


def _check_supported(engine) -> None:
    """Refuse setups whose gradients are not plain data-parallel shards, instead of wrong numbers."""
    what = None
    if type(engine).__name__ == "PipelineEngine" or _flag(engine, "pipeline_parallelism"):
        what = "pipeline parallelism"
    elif _model_parallel_size(engine) > 1:
        what = "tensor/model parallelism"
    elif int(getattr(engine, "sequence_parallel_size", 1) or 1) > 1:
        what = "sequence parallelism"
    elif _flag(engine, "has_moe_layers"):
        what = "mixture-of-experts layers (expert-parallel gradients)"
    elif _flag(engine, "zenflow"):
        what = "ZenFlow"
    elif _flag(engine, "torch_autocast_enabled"):
        what = "torch_autocast (its GradScaler is not undone)"
    elif getattr(getattr(engine, "optimizer", None), "swap_optimizer", False):
        what = "optimizer offload to NVMe"
    else:
        try:
            ratio = float(engine.zero_partial_offload())
        except Exception:
            ratio = 1.0
        if engine.zero_cpu_offload() and ratio != 1.0:
            what = f"partial optimizer offload (ratio={ratio})"
    if what is not None:
        raise UserError(
            f"DeepSpeed engine: the gradient-norm recorder does not support {what}; "
            "record norms with plain data parallelism (ZeRO-0/1/2/3, optional CPU optimizer offload)"
        )


def _detect_layout(engine) -> str:
    # Imports are here so that importing llm_refine.recorder never pulls in deepspeed.
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if opt is None:
        raise UserError(
            "DeepSpeed engine: it has no optimizer, so there is no optimizer step to record; "
            "pass an optimizer to deepspeed.initialize or an 'optimizer' section in the config"
        )
    offload = bool(engine.zero_cpu_offload())
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3_off" if getattr(opt, "offload_optimizer", offload) else "zero3"
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return "zero12_off" if getattr(opt, "cpu_offload", offload) else "zero12"
    if type(opt).__name__ == "BF16_Optimizer" and hasattr(opt, "get_grads_for_norm"):
        return "bf16_opt"
    if hasattr(opt, "fp16_groups") and (engine.fp16_enabled() or engine.bfloat16_enabled()):
        return "lp_params"
    if engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        return "params"
    raise UserError(
        f"DeepSpeed engine: optimizer wrapper {type(opt).__name__} (ZeRO stage "
        f"{engine.zero_optimization_stage()}, {_dtype_name(engine)}) is not known to the gradient-norm "
        "recorder; use ZeRO-0/1/2/3 with a standard optimizer"
    )


def _ranks(group) -> tuple[int, ...] | None:
    import torch.distributed as dist

    try:
        return tuple(dist.get_process_group_ranks(group))
    except Exception:  # default group before init, or an older torch
        return None


def _single_group(groups: list, what: str):
    """The one process group all partitions use (identical object, or the same ranks)."""
    first = groups[0]
    first_ranks = None
    for g in groups[1:]:
        if g is first:
            continue
        if first_ranks is None:
            first_ranks = _ranks(first)
        if first_ranks is None or _ranks(g) != first_ranks:
            raise UserError(
                f"DeepSpeed engine: {what} use different process groups; the gradient-norm recorder "
                "needs one data-parallel group (no MoE / hierarchical partitioning)"
            )
    return first


# ---------------------------------------------------------------------------------------------
# Backend


class DeepSpeedBackend(NormBackend):
    """Local [Σ|g|, Σg²] of the gradient a ``deepspeed.DeepSpeedEngine``'s optimizer applies.

    Build it with :func:`~llm_refine.recorder.backends.detect_backend` (``detect_backend(engine)``).
    Call :meth:`local_sums` at the optimizer step, before clipping (:meth:`install_step_hook` does
    that). The sums have the loss scale undone (read from the DeepSpeed optimizer, so no
    ``scale_fn``); for partitioned layouts the recorder sums them over ``reduce_group``
    (``needs_reduce`` is True), for replicated ones it uses them as they are. DeepSpeed clips inside
    its own step (``clips_itself``). It implements the :class:`NormBackend` contract only: ZeRO keeps
    flat partitions, not per-parameter gradients, so there are no per-group norms.
    """

    engine = "deepspeed"
    clips_itself = True

    def __init__(self, engine):
        _check_supported(engine)
        self.ds_engine = engine
        self.layout = _detect_layout(engine)
        opt = engine.optimizer
        # The sums live where the engine computes: with optimizer offload the grads are on the CPU
        # but the all-reduce runs on the engine's (e.g. NCCL) device, so the (2,) result goes there.
        self._device = torch.device(engine.device) if engine.device is not None else torch.device("cpu")
        self.reduce_group = None
        self._zero3_slices = None
        if self.layout in ("zero12", "zero12_off"):
            self.reduce_group = _single_group(list(opt.real_dp_process_group), "ZeRO parameter groups")
        elif self.layout in ("zero3", "zero3_off"):
            params = [p for group in opt.fp16_groups for p in group]
            self.reduce_group = _single_group(
                [getattr(p, "ds_process_group", opt.dp_process_group) for p in params], "ZeRO-3 parameters"
            )
            self._zero3_slices = self._zero3_piece_layout(opt)
        self.needs_reduce = self.reduce_group is not None and self._group_size(self.reduce_group) > 1
        self._lp_scaled = [False]
        if self.layout == "lp_params" and engine.fp16_enabled():
            self._lp_scaled = self._watch_lp_backward(opt)

    # -- NormBackend interface -------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        e = self.ds_engine
        offload = e.zero_offload_optimizer()
        offload_device = getattr(offload, "device", None) if offload is not None else None
        return {
            "engine": "deepspeed",
            "zero_stage": int(e.zero_optimization_stage()),
            "world_size": int(self._world_size()),
            "dtype": _dtype_name(e),
            "offload_optimizer": str(getattr(offload_device, "value", offload_device) or "none"),
            "gradient_accumulation_steps": int(e.gradient_accumulation_steps()),
            "gradient_clipping": float(e.gradient_clipping()),
            "optimizer": type(getattr(e, "basic_optimizer", None) or e.optimizer).__name__,
            "deepspeed_optimizer": type(e.optimizer).__name__,
            "grad_layout": self.layout,
        }

    @property
    def device(self) -> torch.device:
        return self._device

    def local_sums(self) -> torch.Tensor:
        """[Σ|g|, Σg²] of this rank's share, loss scale undone, (2,) float64 on the engine's device."""
        sums = sums_of(self._grads(), self.device)
        scale = self.loss_scale()
        if scale != 1.0:
            sums = sums / torch.tensor([scale, scale * scale], dtype=sums.dtype, device=sums.device)
        return sums

    def install_step_hook(self, before, after=None) -> "StepHookHandle":
        """:func:`install_step_hook` on this backend's engine."""
        return install_step_hook(self.ds_engine, before, after)

    # -- details -----------------------------------------------------------------------------

    def loss_scale(self) -> float:
        """The factor the gradients carry at the step because the loss was scaled (1.0 unless fp16).

        ZeRO optimizers: ``engine.backward`` multiplies the loss by ``optimizer.loss_scale`` (which
        honours a custom/external scale) and their ``step`` divides it out again. FP16_Optimizer /
        FP16_UnfusedOptimizer (ZeRO-0 fp16): their ``step`` always divides by ``cur_scale``, but
        deepspeed 0.19.8's ``engine.backward`` never calls their ``backward``, so the loss is NOT
        scaled (see docs/recorder-deepspeed.md). Dividing there would record ‖g‖/cur_scale, a value
        that halves or doubles with every loss-scale change; so only the scale that really reached
        the loss is undone: the optimizer's ``backward`` is observed (``_watch_lp_backward``).
        """
        opt = self.ds_engine.optimizer
        if self.layout in ("params", "bf16_opt"):
            return 1.0
        if self.layout == "lp_params":
            if not self._lp_scaled[0]:
                return 1.0
            if getattr(opt, "custom_loss_scaler", False) and getattr(opt, "external_loss_scale", None):
                return float(opt.external_loss_scale)
            config = getattr(opt, "loss_scale_config", None)
            return float(config.cur_scale if config is not None else getattr(opt, "cur_scale", 1.0))
        return float(opt.loss_scale)

    @staticmethod
    def _watch_lp_backward(opt) -> list[bool]:
        """Note when the fp16 optimizer's own ``backward`` (the one that scales the loss) runs.

        Returns a one-element list that turns True at the first such call; the wrapper is shared
        by every backend built on the same optimizer.
        """
        inner = getattr(opt, "backward", None)
        if inner is None:
            return [False]
        seen = getattr(inner, "_llm_refine_seen", None)
        if seen is not None:
            return seen
        seen = [False]

        @functools.wraps(inner)
        def backward(*args, **kwargs):
            seen[0] = True
            return inner(*args, **kwargs)

        backward._llm_refine_seen = seen
        opt.backward = backward
        return seen

    def _world_size(self) -> int:
        e = self.ds_engine
        return int(getattr(e, "dp_world_size", None) or e.world_size)

    @staticmethod
    def _group_size(group) -> int:
        import torch.distributed as dist

        return dist.get_world_size(group=group) if dist.is_available() and dist.is_initialized() else 1

    @staticmethod
    def _zero3_piece_layout(opt) -> list[list[tuple[int, int]]]:
        """Per sub-group, per parameter: (offset into the flat fp32 partition, real element count).

        Static for the engine's life: partition sizes and ranks do not change between steps.
        """
        import torch.distributed as dist

        layout = []
        for group in opt.fp16_groups:
            row, offset = [], 0
            for p in group:
                n = int(p.partition_numel())
                rank = dist.get_rank(group=getattr(p, "ds_process_group", opt.dp_process_group))
                row.append((offset, zero3_real_elements(n, int(p.ds_numel), rank)))
                offset += n
            layout.append(row)
        return layout

    def _grads(self) -> list[torch.Tensor]:
        opt = self.ds_engine.optimizer
        layout = self.layout
        if layout == "params":
            seen, out = set(), []
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen and p.grad is not None:
                        seen.add(id(p))
                        out.append(p.grad)
            return out
        if layout == "lp_params":
            return [p.grad for group in opt.fp16_groups for p in group if p.grad is not None]
        if layout == "bf16_opt":
            non_expert, _ = opt.get_grads_for_norm()
            return list(non_expert)
        if layout == "zero12":
            out = []
            for i in range(len(opt.bit16_groups)):
                pieces = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else None
                if pieces is None:
                    continue
                flat = getattr(pieces, "flat_partition", None)  # DeepCompile's pre-flattened partition
                out.extend([flat] if flat is not None else [g for g in pieces if g is not None])
            return out
        if layout == "zero12_off":
            wait = getattr(opt, "_wait_for_offload_copies", None)
            if callable(wait):  # the device->CPU copies may still be in flight on a GPU
                wait()
            return [fp32.grad for fp32 in opt.single_partition_of_fp32_groups if fp32.grad is not None]
        if layout == "zero3":
            self._sync_zero3(opt)
            out = []
            for i, row in enumerate(self._zero3_slices):
                pieces = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else None
                if pieces is None:
                    continue
                if len(pieces) != len(row):
                    raise RuntimeError(
                        f"ZeRO-3 sub-group {i}: {len(pieces)} gradient pieces for {len(row)} parameters"
                    )
                out.extend(g.reshape(-1)[:keep] for g, (_, keep) in zip(pieces, row) if g is not None and keep)
            return out
        if layout == "zero3_off":
            self._sync_zero3(opt)
            out = []
            for i, row in enumerate(self._zero3_slices):
                flat = opt.fp32_partitioned_groups_flat[i].grad
                if flat is None:
                    continue
                out.extend(flat.narrow(0, off, keep) for off, keep in row if keep)
            return out
        raise AssertionError(layout)

    @staticmethod
    def _sync_zero3(opt) -> None:
        # ZeRO-3 reduces on its own stream on GPUs; DeepSpeed's own norm code waits on it too.
        stream = getattr(opt, "reduce_and_partition_stream", None)
        if stream is None:
            return
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().resolves_data_dependency():
            stream.synchronize()


# ---------------------------------------------------------------------------------------------
# Step hook


@dataclass
class StepHookHandle:
    """Returned by :func:`install_step_hook`; ``remove()`` undoes the wrapping (idempotent)."""

    target: Any
    attribute: str
    wrapper: Callable
    original: Callable
    had_instance_attr: bool
    active: bool = True

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False  # a wrapper installed later on top of ours then simply passes through
        if self.target.__dict__.get(self.attribute) is self.wrapper:
            if self.had_instance_attr:
                setattr(self.target, self.attribute, self.original)
            else:
                delattr(self.target, self.attribute)


def install_step_hook(
    engine,
    before_step: Callable[[], None],
    after_step: Callable[[bool], None] | None = None,
) -> StepHookHandle:
    """Run ``before_step()`` at each optimizer step of ``engine`` while the reduced, pre-clip
    gradients are still there, and ``after_step(skipped)`` once the step is done (``skipped`` is
    True when the engine skipped it, e.g. an fp16 overflow).

    Called once per optimizer step (at the gradient-accumulation boundary), whether the loop calls
    ``engine.step()`` itself or accelerate / the HF Trainer do it inside ``accelerator.backward``.
    """
    from ..._compat import warn_if_untested

    warn_if_untested("deepspeed")  # the engine's model step and the ZeRO partitions are patched
    if hasattr(type(engine), "_take_model_step"):
        target, attribute = engine, "_take_model_step"

        def skipped() -> bool:
            return not getattr(engine, "_step_applied", True)

    else:
        # Older/newer DeepSpeed without the method: the optimizer's step is the next best place,
        # but ZeRO-0 fp32 clips in the engine *before* it, so the norm there would be post-clip.
        if (
            engine.zero_optimization_stage() == 0
            and not (engine.fp16_enabled() or engine.bfloat16_enabled())
            and engine.gradient_clipping() > 0
        ):
            raise UserError(
                "DeepSpeed engine: this DeepSpeed version has no _take_model_step, and with ZeRO-0 in "
                "fp32 it clips before optimizer.step, so the recorded norm would be post-clip; "
                "set gradient_clipping to 0 or use deepspeed>=0.15"
            )
        target, attribute = engine.optimizer, "step"

        def skipped() -> bool:
            return bool(getattr(engine.optimizer, "overflow", False))

    had_instance_attr = attribute in target.__dict__
    original = getattr(target, attribute)
    handle: StepHookHandle

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not handle.active:
            return original(*args, **kwargs)
        before_step()
        result = original(*args, **kwargs)
        if after_step is not None:
            after_step(skipped())
        return result

    handle = StepHookHandle(target, attribute, wrapper, original, had_instance_attr)
    setattr(target, attribute, wrapper)
    return handle
