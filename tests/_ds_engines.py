"""Worker for the raw DeepSpeed-engine recorder tests: many engine configs in one 2-rank spawn.

For every case, each optimizer step's recorded ℓ1/ℓ2 (DeepSpeedBackend + install_step_hook +
GradNormRecorder) is compared, by the test, with a single-process float64 reference: the same
parameters (gathered from the engine before the step) in an fp32 copy of the model, on the whole
global batch of that step.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(__file__))

from _ds_common import error_text, init_dist, norms64, setup_worker_env, teardown_dist  # noqa: E402

VOCAB, DIM, HIDDEN, SEQ = 37, 12, 9, 5  # odd sizes: ZeRO partitions of 2 ranks get padding
MICRO = 2  # sequences per rank per micro-batch


@dataclass
class Case:
    name: str
    stage: int
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    offload: bool = False
    gas: int = 1
    clip: float = 0.0
    steps: int = 3
    layout: str = ""  # expected DeepSpeedBackend.layout
    force_scale: float = 0.0  # set the ZeRO optimizer's static loss scale (exercises the unscale path)
    bf16_fp32_accum: bool = False  # bf16 + fp32 grad accumulation (ZeRO-1: BF16_Optimizer)
    inf_at_step: int = -1  # make this step's loss inf on rank 0 (overflow -> skipped step)
    fp16_initial_scale_power: int = 8
    extra: dict = field(default_factory=dict)


def build_model(seed: int = 0):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, DIM)
            self.fc1 = nn.Linear(DIM, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, VOCAB)

        def forward(self, x, y):
            h = torch.tanh(self.fc1(self.emb(x)))
            logits = self.fc2(h).float()
            return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    torch.manual_seed(seed)
    return Tiny()


def global_batch(case_index: int, step: int, n: int):
    import torch

    g = torch.Generator().manual_seed(1000 * case_index + step)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return x, y


def ds_config(case: Case, world: int) -> dict:
    zero: dict = {"stage": case.stage}
    if case.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": case.gas,
        "train_batch_size": MICRO * case.gas * world,
        "zero_optimization": zero,
        "gradient_clipping": case.clip,
        # a torch optimizer with offload: DeepSpeedCPUAdam would need a C++ build
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if case.dtype == "bf16":
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}
        if case.bf16_fp32_accum:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif case.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": case.fp16_initial_scale_power}
    cfg.update(case.extra)
    return cfg


def reference(engine, ref_model, x, y) -> tuple[float, float]:
    """ℓ1/ℓ2 of the gradient of the mean loss over the global batch, at the engine's parameters."""
    import deepspeed
    import torch

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        with torch.no_grad():
            for p_ref, p in zip(ref_model.parameters(), params):
                p_ref.copy_(p.detach().float().reshape(p_ref.shape))
    ref_model.zero_grad(set_to_none=True)
    ref_model(x, y).backward()
    return norms64([p.grad for p in ref_model.parameters()])


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 when oneDNN has no fp16 kernels (this machine:
    ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` is False, so ``deepspeed.initialize`` raises
    "Type fp16 is not supported on your device."), yet torch runs every op of the tiny model in
    fp16 on CPU. Overriding the capability check lets real fp16 engines run: dynamic loss scale,
    overflow detection and skipped steps, all in DeepSpeed's own code."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def run_case(case_index: int, case: Case, rank: int, world: int, out_dir: str) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    if case.dtype == "fp16":
        allow_fp16_on_cpu()

    from llm_refine.history import read_jsonl
    from llm_refine.recorder.core import GradNormRecorder
    from llm_refine.recorder.backends import detect_backend

    model = build_model(seed=case_index)
    ref_model = build_model(seed=case_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case, world))
    out = {"name": case.name, "stage": int(engine.zero_optimization_stage())}
    try:
        if case.force_scale:
            # Static loss scale on a ZeRO optimizer: backward multiplies the loss by it and step()
            # divides it out, exactly as under fp16; lets CPU exercise the undo-the-scale path.
            engine.optimizer.loss_scaler.cur_scale = case.force_scale
        backend = detect_backend(engine)  # the one place a backend is chosen: a DeepSpeedBackend here
        out["backend_class"] = type(backend).__name__
        out["layout"] = backend.layout
        out["meta"] = backend.meta()
        path = os.path.join(out_dir, f"{case.name}.jsonl")
        # the pattern docs/recorder-deepspeed.md shows for raw loops
        recorder = GradNormRecorder(backend, path, flush_every=2, resume_after_step=engine.global_steps - 1)
        state = {"before": 0, "after": [], "before_steps": []}
        scales = []

        def before():
            state["before"] += 1
            state["before_steps"].append(int(engine.global_steps))
            scales.append(backend.loss_scale())
            recorder.capture(engine.global_steps)

        def after(skipped: bool):
            state["after"].append(bool(skipped))
            if skipped:
                recorder.mark_skipped(engine.global_steps - 1, "overflow")

        handle = backend.install_step_hook(before, after)
        refs, ds_norms = [], []
        n_global = MICRO * case.gas * world
        for step in range(case.steps):
            x, y = global_batch(case_index, step, n_global)
            refs.append(reference(engine, ref_model, x, y))
            for micro in range(case.gas):
                # rank r, micro m: rows [(m*world + r)*MICRO, +MICRO) of the global batch
                lo = (micro * world + rank) * MICRO
                loss = engine(x[lo : lo + MICRO], y[lo : lo + MICRO])
                if step == case.inf_at_step and rank == 0:
                    loss = loss * float("inf")
                engine.backward(loss)
                engine.step()
            norm = engine.get_global_grad_norm()
            ds_norms.append(None if norm is None else float(norm))
        recorder.close()
        handle.remove()
        out.update(
            refs=refs,
            ds_norms=ds_norms,
            before_calls=state["before"],
            before_steps=state["before_steps"],
            skipped=state["after"],
            scales=scales,
            records=read_jsonl(path)[1] if rank == 0 else None,
            global_steps=int(engine.global_steps),
            hook_removed="_take_model_step" not in engine.__dict__,
        )
    except Exception:
        out["error"] = error_text()
    finally:
        engine.destroy()
        dist.barrier()
    return out


def probe_fp16(world: int) -> dict:
    """Does DeepSpeed itself accept fp16 on this CPU? (Before allow_fp16_on_cpu patches it.)"""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    out = {"accelerator": get_accelerator()._name, "native": bool(get_accelerator().is_fp16_supported())}
    model = build_model()
    try:
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_config(Case("probe", 0, "fp16"), world)
        )
        engine.destroy()
        out["initialize_error"] = None
    except ValueError as e:
        out["initialize_error"] = str(e)
    return out


def worker(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    setup_worker_env(rank, world, port)
    init_dist()
    results = [{"name": "fp16_probe", **probe_fp16(world)}]
    for i, c in enumerate(cases):
        case = Case(**c)
        try:
            results.append(run_case(i, case, rank, world, out_dir))
        except Exception:
            results.append({"name": case.name, "error": error_text()})
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, allow_nan=True)
    teardown_dist()


def main(out_dir: str, cases: list[Case], world: int = 2) -> list[dict]:
    from _ds_common import spawn

    spawn(worker, (world, [asdict(c) for c in cases], out_dir), world)
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)
