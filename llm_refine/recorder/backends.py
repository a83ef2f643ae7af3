"""Where each training engine keeps its gradients, and how to turn them into exact global sums.

A backend answers one question per optimizer step: what are Σ|g| and Σg² of THIS rank's unique
share of the global (data-parallel reduced) gradient, such that one all-reduce(SUM) over
``reduce_group`` gives the exact global sums? Replicated gradients (single process, DDP, FSDP1
NO_SHARD) are counted once by not reducing at all; sharded ones (FSDP1 FULL_SHARD / SHARD_GRAD_OP /
HYBRID_SHARD, FSDP2) are summed over the shard group only (HSDP replicas hold copies).

Everything stays on the gradients' device: per-tensor norms come from ``torch._foreach_norm``
(one fused kernel per device/dtype bucket), and the result is a (2,) tensor — no host sync.

Setups whose numbers we cannot get right (tensor/pipeline parallelism, DTensor meshes with
non-data-parallel dims, an unwrapped model on several ranks whose gradients are never reduced)
raise :class:`~llm_refine.errors.UserError` instead of recording wrong norms.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

def _acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype of the per-step sums: float64 keeps an ℓ1 sum over billions of elements
    exact to ~1e-12; MPS has no float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _dtensor_api():
    """(DTensor, Replicate, Shard), or None without DTensor support (public module from torch 2.5)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._tensor import DTensor, Replicate, Shard
        except ImportError:
            return None
    return DTensor, Replicate, Shard


def _is_dtensor(t: Any) -> bool:
    api = _dtensor_api()
    return api is not None and isinstance(t, api[0])


def sums_of(grads: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """[Σ|g|, Σg²] over plain (local) tensors, as a (2,) tensor on ``device`` (default: the first
    grad's device). Tensors are bucketed by (device, dtype) so each bucket is one fused
    ``_foreach_norm`` call per norm; norms are computed in float32 even for bf16/fp16 grads."""
    grads = [g for g in grads if g is not None and g.numel() > 0]
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    acc = _acc_dtype(device)
    out = torch.zeros(2, dtype=acc, device=device)
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        buckets[(g.device, g.dtype)].append(g)
    for (dev, _), ts in buckets.items():
        a = _acc_dtype(dev)
        if dev.type == "cpu":
            # The CPU ord-1 norm kernel is ~2x slower than abs().sum() (measured, torch 2.13).
            n1 = torch.stack([g.abs().sum(dtype=torch.float32) for g in ts])
        else:
            n1 = torch.stack(torch._foreach_norm(ts, 1, dtype=torch.float32))
        n2 = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32)).to(a)
        part = torch.stack([n1.sum(dtype=a), torch.dot(n2, n2)])
        # non_blocking only host->device: a non-blocking device->host copy could be read early
        out += part.to(device=device, non_blocking=device.type != "cpu")
    return out


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


class NormBackend:
    """Base class: a source of per-step gradient sums for one engine.

    Subclasses set ``engine``, ``reduce_group`` / ``needs_reduce``. ``_local_grads`` gives this
    rank's unique share of the reduced gradient as plain tensors, paired with the parameter they
    belong to (so optional per-group norms can map them to optimizer groups by identity); by default
    every ``p.grad`` through ``_plain_grad``, which engines with DTensor gradients override.
    """

    engine: str = "single"
    reduce_group: Any = None
    needs_reduce: bool = False

    def __init__(self, *, scale_fn: Callable[[], torch.Tensor | None] | None = None):
        # scale_fn returns the loss scale still on the grads (see grad_scale_of) or None.
        self.scale_fn = scale_fn

    # -- per engine (overridable) -------------------------------------------------------------
    def _local_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, self._plain_grad(p.grad)) for p in self._params() if p.grad is not None]

    def _plain_grad(self, g: torch.Tensor) -> torch.Tensor:
        """This rank's share of one gradient as a plain tensor (engines with DTensor grads convert
        or refuse here)."""
        return g

    def _extra_meta(self) -> dict:
        return {}

    # -- public -------------------------------------------------------------------------------
    def meta(self) -> dict:
        params = self._params()
        dtype = str(params[0].dtype).replace("torch.", "") if params else None
        return {"engine": self.engine, "world_size": world_size(), "param_dtype": dtype, **self._extra_meta()}

    def _all_params(self) -> Iterable[nn.Parameter]:
        return []

    def _params(self) -> list[nn.Parameter]:
        # Cached: walking the module tree every step costs as much as the norms of a small
        # model. FSDP flat / DTensor parameters are persistent objects, so the cache stays valid.
        plist = getattr(self, "_plist", None)
        if plist is None:
            plist = self._plist = [p for p in self._all_params() if p.requires_grad]
        return plist

    def _unscale(self, sums: torch.Tensor) -> torch.Tensor:
        scale = self.scale_fn() if self.scale_fn is not None else None
        if scale is None:
            return sums
        s = scale.to(device=sums.device, dtype=sums.dtype).reshape(())
        return sums / torch.stack([s, s * s])

    def local_sums(self) -> torch.Tensor:
        """(2,) [Σ|g|, Σg²] of this rank's share, on the grads' device, loss scale undone."""
        return self._unscale(sums_of([g for _, g in self._local_grads()], self.device))

    def group_sums(self, param_groups: Sequence[Iterable[nn.Parameter]]) -> torch.Tensor:
        """(G, 2) sums per parameter group (e.g. ``optimizer.param_groups``' params), matched by
        parameter identity; same reduction as ``local_sums``."""
        index = {}
        for gi, params in enumerate(param_groups):
            for p in params:
                index[id(p)] = gi
        per: list[list[torch.Tensor]] = [[] for _ in param_groups]
        for p, g in self._local_grads():
            gi = index.get(id(p))
            if gi is not None:
                per[gi].append(g)
        dev = self.device
        return torch.stack([self._unscale(sums_of(gs, dev)) for gs in per])

    @property
    def device(self) -> torch.device:
        dev = getattr(self, "_dev", None)
        if dev is None:
            dev = self._dev = self._find_device()
        return dev

    def _find_device(self) -> torch.device:
        for p in self._params():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")


class LocalBackend(NormBackend):
    """Single process, or DDP: every rank holds the full, already averaged gradient."""

    def __init__(self, module: nn.Module, *, engine: str = "single", group: Any = None, **kw):
        super().__init__(**kw)
        self.module = module
        self.engine = engine
        self.group = group

    def _all_params(self):
        return self.module.parameters()

    def _plain_grad(self, g):
        if _is_dtensor(g):
            raise UserError(
                f"{self.engine} model has DTensor gradients (tensor parallelism?); the recorder "
                "supports plain data parallelism only: use FSDP2 without other mesh dims, or DDP"
            )
        return g


class FSDP1Backend(NormBackend):
    """torch FullyShardedDataParallel (FSDP1). Each rank's ``.grad`` (flat, zero-padded shard, or
    views of it with ``use_orig_params=True``; ``None`` where a rank's shard of a parameter is
    empty) is disjoint within the shard group. NO_SHARD keeps full replicated grads; HYBRID_SHARD
    replicates across nodes, so only the intra-node shard group is summed."""

    engine = "fsdp1"

    def __init__(self, model: nn.Module, **kw):
        super().__init__(**kw)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        self.model = model
        units = FSDP.fsdp_modules(model)
        if not units:
            raise UserError("model has no FullyShardedDataParallel module; wrap it with FSDP or use another backend")
        strategies = {u.sharding_strategy for u in units}
        if len(strategies) != 1:
            names = sorted(s.name for s in strategies)
            raise UserError(f"FSDP1 model mixes sharding strategies {names}; use one strategy for all FSDP units")
        self.strategy = strategies.pop()
        self.use_orig_params = bool(getattr(units[0], "_use_orig_params", False))
        self.cpu_offload = bool(getattr(getattr(units[0], "cpu_offload", None), "offload_params", False))
        root = units[0]
        shard_pg = root.process_group
        shard_size = dist.get_world_size(shard_pg)
        replicate = 1
        if self.strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
            inter = getattr(root, "_inter_node_pg", None)
            replicate = dist.get_world_size(inter) if inter is not None else 1
        if shard_size == 1 and world_size() > 1 and getattr(root, "_inter_node_pg", None) is not None:
            # Measured (torch 2.13): HYBRID_SHARD with a 1-rank shard group silently becomes
            # NO_SHARD on that group and never all-reduces across the replicas.
            raise UserError(
                "FSDP1 HYBRID_SHARD with a 1-rank shard group was turned into NO_SHARD by torch and its "
                "gradients are not reduced across replicas; use a shard group of >= 2 ranks, or DDP"
            )
        if shard_size * replicate != world_size():
            raise UserError(
                f"FSDP1 data-parallel groups cover {shard_size * replicate} of {world_size()} ranks "
                "(tensor or pipeline parallelism?); the recorder supports pure data parallelism only"
            )
        self.shard_size = shard_size
        if self.strategy == ShardingStrategy.NO_SHARD or shard_size == 1:
            self.needs_reduce, self.reduce_group = False, None
        else:
            self.needs_reduce, self.reduce_group = True, shard_pg

    def _all_params(self):
        return self.model.parameters()

    def _extra_meta(self):
        return {
            "fsdp_strategy": self.strategy.name,
            "use_orig_params": self.use_orig_params,
            "shard_group_size": self.shard_size,
            "offload": self.cpu_offload,
        }


class FSDP2Backend(NormBackend):
    """torch ``fully_shard`` (FSDP2): grads are DTensors sharded over the FSDP mesh. Local shards
    (``to_local()``) are disjoint over the shard dim and copies over an HSDP replicate dim, so the
    partial sums are all-reduced over the shard dim's group only."""

    engine = "fsdp2"

    def __init__(self, model: nn.Module, **kw):
        super().__init__(**kw)
        DTensor, Replicate, Shard = _dtensor_api()

        self.model = model
        fsdp_mesh = _fsdp2_mesh(model)
        meshes = {}
        plain = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if isinstance(p, DTensor):
                meshes[id(p.device_mesh)] = (p.device_mesh, tuple(p.placements), name)
            else:
                plain.append(name)
        if plain:
            raise UserError(
                f"FSDP2 model has parameters not managed by fully_shard (e.g. {plain[0]!r}); "
                "call fully_shard on the root module too"
            )
        if len(meshes) != 1:
            raise UserError(
                "FSDP2 model's parameters live on several device meshes; the recorder supports one "
                "data-parallel mesh only (no tensor/pipeline/context parallel dims)"
            )
        mesh, placements, name = next(iter(meshes.values()))
        if fsdp_mesh is not None and mesh.ndim != fsdp_mesh.ndim:
            raise UserError(
                f"FSDP2 parameter {name!r} is on a {mesh.ndim}-D mesh {mesh.mesh_dim_names} but FSDP "
                f"shards over {fsdp_mesh.ndim}-D; extra dims (tensor parallelism) are not supported"
            )
        shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
        bad = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
        if bad or len(shard_dims) > 1:
            raise UserError(
                f"FSDP2 parameter {name!r} has placements {placements}; expected Shard on one mesh "
                "dim (FSDP) and Replicate on an optional HSDP replicate dim"
            )
        if mesh.size() != world_size():
            raise UserError(
                f"FSDP2 mesh covers {mesh.size()} of {world_size()} ranks; the recorder supports pure "
                "data parallelism over all ranks only"
            )
        self.mesh = mesh
        self.placements = placements
        if shard_dims and mesh.size(shard_dims[0]) > 1:
            self.needs_reduce = True
            self.reduce_group = mesh.get_group(shard_dims[0]) if mesh.ndim > 1 else mesh.get_group()
        self.hsdp = mesh.ndim == 2
        self.offload = _fsdp2_offloads(model)

    def _all_params(self):
        return self.model.parameters()

    def _find_device(self) -> torch.device:
        for p in self._params():
            return p.to_local().device if _is_dtensor(p) else p.device
        return torch.device("cpu")

    def _plain_grad(self, g):
        if not _is_dtensor(g):
            return g
        if tuple(g.placements) != self.placements:
            raise UserError(
                f"FSDP2 gradient placements {tuple(g.placements)} differ from the parameters' "
                f"{self.placements}; unreduced (Partial) gradients cannot be recorded exactly"
            )
        return g.to_local()

    def _extra_meta(self):
        return {
            "fsdp_strategy": "HSDP" if self.hsdp else "FULLY_SHARD",
            "mesh_shape": list(self.mesh.shape),
            "placements": [str(p) for p in self.placements],
            "offload": self.offload,
        }


def _fsdp2_offloads(model: nn.Module) -> bool:
    """Whether FSDP2 keeps parameters/gradients on the CPU (CPUOffloadPolicy; private API)."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy
    except ImportError:  # pragma: no cover - older torch
        return False
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None) if state is not None else None
        if group is not None and isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy):
            return True
    return False


def _fsdp2_mesh(model: nn.Module):
    """The mesh the outermost FSDP2 module shards over (private API; None if unavailable)."""
    try:
        state = model._get_fsdp_state()  # type: ignore[attr-defined]
        pg = state._fsdp_param_group
        if pg is None:
            for m in model.modules():
                st = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
                if st is not None and st._fsdp_param_group is not None:
                    pg = st._fsdp_param_group
                    break
        return pg.mesh_info.mesh if pg is not None else None
    except Exception:
        return None


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def detect_backend(model: Any, *, scale_fn: Callable[[], torch.Tensor | None] | None = None) -> NormBackend:
    """Pick the backend for ``model`` as the training loop sees it (the wrapped model: DDP, FSDP,
    a fully_shard'ed module, a DeepSpeed engine, or a plain module)."""
    model = _unwrap_compiled(model)
    # A DeepSpeed engine can only exist if deepspeed was imported; don't pay its import otherwise.
    ds = sys.modules.get("deepspeed")
    if ds is not None and isinstance(model, getattr(ds, "DeepSpeedEngine", ())):
        from .deepspeed import DeepSpeedBackend  # engineer B's module, imported only here

        return DeepSpeedBackend(model)

    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        inner = model.module
        if _has_fsdp1(inner) or _has_fsdp2(inner):
            raise UserError("DDP wraps an FSDP model; use FSDP alone (HYBRID_SHARD / HSDP for replication)")
        pg = model.process_group
        if dist.get_world_size(pg) != world_size():
            raise UserError(
                f"DDP replicates over {dist.get_world_size(pg)} of {world_size()} ranks (tensor or "
                "pipeline parallelism?); the recorder supports pure data parallelism only"
            )
        return LocalBackend(inner, engine="ddp", group=pg, scale_fn=scale_fn)
    if _has_fsdp1(model):
        return FSDP1Backend(model, scale_fn=scale_fn)
    if _has_fsdp2(model):
        return FSDP2Backend(model, scale_fn=scale_fn)
    if any(_is_dtensor(p) for p in model.parameters()):
        raise UserError(
            "model has DTensor parameters but is not FSDP2-sharded (tensor parallelism?); the recorder "
            "supports data parallelism only (DDP, FSDP1, FSDP2, DeepSpeed)"
        )
    if world_size() > 1:
        raise UserError(
            f"torch.distributed has {world_size()} ranks but the model is not wrapped by DDP/FSDP/DeepSpeed, "
            "so its gradients are never reduced (each rank trains alone, or pipeline parallelism); wrap it "
            "(with the HF Trainer on CPU pass use_cpu=True under torchrun)"
        )
    return LocalBackend(model, engine="single", scale_fn=scale_fn)


def _has_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP) or any(isinstance(m, FSDP) for m in model.modules())


def _has_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6 keeps FSDP2 private
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())
