"""The contract every engine backend of the recorder implements, and the pieces they share.

A backend answers one question per optimizer step: what are Σ|g| and Σg² of THIS rank's unique
share of the global (data-parallel reduced) gradient, such that one all-reduce(SUM) over
``reduce_group`` gives the exact global sums? Replicated gradients (single process, DDP, FSDP1
NO_SHARD, DeepSpeed ZeRO-0) are counted once by not reducing at all; sharded ones are summed over
the shard / partition group only (HSDP replicas hold copies).

Two levels, so that no engine has a method it cannot honour:

- :class:`NormBackend` (every engine): ``engine``, ``needs_reduce``, ``reduce_group``, ``device``,
  ``meta()``, ``local_sums()``, ``to_comm_device(t)``, ``reduce(t)``, ``clips_itself``,
  ``install_step_hook(before, after)``.
- :class:`ParamGradBackend` (engines whose gradients are per-parameter tensors: single process,
  DDP, FSDP1, FSDP2) adds ``parameters()``, ``local_grads()``, ``group_sums(groups)``. DeepSpeed
  keeps flat ZeRO partitions, so its backend is a plain :class:`NormBackend`.

Everything stays on the gradients' device and the result is a (2,) tensor — no host sync. On CPU
both sums come from one compiled pass over each gradient (:mod:`llm_refine.recorder.fused`), with
the two-pass eager reduction as the fallback; on accelerators per-tensor norms come from
``torch._foreach_norm`` (one fused kernel per device/dtype bucket and norm).
"""

from __future__ import annotations

import abc
import functools
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import fused as _fused


def _acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype of the per-step sums: float64 keeps an ℓ1 sum over billions of elements
    exact to ~1e-12; MPS has no float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


def dist_on() -> bool:
    """torch.distributed is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the default process group (1 without torch.distributed)."""
    return dist.get_world_size() if dist_on() else 1


@functools.cache  # the import statement below costs ~10 us per call, and it runs per gradient
def dtensor_api():
    """(DTensor, Replicate, Shard), or None without DTensor support (public module from torch 2.5)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._tensor import DTensor, Replicate, Shard
        except ImportError:
            return None
    return DTensor, Replicate, Shard


def is_dtensor(t: Any) -> bool:
    api = dtensor_api()
    return api is not None and isinstance(t, api[0])


def sums_of(grads: Sequence[torch.Tensor], device: torch.device | None = None, *, fused: bool | None = None) -> torch.Tensor:
    """[Σ|g|, Σg²] over plain (local) tensors, as a (2,) tensor on ``device`` (default: the first
    grad's device). Tensors are bucketed by (device, dtype); sums are accumulated in float32 (never
    in bf16/fp16) — per tensor in the two-pass path, per 4096-element block in the CPU kernel —
    and in float64 (MPS: float32) above that.

    CPU buckets of float32/bf16/fp16 grads go through the one-pass compiled kernel of
    :mod:`llm_refine.recorder.fused` (``fused=None``: unless ``LLM_REFINE_FUSED_NORMS=0``;
    ``True``: yes; ``False``: never); every other bucket, and every bucket when the kernel is
    unavailable, uses the two-pass reduction of :func:`sums_two_pass` (on accelerators one fused
    ``_foreach_norm`` call per norm)."""
    mode = _fused.resolve(fused)
    if mode is not False and grads and (device is None or device.type == "cpu"):
        # The common case, one bucket of contiguous CPU grads of one kernel dtype: the kernel's
        # (2,) float64 result is the answer (CPU accumulates in float64), without the filtering,
        # bucketing and copy below, whose per-tensor Python work costs about as much as the kernel
        # on a small model. Empty tensors add nothing to the kernel's sums. (Never ``None in grads``:
        # that compares None with every tensor, ~30 us each.)
        part = _fused.FUSED.one_bucket(grads)
        if part is not None:
            return part
    grads = [g for g in grads if g is not None and g.numel() > 0]
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    acc = _acc_dtype(device)
    out = torch.zeros(2, dtype=acc, device=device)
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        buckets[(g.device, g.dtype)].append(g)
    for (dev, _), ts in buckets.items():
        part = None
        if _fused.applicable(ts, mode):
            part = _fused.FUSED(ts, lambda sub, dev=dev: _bucket_two_pass(sub, dev))
        if part is None:
            part = _bucket_two_pass(ts, dev)
        # non_blocking only host->device: a non-blocking device->host copy could be read early
        out += part.to(device=device, dtype=acc, non_blocking=device.type != "cpu")
    return out


def _bucket_two_pass(ts: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """(2,) sums of one (device, dtype) bucket of non-empty tensors, one pass per norm."""
    a = _acc_dtype(dev)
    # float32 sums per tensor (half-precision grads widened); float64 grads keep float64
    nd = torch.float32 if ts[0].dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    if dev.type == "cpu":
        # The CPU ord-1 norm kernel is ~2x slower than abs().sum() (measured, torch 2.13).
        n1 = torch.stack([g.abs().sum(dtype=nd) for g in ts])
    else:
        n1 = torch.stack(torch._foreach_norm(ts, 1, dtype=nd))
    n2 = torch.stack(torch._foreach_norm(ts, 2, dtype=nd)).to(a)
    return torch.stack([n1.sum(dtype=a), torch.dot(n2, n2)])


def sums_two_pass(grads: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """:func:`sums_of` with the fused kernel off: the reference the fused path is checked against."""
    return sums_of(grads, device, fused=False)


def grad_scale_of(scaler: Any, optimizer: Any = None) -> torch.Tensor | None:
    """The loss scale still applied to the grads of ``optimizer`` (a device tensor), or None.

    ``torch.amp.GradScaler`` multiplies the loss by its scale; until ``scaler.unscale_(optimizer)``
    runs, the grads carry that factor. If the optimizer was already unscaled this step (the user
    called ``unscale_`` or ``accelerator.unscale_gradients()`` before the capture), the grads are
    true grads and nothing must be divided. Reading ``_scale`` (not ``get_scale()``) avoids a sync.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # scale() never called: nothing was scaled
        return None
    if optimizer is not None:
        inner = optimizer
        # accelerate's AcceleratedOptimizer is keyed by the inner optimizer in the scaler
        while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer
        states = getattr(scaler, "_per_optimizer_states", {})
        for opt in (optimizer, inner):
            st = states.get(id(opt))
            if st is not None and getattr(st.get("stage"), "name", "") in ("UNSCALED", "STEPPED"):
                return None
    return scale




def on_comm_device(t: torch.Tensor, group) -> torch.Tensor:
    """NCCL reduces only CUDA tensors: sums computed on the host (CPU-offloaded gradients under
    FSDP or DeepSpeed) go to this rank's GPU for the all-reduce; otherwise ``t`` itself."""
    if t.device.type != "cpu":
        return t
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


class NormBackend(abc.ABC):
    """What the recorder needs from every engine (the public contract).

    Subclasses set ``engine`` (the name written to the history's header), and ``needs_reduce`` /
    ``reduce_group`` (whether, and over which process group, this rank's sums must be summed with
    the other ranks'), and implement :meth:`local_sums` and :attr:`device` (and usually extend
    :meth:`meta`).

    ``clips_itself``: the engine clips inside its own optimizer step (DeepSpeed), so nothing needs
    the global norm inside the step and the recorder may reduce its buffered sums once per flush.
    ``install_step_hook(before, after)``: for engines that own the optimizer step, run
    ``before()`` at every optimizer step while the pre-clip gradients exist and ``after(skipped)``
    after it, returning a handle with ``remove()``; ``None`` (the default) means the engine has no
    step of its own and the caller captures before its clip / ``optimizer.step()``.
    """

    engine: str = "single"
    reduce_group: Any = None
    needs_reduce: bool = False
    clips_itself: bool = False
    #: one-pass compiled sums on CPU: None = yes unless ``LLM_REFINE_FUSED_NORMS=0``,
    #: False = always the two-pass fallback, True = yes
    #: (``GradNormRecorder(fused=...)`` sets it).
    fused: bool | None = None

    def meta(self) -> dict:
        """Header metadata: at least ``engine`` and ``world_size``."""
        return {"engine": self.engine, "world_size": world_size()}

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where :meth:`local_sums` returns its tensor."""

    @abc.abstractmethod
    def local_sums(self) -> torch.Tensor:
        """(2,) [Σ|g|, Σg²] of this rank's share of the reduced gradient, loss scale undone, on
        :attr:`device`; no host sync."""

    def to_comm_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on a device the reduce group can all-reduce (``t`` itself when no reduce)."""
        return on_comm_device(t, self.reduce_group) if self.needs_reduce else t

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (sums of this rank's share, any shape) over ``reduce_group``: the global sums.
        In place when ``t`` is already on the comm device; identity when ``needs_reduce`` is False."""
        if not self.needs_reduce:
            return t
        t = self.to_comm_device(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.reduce_group)
        return t

    def install_step_hook(self, before: Callable[[], None], after: Callable[[bool], None] | None = None):
        """``None``: this engine has no optimizer step of its own to hook (see the class doc)."""
        return None


class ParamGradBackend(NormBackend):
    """Engines whose gradients are per-parameter tensors in ``p.grad`` (single process, DDP,
    FSDP1, FSDP2). Subclasses set ``self.module`` (the model whose parameters are trained) and may
    override :meth:`local_part` (this rank's share of one gradient as a plain tensor)."""

    module: nn.Module

    def __init__(self, *, scale_fn: Callable[[], torch.Tensor | None] | None = None):
        # scale_fn returns the loss scale still on the grads (see grad_scale_of) or None.
        self.scale_fn = scale_fn
        self._plist: list[nn.Parameter] | None = None
        self._dev: torch.device | None = None

    # -- public contract --------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters whose gradients are recorded (as the training loop sees them:
        FSDP flat / DTensor parameters). Cached: walking the module tree every step costs as much
        as the norms of a small model, and these parameter objects persist."""
        if self._plist is None:
            self._plist = [p for p in self.module.parameters() if p.requires_grad]
        return self._plist

    def local_part(self, grad: torch.Tensor) -> torch.Tensor:
        """This rank's share of one gradient as a plain tensor (engines with DTensor grads convert
        or refuse here)."""
        return grad

    def local_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """This rank's unique share of the reduced gradient as plain tensors, each paired with its
        parameter (per-group norms map them to optimizer groups by identity; clipping multiplies
        them in place)."""
        return [(p, self.local_part(p.grad)) for p in self.parameters() if p.grad is not None]

    def meta(self) -> dict:
        params = self.parameters()
        dtype = str(params[0].dtype).replace("torch.", "") if params else None
        return {**super().meta(), "param_dtype": dtype}

    def local_sums(self) -> torch.Tensor:
        return self._unscale(sums_of([g for _, g in self.local_grads()], self.device, fused=self.fused))

    def group_sums(self, param_groups: Sequence[Iterable[nn.Parameter]]) -> torch.Tensor:
        """(G, 2) sums per parameter group (e.g. ``optimizer.param_groups``' params), matched by
        parameter identity; same reduction as :meth:`local_sums`."""
        index = {}
        for gi, params in enumerate(param_groups):
            for p in params:
                index[id(p)] = gi
        per: list[list[torch.Tensor]] = [[] for _ in param_groups]
        for p, g in self.local_grads():
            gi = index.get(id(p))
            if gi is not None:
                per[gi].append(g)
        dev = self.device
        return torch.stack([self._unscale(sums_of(gs, dev, fused=self.fused)) for gs in per])

    @property
    def device(self) -> torch.device:
        if self._dev is None:
            self._dev = self._find_device()
        return self._dev

    # -- internals --------------------------------------------------------------------------------
    def _find_device(self) -> torch.device:
        for p in self.parameters():
            if is_dtensor(p):
                return p.to_local().device
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    def _unscale(self, sums: torch.Tensor) -> torch.Tensor:
        scale = self.scale_fn() if self.scale_fn is not None else None
        if scale is None:
            return sums
        s = scale.to(device=sums.device, dtype=sums.dtype).reshape(())
        return sums / torch.stack([s, s * s])
