"""Worker code for the recorder's 2-process tests (imported by ``torch.multiprocessing.spawn``).

One spawn runs MANY engine configurations (process start + imports dominate the cost). Each
worker writes ``rank<r>.json`` with, per configuration, the records it captured, the engine
facts it asserted, or the error it hit; the test process compares against a single-process
reference computed on the same global batch.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

D_IN, D, H, D_OUT = 5, 12, 7, 3
MICRO = 8  # global micro-batch rows (split evenly over the ranks)


@dataclass
class Cfg:
    name: str
    engine: str  # ddp | fsdp1 | fsdp2 | single
    strategy: str = ""  # FSDP1 ShardingStrategy name
    orig_params: bool = False
    mesh: tuple = ()  # HSDP mesh shape (replicate, shard)
    accum: int = 1
    clip: float = 0.0
    dtype: str = "fp32"
    steps: int = 3
    per_group: bool = False
    offload: bool = False


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)
        self.gain = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x))) * self.gain


class Net(nn.Module):
    """Odd sizes so flat shards get padding, plus a 1-element parameter whose shard is empty on
    rank 1 (FSDP2) / whose grad is None there (FSDP1 use_orig_params)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, D_OUT)
        self.temp = nn.Parameter(torch.ones(1))

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h) * self.temp


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def batches(cfg: Cfg):
    """Per optimizer step, a list of `accum` micro-batches (x, y) of MICRO global rows."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(cfg.steps):
        out.append([(torch.randn(MICRO, D_IN, generator=g), torch.randn(MICRO, D_OUT, generator=g)) for _ in range(cfg.accum)])
    return out


def loss_fn(model, x, y):
    return ((model(x).float() - y) ** 2).mean()


def group_of(name: str) -> int:
    """Per-group test split by parameter name (names survive DDP/FSDP2/FSDP1-orig wrapping)."""
    return 0 if ".blocks." in f".{name}" or name.startswith("blocks.") else 1


def param_groups(model) -> list[list]:
    groups: list[list] = [[], []]
    for name, p in model.named_parameters():
        groups[group_of(name)].append(p)
    return groups


def _norms(params) -> tuple[float, float]:
    flat = torch.cat([p.grad.double().reshape(-1) for p in params])
    return flat.abs().sum().item(), flat.norm().item()


def reference(cfg: Cfg, per_group: bool = False) -> list:
    """Single process, fp32, whole global batch: the exact norms a correct recorder must give
    (with ``per_group``: a list of per-group (l1, l2) per step instead)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for micro in batches(cfg):
        for x, y in micro:
            (loss_fn(model, x, y) / cfg.accum).backward()
        if per_group:
            out.append([_norms(g) for g in param_groups(model)])
        else:
            out.append(_norms(model.parameters()))
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad()
    return out


# ---------------------------------------------------------------------------------------------
# engines


def wrap(cfg: Cfg, rank: int, world: int):
    """(wrapped model, facts proving the engine is what the config claims)."""
    model = make_model()
    bf16 = cfg.dtype == "bf16"
    facts: dict = {}
    if cfg.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if bf16:
            model = model.to(torch.bfloat16)
        m = DDP(model)
        facts["is_ddp"] = isinstance(m, DDP)
        return m, facts
    if cfg.engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        kw = {}
        if cfg.mesh:
            from torch.distributed.device_mesh import init_device_mesh

            kw["device_mesh"] = init_device_mesh("cpu", cfg.mesh, mesh_dim_names=("replicate", "shard"))
        if bf16:
            kw["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        if cfg.offload:
            from torch.distributed.fsdp import CPUOffload

            kw["cpu_offload"] = CPUOffload(offload_params=True)
        strategy = ShardingStrategy[cfg.strategy]
        m = FSDP(model, sharding_strategy=strategy, auto_wrap_policy=ModuleWrapPolicy({Block}),
                 use_orig_params=cfg.orig_params, device_id=torch.device("cpu"), **kw)
        units = FSDP.fsdp_modules(m)
        facts["is_fsdp1"] = isinstance(m, FSDP) and len(units) == 3
        facts["strategy"] = m.sharding_strategy.name
        facts["orig_params"] = m._use_orig_params
        flat = [u._flat_param for u in units if getattr(u, "_flat_param", None) is not None]
        facts["sharded"] = any(f._sharded_size.numel() < f._unpadded_unsharded_size.numel() for f in flat)
        return m, facts
    if cfg.engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        if cfg.mesh:
            mesh = init_device_mesh("cpu", cfg.mesh, mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        kw = {"mesh": mesh}
        if bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        if cfg.offload:
            from torch.distributed.fsdp import CPUOffloadPolicy

            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
        for b in model.blocks:
            fully_shard(b, **kw)
        fully_shard(model, **kw)
        facts["is_fsdp2"] = isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.blocks)
        facts["dtensor_params"] = all(isinstance(p, DTensor) for p in model.parameters())
        w = model.inp.weight
        facts["sharded"] = w.to_local().numel() < w.numel()
        facts["mesh_ndim"] = mesh.ndim
        return model, facts
    if cfg.engine == "single":
        return model, facts
    raise ValueError(cfg.engine)


def run_config(cfg: Cfg, rank: int, world: int, outdir: str) -> dict:
    from llm_refine.history import read_jsonl
    from llm_refine.recorder.backends import detect_backend
    from llm_refine.recorder.core import GradNormRecorder

    model, facts = wrap(cfg, rank, world)
    backend = detect_backend(model)
    facts["backend"] = backend.engine
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = os.path.join(outdir, f"{cfg.name}.jsonl")
    groups = param_groups(model) if cfg.per_group else None
    rec = GradNormRecorder(backend, path, flush_every=2, meta={"config": cfg.name}, param_groups=groups)
    clip_returned = []
    post_clip = []
    n = world
    lo, hi = rank * MICRO // n, (rank + 1) * MICRO // n
    for step, micro in enumerate(batches(cfg)):
        for k, (x, y) in enumerate(micro):
            last = k == len(micro) - 1
            x, y = x[lo:hi], y[lo:hi]
            if cfg.dtype == "bf16" and cfg.engine == "ddp":
                x = x.to(torch.bfloat16)
            loss = loss_fn(model, x, y) / cfg.accum
            if cfg.engine in ("ddp", "fsdp1") and not last:
                with model.no_sync():
                    loss.backward()
            elif cfg.engine == "fsdp2":
                model.set_requires_gradient_sync(last)
                loss.backward()
            else:
                loss.backward()
        rec.capture(step)
        if cfg.clip:
            if cfg.engine == "fsdp1":
                total = model.clip_grad_norm_(cfg.clip)
            else:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            if hasattr(total, "full_tensor"):
                total = total.full_tensor()
            clip_returned.append(float(total))
            after = rec.step_sums()  # the clipped gradient, to prove clipping happened
            post_clip.append(float(after[1].sqrt()))
        opt.step()
        opt.zero_grad()
    captured = rec.close()
    out = {"facts": facts, "captured": captured, "clip_returned": clip_returned, "post_clip": post_clip}
    if rank == 0:
        meta, records = read_jsonl(path)
        out["meta"] = meta
        out["records"] = records
    return out


def error_cases(rank: int, world: int) -> dict:
    """Setups the recorder must refuse (UserError) instead of recording wrong numbers."""
    from llm_refine.errors import UserError
    from llm_refine.recorder.backends import detect_backend

    out = {}

    def expect(name, fn):
        try:
            fn()
            out[name] = "no error"
        except UserError as e:
            out[name] = "UserError: " + str(e)
        except Exception as e:  # a different failure is a test failure too
            out[name] = f"{type(e).__name__}: {e}"

    # an unwrapped model on 2 ranks: its grads are never reduced
    expect("unwrapped", lambda: detect_backend(make_model()))

    # DDP over a sub-group (as inside tensor/pipeline parallel layouts)
    def ddp_subgroup():
        from torch.nn.parallel import DistributedDataParallel as DDP

        groups = [dist.new_group([0]), dist.new_group([1])]
        detect_backend(DDP(make_model(), process_group=groups[rank]))

    expect("ddp_subgroup", ddp_subgroup)

    # tensor parallelism (DTensor parameters without FSDP2)
    def tp():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        m = make_model()
        parallelize_module(m, mesh, {"inp": ColwiseParallel()})
        detect_backend(m)

    expect("tensor_parallel", tp)

    # FSDP2 over a dp dim of a 2-D (dp, tp) mesh with TP on the other dim
    def fsdp_tp():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        m = make_model()
        parallelize_module(m, mesh["tp"], {"inp": ColwiseParallel()})
        fully_shard(m, mesh=mesh["dp"])
        detect_backend(m)

    expect("fsdp2_tp", fsdp_tp)

    # FSDP1 HYBRID_SHARD with (replicate=2, shard=1): torch degrades it to an unreduced NO_SHARD
    def hybrid_1rank():
        import warnings

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = FSDP(make_model(), sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=mesh,
                     device_id=torch.device("cpu"))
        detect_backend(m)

    expect("fsdp1_hybrid_1rank_shards", hybrid_1rank)
    return out


def engines_worker(rank: int, world: int, port: int, outdir: str, cfgs: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    try:
        for d in cfgs:
            cfg = Cfg(**d)
            try:
                results[cfg.name] = run_config(cfg, rank, world, outdir)
            except Exception:
                results[cfg.name] = {"error": traceback.format_exc()}
            dist.barrier()
        results["_errors"] = error_cases(rank, world)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()


def cfg_dicts(cfgs: list[Cfg]) -> list[dict]:
    return [asdict(c) for c in cfgs]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, args: tuple, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    """``torch.multiprocessing.spawn`` with a deadline: a deadlocked collective fails the test
    (and its processes are killed) instead of hanging CI."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"spawned workers still running after {timeout_s:.0f} s (deadlock?)")
