"""Worker code for the recorder's 2-process HF Trainer / accelerate tests (one spawn, many runs).

The Trainer runs with ``use_cpu=True`` (without it, on CPU, gradients are never reduced), a
sequential sampler (so the global batch of every micro-step is known: accelerate gives rank r the
batches r, r+2, ...) and SGD, so a hand-written single-process loop is the exact reference.
FSDP2 under the Trainer on a CPU-only machine needs the test-only patch of accelerate's state
described in shared/docs/engines-on-cpu.md (accelerate otherwise silently turns FSDP into DDP).
"""

from __future__ import annotations

import json
import os
import traceback

import torch
from torch import nn

PER_DEVICE = 2  # rows per rank per micro-batch: global micro-batch = 4 rows
LR = 0.1


class Reg(nn.Module):
    """Tiny regression model with the Trainer's calling convention (loss in the output dict)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 3)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x, labels):
        y = self.l2(torch.tanh(self.l1(x))).sum(-1) + self.b
        return {"loss": ((y - labels) ** 2).mean()}


def make_model(seed=0):
    torch.manual_seed(seed)
    return Reg()


def reg_data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, generator=g), "labels": torch.randn((), generator=g)} for _ in range(n)]


def ref_norms(params):
    flat = torch.cat([p.grad.detach().double().reshape(-1) for p in params if p.grad is not None])
    return flat.abs().sum().item(), flat.norm().item()


def reference_run(steps, batch, accum, clip, data=None):
    """Single-process loop on the same global batches: SGD, accumulation, clipping."""
    data = data or reg_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    out, i = [], 0
    for _ in range(steps):
        for _ in range(accum):
            rows = data[i : i + batch]
            i += batch
            x = torch.stack([r["x"] for r in rows])
            y = torch.stack([r["labels"] for r in rows])
            (m(x, y)["loss"] / accum).backward()
        out.append(ref_norms(m.parameters()))
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return out


class Crash(Exception):
    pass


def make_trainer(outdir, *, steps, accum, clip, fsdp2=False, fsdp1=False, crash_at=None, save_steps=None,
                 logging_steps=1, extra_callbacks=(), recorder=True, reuse_norm=False, seed=0):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llm_refine import GradNormCallback

    class SeqTrainer(Trainer):
        step_losses: list  # every micro-batch's loss, exactly (for the bit-identity tests)

        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            self.step_losses.append(float(loss))
            return loss

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if fsdp2 or fsdp1:
                patch_accelerate_fsdp(self, version=2 if fsdp2 else 1)

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if crash_at is not None and state.global_step == crash_at:
                raise Crash(f"simulated crash at step {state.global_step}")

    kw = {}
    if fsdp2:
        kw = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    if fsdp1:
        kw = {"fsdp": "full_shard", "fsdp_config": {"version": 1, "sync_module_states": False}}
    args = TrainingArguments(
        output_dir=outdir, per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=accum,
        max_steps=steps, logging_steps=logging_steps, report_to="none", use_cpu=True, max_grad_norm=clip,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, **kw,
    )
    recorders = [GradNormCallback(reuse_norm=reuse_norm)] if recorder else []
    trainer = SeqTrainer(model=make_model(seed), args=args, train_dataset=reg_data(),
                         callbacks=[*recorders, CrashAt(), *extra_callbacks])
    trainer.step_losses = []
    return trainer


def engine_facts(trainer) -> dict:
    """What really ran (the frameworks downgrade silently on CPU)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapped = trainer.model_wrapped
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": int(trainer.accelerator.num_processes),
        "is_ddp": isinstance(wrapped, DDP),
        "is_fsdp1": isinstance(wrapped, FSDP),
        "is_fsdp2": isinstance(trainer.model, FSDPModule),
        "wrapped_is_model": wrapped is trainer.model,
    }


def local_params(trainer) -> list:
    """This rank's share of every parameter after training (FSDP2: the DTensor's local shard)."""
    out = []
    for p in trainer.model_wrapped.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        out.append(t.detach().clone())
    return out


def identity_case(outdir, *, steps=10, accum=2, clip=0.05, fsdp2=False, fsdp1=False, reuse_probe=True):
    """The same Trainer run without and with GradNormCallback (and, as a probe, with the opt-in
    reuse_norm=True): per-micro-batch losses and final parameters, compared exactly."""
    runs = {}
    modes = [("without", False, False), ("with", True, False)] + ([("reuse", True, True)] if reuse_probe else [])
    for name, recorder, reuse in modes:
        d = os.path.join(outdir, name)
        trainer = make_trainer(d, steps=steps, accum=accum, clip=clip, fsdp2=fsdp2, fsdp1=fsdp1,
                               recorder=recorder, reuse_norm=reuse)
        trainer.train()
        runs[name] = (trainer.step_losses, local_params(trainer), engine_facts(trainer))
    base_losses, base_params, facts = runs["without"]
    out = {"facts": facts, "facts_with": runs["with"][2], "n_losses": len(base_losses)}
    for name in runs:
        if name == "without":
            continue
        losses, params, _ = runs[name]
        out[f"{name}_losses_equal"] = losses == base_losses
        out[f"{name}_params_equal"] = len(params) == len(base_params) and all(
            torch.equal(a, b) for a, b in zip(params, base_params))
        out[f"{name}_steps_differing"] = sum(a != b for a, b in zip(losses, base_losses))
        out[f"{name}_max_loss_diff"] = max(abs(a - b) for a, b in zip(losses, base_losses))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:  # only global rank 0 writes the history
        _, records = read_history(os.path.join(outdir, "with", "gradnorms.jsonl"))
        out["recorded_steps"] = [r["step"] for r in records]
    return out


def patch_accelerate_fsdp(trainer, version):
    """Test-only: make accelerate take its real FSDP path on a CPU-only machine."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    trainer.is_fsdp_enabled = True
    if version == 1:
        state.device = torch.device("cpu")
        PartialState._shared_state["device"] = torch.device("cpu")


def read_history(path):
    from llm_refine.history import read_jsonl

    return read_jsonl(path)


def run_trainer_case(outdir, **kw):
    trainer = make_trainer(outdir, **kw)
    trainer.train()
    out = {"log_history": trainer.state.log_history}
    wrapped = trainer.model_wrapped
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    out["is_ddp"] = isinstance(wrapped, DDP)
    out["is_fsdp2"] = isinstance(trainer.model, FSDPModule)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out["is_fsdp1"] = isinstance(wrapped, FSDP)
    if out["is_fsdp1"]:
        out["fsdp1_strategy"] = wrapped.sharding_strategy.name
        out["sharded"] = any(u._flat_param._sharded_size.numel() < u._flat_param._unpadded_unsharded_size.numel()
                             for u in FSDP.fsdp_modules(wrapped) if getattr(u, "_flat_param", None) is not None)
    out["distributed_type"] = str(trainer.accelerator.distributed_type)
    if isinstance(trainer.model, FSDPModule):
        w = trainer.model.l1.weight
        out["sharded"] = w.to_local().numel() < w.numel()
    return out


def resume_case(base):
    """Uninterrupted run vs crash at step 7 + resume from checkpoint-4: same history. Flushes:
    at the checkpoint (steps 0..3) and at the step-6 log (4, 5); step 6 is in the buffer at the
    crash. Resuming must drop 4, 5 (past the checkpoint) and recompute them."""
    kw = dict(steps=8, accum=1, clip=0.0, save_steps=4, logging_steps=3)
    full = os.path.join(base, "full")
    run_trainer_case(full, **kw)
    crashed = os.path.join(base, "crashed")
    try:
        run_trainer_case(crashed, crash_at=7, **kw)
        raised = False
    except Crash:
        raised = True
    from llm_refine.history import read_jsonl

    before = [r["step"] for r in read_jsonl(os.path.join(crashed, "gradnorms.jsonl"))[1]]
    trainer = make_trainer(crashed, **kw)
    trainer.train(resume_from_checkpoint=os.path.join(crashed, "checkpoint-4"))
    return {"raised": raised, "steps_before_resume": before}


def accelerate_case(outdir, accum=2, clip=0.05, steps=4):
    """Custom accelerate loop under DDP with the hook."""
    from accelerate import Accelerator

    from llm_refine import AccelerateGradNormHook

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(reg_data(), batch_size=PER_DEVICE, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = AccelerateGradNormHook(accelerator, model, opt, os.path.join(outdir, "gradnorms.jsonl"), flush_every=3)
    for i, batch in enumerate(loader):
        if hook.step >= steps:
            break
        with accelerator.accumulate(model):
            loss = model(**batch)["loss"]
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    hook.close()
    from torch.nn.parallel import DistributedDataParallel as DDP

    return {"is_ddp": isinstance(model, DDP)}


def trainer_worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    results: dict = {}
    cases = [
        ("ddp_accum2_clip", lambda d: run_trainer_case(d, steps=3, accum=2, clip=0.05)),
        ("ddp_noclip", lambda d: run_trainer_case(d, steps=3, accum=1, clip=0.0)),
        ("resume", resume_case),
        ("accelerate_ddp", accelerate_case),
        ("fsdp2_accum2_clip", lambda d: run_trainer_case(d, steps=3, accum=2, clip=0.05, fsdp2=True)),
        ("fsdp1_accum2_clip", lambda d: run_trainer_case(d, steps=3, accum=2, clip=0.05, fsdp1=True)),
        ("identity_ddp", identity_case),
        ("identity_fsdp2", lambda d: identity_case(d, fsdp2=True, reuse_probe=False)),
        ("identity_fsdp1", lambda d: identity_case(d, fsdp1=True, reuse_probe=False)),
    ]
    for name, fn in cases:
        d = os.path.join(outdir, name)
        os.makedirs(d, exist_ok=True)
        try:
            results[name] = fn(d)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, default=str)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
