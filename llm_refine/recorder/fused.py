"""One-pass [Σ|g|, Σg²] over a list of CPU gradients: a compiled (inductor) C++ loop per gradient list.

The eager path (``backends.base.sums_of``'s fallback) reads every gradient twice on CPU: ``abs().sum()``
for ℓ1 and ``_foreach_norm(…, 2)`` for ℓ2. Here ``torch.compile`` turns :func:`_sums_impl` — per
tensor ``(Σ|g|, Σg²)`` in float32, then float64 across tensors — into ONE C++ kernel that loads each
element once and feeds both accumulators (inductor's vectorised cascade summation, so the float32
per-tensor error stays at the level of ATen's own sum). The semantics are the fallback's: float32
sums per tensor (bf16/fp16 gradients are converted in registers, never accumulated in half
precision), float64 across tensors.

One compiled graph per *gradient list signature* (shapes, strides, dtypes of the whole list): a model's
gradient list is compiled once, at its first call, not once per parameter shape; per-group sums add
one graph per group. Each signature gets its own copy of the function's code object, so dynamo's
per-code recompile limit is never what decides; at most :data:`MAX_SIGNATURES` are compiled, later
ones use the fallback.

Never crashes training: the first call of a signature is checked against the eager fallback (same
gradients); a compile error or a disagreement disables that signature (logged at debug) and the
caller uses the fallback. ``LLM_REFINE_FUSED_NORMS=0`` (or ``off``/``false``/``no``) forces the
fallback everywhere; ``=1`` forces the fused path even below :data:`MIN_NUMEL`. Compile time is
recorded in :data:`STATS` (``compile_s``), so a benchmark can report it apart from per-step cost.
"""

from __future__ import annotations

import logging
import os
import time
import types
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

ENV = "LLM_REFINE_FUSED_NORMS"
#: Auto mode compiles only gradient lists of at least this many elements: below it the fixed
#: per-call cost dominates and the compile (seconds) would not pay back in a short run.
MIN_NUMEL = 1 << 17
#: At most this many gradient-list signatures are compiled per process.
MAX_SIGNATURES = 16
#: dtypes the fused kernel accepts (accumulated in float32, as the fallback does).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: First-call self-check tolerance against the eager fallback (different summation orders of
#: float32 sums differ by ~1e-7 relative; anything beyond this is a wrong kernel).
CHECK_RTOL = 1e-4

_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes", "force")


def _sums_impl(grads: list[torch.Tensor]) -> torch.Tensor:
    l1 = []
    l2 = []
    for g in grads:
        g = g.float()
        l1.append(g.abs().sum())
        l2.append((g * g).sum())
    return torch.stack([torch.stack(l1).double().sum(), torch.stack(l2).double().sum()])


def env_mode() -> bool | None:
    """``LLM_REFINE_FUSED_NORMS``: False (force the fallback), True (force fused), None (auto)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in _OFF:
        return False
    if v in _ON:
        return True
    return None


def resolve(fused: bool | None) -> bool | None:
    """The effective mode: an explicit ``fused`` wins, else the environment, else None (auto)."""
    return env_mode() if fused is None else bool(fused)


def applicable(grads: Sequence[torch.Tensor], mode: bool | None) -> bool:
    """Whether ``grads`` (one (device, dtype) bucket, non-empty tensors) go through the fused path."""
    if mode is False or not grads:
        return False
    g0 = grads[0]
    if g0.device.type != "cpu" or g0.dtype not in DTYPES:
        return False
    if mode is None and sum(g.numel() for g in grads) < MIN_NUMEL:
        return False
    return True


class FusedSums:
    """Per-process cache: gradient-list signature → compiled callable (or None: use the fallback)."""

    def __init__(self, compile_fn: Callable | None = None):
        self._fns: dict[tuple, Callable | None] = {}
        self._compile_fn = compile_fn  # tests inject a failing compiler
        self.compile_s: dict[tuple, float] = {}  # wall seconds of each signature's first call
        self.compile_cpu_s: dict[tuple, float] = {}  # this process's CPU seconds of it
        self.failures: dict[tuple, str] = {}
        self.calls = 0  # fused calls that returned a result
        self.fallbacks = 0  # calls answered None (the caller used the fallback)

    @staticmethod
    def signature(grads: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(g.shape), tuple(g.stride()), g.dtype) for g in grads)

    def _compile(self, key: tuple) -> Callable:
        code = _sums_impl.__code__.replace(co_name=f"_fused_sums_{len(self._fns)}")
        fn = types.FunctionType(code, _sums_impl.__globals__, code.co_name)
        if self._compile_fn is not None:
            return self._compile_fn(fn)
        return torch.compile(fn, fullgraph=True, dynamic=False, options={"size_asserts": False})

    def __call__(self, grads: Sequence[torch.Tensor], reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """(2,) float64 [Σ|g|, Σg²] of ``grads``, or None when the fused path is unavailable for
        them. ``reference()`` computes the same with the fallback; it is called once per new
        signature, to check the compiled kernel."""
        grads = list(grads)
        key = self.signature(grads)
        fn = self._fns.get(key, False)
        if fn is None:
            self.fallbacks += 1
            return None
        if fn is not False:
            self.calls += 1
            return fn(grads)
        if len(self._fns) >= MAX_SIGNATURES:
            self._fns[key] = None
            self.failures[key] = f"more than {MAX_SIGNATURES} gradient-list signatures"
            log.debug("fused grad sums: %s; using the two-pass fallback for new ones", self.failures[key])
            self.fallbacks += 1
            return None
        return self._first_call(key, grads, reference)

    def _first_call(self, key, grads, reference) -> torch.Tensor | None:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            import torch._inductor.config as inductor_config

            fn = self._compile(key)
            # one compile, in this process: no worker pool spawned inside a training process
            with inductor_config.patch(compile_threads=1):
                out = fn(grads)
            ref = reference().to(out.dtype)
            if out.shape != (2,) or not torch.allclose(out, ref, rtol=CHECK_RTOL, atol=0.0, equal_nan=True):
                raise RuntimeError(f"compiled sums {out.tolist()} disagree with the fallback {ref.tolist()}")
        except Exception as e:  # noqa: BLE001 - any failure means: use the fallback, never crash
            self._fns[key] = None
            self.failures[key] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            log.debug("fused grad sums unavailable (%s); using the two-pass fallback", self.failures[key])
            self.fallbacks += 1
            return None
        self._fns[key] = fn
        self.compile_s[key] = time.perf_counter() - t0
        self.compile_cpu_s[key] = time.process_time() - c0
        self.calls += 1
        log.debug("fused grad sums: compiled %d tensors in %.2f s (%.2f s CPU in this process)",
                  len(grads), self.compile_s[key], self.compile_cpu_s[key])
        return out

    def compiled(self) -> int:
        """Number of signatures with a working compiled kernel."""
        return sum(1 for f in self._fns.values() if f is not None and f is not False)

    def total_compile_s(self) -> float:
        return float(sum(self.compile_s.values()))

    def total_compile_cpu_s(self) -> float:
        return float(sum(self.compile_cpu_s.values()))

    def clear(self) -> None:
        self._fns.clear()
        self.compile_s.clear()
        self.compile_cpu_s.clear()
        self.failures.clear()
        self.calls = self.fallbacks = 0


#: The process-wide cache used by ``sums_of``.
FUSED = FusedSums()
