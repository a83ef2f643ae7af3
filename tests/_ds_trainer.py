"""Worker for the HF Trainer + DeepSpeed recorder test: ZeRO-2 and ZeRO-3 Trainers in one 2-rank spawn.

The Trainer runs with ``use_cpu=True`` (without it accelerate sees one process on CPU and both
ranks train on the same batch) and a sequential sampler, so the rows of every optimizer step are
known: accelerate gives rank r the micro-batches r, r+2, ... of ``PER_DEVICE`` rows each. Before
each optimizer step (``on_step_begin``, outside DeepSpeed's own step) a test callback gathers the
engine's parameters into an fp32 copy of the model and computes the float64 reference ℓ1/ℓ2 of the
mean loss over that step's global batch. ``GradNormCallback`` (the code under test) records what
the engine applies; the test compares the two files.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _ds_common import error_text, init_dist, norms64, setup_worker_env, teardown_dist  # noqa: E402

PER_DEVICE = 2
SEQ = 8
VOCAB = 64


def tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2 * SEQ, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def dataset(n: int):
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


class Crash(Exception):
    pass


def run_trainer(
    stage: int, gas: int, clip: float, steps: int, out_dir: str, rank: int, world: int, *,
    run_dir: str | None = None, save_steps: int | None = None, crash_at: int | None = None,
    resume_from: str | None = None, recorder: bool = True,
) -> dict:
    import deepspeed
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llm_refine import GradNormCallback

    data = dataset(PER_DEVICE * world * gas * steps)

    step_losses: list[float] = []  # every micro-batch's loss, exactly (bit-identity with/without)

    class SeqTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            step_losses.append(float(loss))
            return loss

    class Reference(TrainerCallback):
        """Float64 reference norms at the parameters each optimizer step starts from."""

        def __init__(self):
            self.refs: dict[int, tuple[float, float]] = {}
            self.trainer = None
            self.ref_model = tiny_llama()

        def on_step_begin(self, args, state, control, **kwargs):
            step = state.global_step
            if step in self.refs:
                return  # called again for the next micro-batch of the same optimizer step
            engine = self.trainer.model_wrapped
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                with torch.no_grad():
                    for p_ref, p in zip(self.ref_model.parameters(), params):
                        p_ref.copy_(p.detach().float().reshape(p_ref.shape))
            rows = data[step * world * gas * PER_DEVICE : (step + 1) * world * gas * PER_DEVICE]
            ids = torch.stack([r["input_ids"] for r in rows])
            self.ref_model.zero_grad(set_to_none=True)
            self.ref_model(input_ids=ids, labels=ids).loss.backward()
            self.refs[step] = norms64([p.grad for p in self.ref_model.parameters()])

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if crash_at is not None and state.global_step == crash_at:
                raise Crash(f"simulated crash after step {crash_at}")

    run_dir = os.path.join(out_dir, run_dir or f"zero{stage}")
    args = TrainingArguments(
        output_dir=run_dir, per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=gas,
        max_steps=steps, logging_steps=1, report_to="none", use_cpu=True, max_grad_norm=clip,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_only_model=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, deepspeed=ds_config(stage),
    )
    ref = Reference()
    trainer = SeqTrainer(
        model=tiny_llama(), args=args, train_dataset=data,
        callbacks=[*([GradNormCallback()] if recorder else []), ref, CrashAt()],
    )
    ref.trainer = trainer
    engine = None
    try:
        try:
            trainer.train(resume_from_checkpoint=os.path.join(run_dir, resume_from) if resume_from else None)
            crashed = False
        except Crash:
            crashed = True
        engine = trainer.model_wrapped
        out = {
            "stage": int(engine.zero_optimization_stage()),
            "is_engine": isinstance(engine, deepspeed.DeepSpeedEngine),
            "engine_gas": int(engine.gradient_accumulation_steps()),
            "engine_clip": float(engine.gradient_clipping()),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "num_processes": int(trainer.accelerator.num_processes),
            "global_step": int(trainer.state.global_step),
            "refs": {str(k): v for k, v in sorted(ref.refs.items())},
            "log_history": trainer.state.log_history,
            "history_path": os.path.join(run_dir, "gradnorms.jsonl"),
            "crashed": crashed,
            "records": read_records(os.path.join(run_dir, "gradnorms.jsonl")) if rank == 0 else None,
            "losses": step_losses,
            "params_sha256": params_digest(engine.module),
        }
    finally:
        if engine is None:
            engine = getattr(trainer, "model_wrapped", None)
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        reset_accelerate()
    return out


def run_accelerate_loop(stage: int, gas: int, clip: float, steps: int, out_dir: str, rank: int, world: int) -> dict:
    """A custom accelerate loop (``Accelerator(deepspeed_plugin=...)``) with
    ``AccelerateGradNormHook``; the reference is taken before each optimizer step's first micro-batch."""
    import deepspeed
    import torch
    from accelerate import Accelerator, DeepSpeedPlugin, PartialState

    from llm_refine import AccelerateGradNormHook

    data = dataset(PER_DEVICE * world * gas * steps)
    config = {
        "train_micro_batch_size_per_gpu": PER_DEVICE,
        "gradient_accumulation_steps": gas,
        "train_batch_size": PER_DEVICE * gas * world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    # On a CPU-only machine: the process state on CPU (gloo, 2 processes), then an Accelerator
    # WITHOUT cpu=True. Accelerator(cpu=True, deepspeed_plugin=...) silently gives plain DDP
    # (accelerate/state.py only takes the DeepSpeed path when "not cpu"); this is what the
    # Trainer does with use_cpu=True.
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    model = tiny_llama()
    ref_model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=PER_DEVICE, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    path = os.path.join(out_dir, f"accelerate_zero{stage}", "gradnorms.jsonl")
    hook = AccelerateGradNormHook(accelerator, model, optimizer, path, flush_every=2)
    refs = {}
    try:
        for micro, batch in enumerate(loader):
            if micro % gas == 0:
                step = micro // gas
                params = list(model.module.parameters())
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    with torch.no_grad():
                        for p_ref, p in zip(ref_model.parameters(), params):
                            p_ref.copy_(p.detach().float().reshape(p_ref.shape))
                rows = data[step * world * gas * PER_DEVICE : (step + 1) * world * gas * PER_DEVICE]
                ids = torch.stack([r["input_ids"] for r in rows])
                ref_model.zero_grad(set_to_none=True)
                ref_model(input_ids=ids, labels=ids).loss.backward()
                refs[str(step)] = norms64([p.grad for p in ref_model.parameters()])
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        hook.close()
        return {
            "stage": int(model.zero_optimization_stage()),
            "is_engine": isinstance(model, deepspeed.DeepSpeedEngine),
            "distributed_type": str(accelerator.distributed_type),
            "num_processes": int(accelerator.num_processes),
            "global_step": int(model.global_steps),
            "refs": refs,
            "history_path": path,
            "records": read_records(path) if rank == 0 else None,
        }
    finally:
        if hasattr(model, "destroy"):
            model.destroy()
        reset_accelerate()


def params_digest(module) -> str:
    """sha256 of this rank's parameter bytes (ZeRO-2: the full module parameters; ZeRO-3: this
    rank's partitions): equal digests mean bit-identical parameters."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p if t is None else t
        h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_records(path: str) -> list[dict]:
    from llm_refine.history import read_jsonl

    return read_jsonl(path)[1] if os.path.exists(path) else []


def reset_accelerate() -> None:
    """A second Trainer in the same process must not inherit the first one's DeepSpeed plugin."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)


def worker(rank: int, world: int, port: int, runs: list[dict], out_dir: str) -> None:
    setup_worker_env(rank, world, port)
    init_dist()
    results = []
    for run in runs:
        try:
            fn = run_accelerate_loop if run.get("kind") == "accelerate" else run_trainer
            results.append({"name": run["name"], **fn(rank=rank, world=world, out_dir=out_dir, **run["kw"])})
        except Exception:
            results.append({"name": run["name"], "error": error_text()})
    if rank == 0:
        with open(os.path.join(out_dir, "trainer_results.json"), "w") as f:
            json.dump(results, f, allow_nan=True, default=str)
    teardown_dist()


def main(out_dir: str, runs: list[dict], world: int = 2) -> list[dict]:
    from _ds_common import spawn

    spawn(worker, (world, runs, out_dir), world)
    with open(os.path.join(out_dir, "trainer_results.json")) as f:
        return json.load(f)
