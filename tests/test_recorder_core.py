"""Single-process tests of the recorder: sums, buffering/flush, skips, loss-scale undo, resume,
per-group norms, the Trainer callback and the accelerate hook (no extra processes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llm_refine.errors import UserError
from llm_refine.history import read_jsonl
from llm_refine.recorder.backends import LocalBackend, detect_backend, grad_scale_of, sums_of
from llm_refine.recorder.core import GradNormRecorder

# The same tiny model, data and single-process reference loop as the 2-process Trainer tests.
from _recorder_trainer_workers import Reg, ref_norms, reference_run, reg_data  # noqa: E402


def close(a, b, rel=1e-6):
    return abs(a - b) <= rel * max(abs(b), 1e-30)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3, bias=False)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def make_grads(seed=0, model=None):
    torch.manual_seed(seed)
    model = model or Tiny()
    x = torch.randn(6, 5)
    model(x).pow(2).mean().backward()
    return model


def test_sums_of_matches_float64_reference_incl_bf16():
    m = make_grads()
    s = sums_of([p.grad for p in m.parameters()])
    l1, l2 = ref_norms(m.parameters())
    assert s.shape == (2,) and s.dtype == torch.float64
    assert close(s[0].item(), l1) and close(math.sqrt(s[1].item()), l2)
    bf = [p.grad.bfloat16() for p in m.parameters()]
    sb = sums_of(bf)
    assert close(sb[0].item(), l1, 1e-2) and close(math.sqrt(sb[1].item()), l2, 1e-2)
    assert sums_of([]).tolist() == [0.0, 0.0]


def test_recorder_buffers_flushes_and_writes(tmp_path):
    m = Tiny()
    path = tmp_path / "g.jsonl"
    rec = GradNormRecorder(LocalBackend(m), path, flush_every=3, meta={"run": "t"})
    expected = []
    for step in range(5):
        m.zero_grad()
        make_grads(step, m)
        expected.append(ref_norms(m.parameters()))
        rec.capture(step)
    # 3 captures buffered; the 4th capture flushed them lazily; two are pending
    meta, records = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1, 2]
    out = rec.close()
    assert [r["step"] for r in out] == [3, 4]
    meta, records = read_jsonl(path)
    assert meta["engine"] == "single" and meta["run"] == "t" and meta["world_size"] == 1
    assert [r["step"] for r in records] == list(range(5))
    for r, (l1, l2) in zip(records, expected):
        assert close(r["l1"], l1) and close(r["l2"], l2)


def test_mark_skipped_replaces_norms_and_never_duplicates(tmp_path):
    m = make_grads()
    path = tmp_path / "g.jsonl"
    rec = GradNormRecorder(LocalBackend(m), path, flush_every=1)
    rec.capture(0)
    rec.capture(1)  # flushes step 0
    rec.mark_skipped(1, "fp16 overflow")
    rec.capture(2)
    rec.close()
    _, records = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1] == {"step": 1, "skipped": True, "reason": "fp16 overflow"}
    assert "l1" in records[2]


def test_resume_drops_records_past_checkpoint(tmp_path):
    m = make_grads()
    path = tmp_path / "g.jsonl"
    rec = GradNormRecorder(LocalBackend(m), path, flush_every=2)
    for s in range(6):
        rec.capture(s)
    rec.close()
    rec = GradNormRecorder(LocalBackend(m), path, flush_every=2, resume_after_step=3)
    for s in range(4, 7):
        rec.capture(s)
    rec.close()
    _, records = read_jsonl(path)
    assert [r["step"] for r in records] == list(range(7))


def test_per_group_norms_and_norm_subset(tmp_path):
    m = make_grads()
    groups = [list(m.a.parameters()), [m.b.weight, m.scale]]
    rec = GradNormRecorder(LocalBackend(m), tmp_path / "g.jsonl", 10, param_groups=groups, group_names=["a", "rest"])
    rec.capture(0)
    (r,) = rec.flush()
    for name, ps in (("a", groups[0]), ("rest", groups[1])):
        l1, l2 = ref_norms(ps)
        assert close(r["groups"]["l1"][name], l1) and close(r["groups"]["l2"][name], l2)
    assert close(r["l1"], ref_norms(m.parameters())[0])
    rec2 = GradNormRecorder(LocalBackend(m), None, 10, norms=("l2",))
    rec2.capture(0)
    (r2,) = rec2.flush()
    assert set(r2) == {"step", "l2"}
    with pytest.raises(UserError):
        GradNormRecorder(LocalBackend(m), None, 0)
    with pytest.raises(UserError):
        GradNormRecorder(LocalBackend(m), None, 5, norms=("linf",))


def test_grad_scaler_scale_is_undone_and_not_twice():
    torch.manual_seed(0)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(6, 5)
    scaler.scale(m(x).pow(2).mean()).backward()
    backend = LocalBackend(m, scale_fn=lambda: grad_scale_of(scaler, opt))
    s_scaled = backend.local_sums()
    scaler.unscale_(opt)
    l1, l2 = ref_norms(m.parameters())  # true (unscaled) grads now
    assert close(s_scaled[0].item(), l1) and close(math.sqrt(s_scaled[1].item()), l2)
    s_after = backend.local_sums()  # already unscaled: no second division
    assert close(s_after[0].item(), l1)
    assert grad_scale_of(None) is None


def test_detect_backend_single_and_compiled_wrapper():
    m = Tiny()
    assert detect_backend(m).engine == "single"


# ---------------------------------------------------------------------------------------------
# Trainer and accelerate, single process


def sequential_trainer(**kw):
    from transformers import Trainer

    class SeqTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return SeqTrainer(**kw)


@pytest.mark.parametrize("accum,clip", [(1, 0.0), (2, 0.05)])
def test_trainer_callback_single_process(tmp_path, accum, clip):
    from transformers import TrainingArguments

    from llm_refine import GradNormCallback

    data = reg_data()
    torch.manual_seed(0)
    model = Reg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accum,
        max_steps=4, logging_steps=2, report_to="none", use_cpu=True, max_grad_norm=clip,
        save_strategy="no", disable_tqdm=True,
    )
    trainer = sequential_trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched),
                                 callbacks=[GradNormCallback()])
    trainer.train()
    meta, records = read_jsonl(tmp_path / "gradnorms.jsonl")
    ref = reference_run(4, 4, accum, clip, data)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r, (l1, l2) in zip(records, ref):
        assert close(r["l1"], l1, 1e-5) and close(r["l2"], l2, 1e-5)
    if clip:
        assert all(r["l2"] > clip * 2 for r in records)  # pre-clip: clipping really happened
    assert meta["gradient_accumulation_steps"] == accum and meta["max_grad_norm"] == clip
    assert meta["engine"] == "single" and meta["precision"] == "fp32"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        rec = records[h["step"] - 1]
        assert h["grad_l1_norm"] == rec["l1"] and h["grad_l2_norm"] == rec["l2"]
        assert close(h["grad_norm"], rec["l2"], 1e-5)  # the Trainer's own pre-clip norm agrees
    # the wrappers are gone after training
    assert "clip_grad_norm_" not in trainer.accelerator.__dict__ and "log" not in trainer.__dict__


def test_trainer_callback_per_group(tmp_path):
    """per_group=True: norms per optimizer parameter group (the Trainer makes decay / no-decay)."""
    from transformers import TrainingArguments

    from llm_refine import GradNormCallback

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, weight_decay=0.1)
    trainer = sequential_trainer(model=Reg(), args=args, train_dataset=reg_data(),
                                 callbacks=[GradNormCallback(per_group=True)])
    trainer.train()
    _, records = read_jsonl(tmp_path / "gradnorms.jsonl")
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    for r in records:
        g1, g2 = r["groups"]["l1"], r["groups"]["l2"]
        assert set(g1) == {"0", "1"}
        assert close(sum(g1.values()), r["l1"], 1e-9)
        assert close(math.sqrt(sum(v * v for v in g2.values())), r["l2"], 1e-9)


@pytest.mark.parametrize("reuse_norm", [True, False])
def test_accelerate_hook_custom_loop_fp32(tmp_path, reuse_norm):
    from accelerate import Accelerator

    from llm_refine import AccelerateGradNormHook

    data = reg_data()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = Reg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl", flush_every=2, reuse_norm=reuse_norm)
    for i, batch in enumerate(loader):
        if i == 8:
            break
        with accelerator.accumulate(model):
            loss = model(**batch)["loss"]
            accelerator.backward(loss)
            if accelerator.sync_gradients and hook.step % 2 == 1:  # clip on odd steps only
                accelerator.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
    hook.close()
    _, records = read_jsonl(tmp_path / "g.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    # reference: same loop by hand, clip on odd steps
    torch.manual_seed(0)
    m = Reg()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(4):
        for k in range(2):
            rows = data[(2 * step + k) * 4 : (2 * step + k + 1) * 4]
            x = torch.stack([r["x"] for r in rows])
            y = torch.stack([r["labels"] for r in rows])
            (m(x, y)["loss"] / 2).backward()
        l1, l2 = ref_norms(m.parameters())
        assert close(records[step]["l1"], l1, 1e-5) and close(records[step]["l2"], l2, 1e-5)
        if step % 2 == 1:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        o.step()
        o.zero_grad()


def test_accelerate_hook_loss_scaler_undone_and_skipped_step(tmp_path):
    """A GradScaler (as accelerate uses for fp16 on GPU; attached by hand on CPU): recorded norms
    are the unscaled ones, and a step the scaler skips (inf grads) is recorded as skipped."""
    from accelerate import Accelerator

    from llm_refine import AccelerateGradNormHook

    data = reg_data()
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    torch.manual_seed(0)
    model = Reg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl", flush_every=10)
    for i, batch in enumerate(loader):
        if i == 4:
            break
        loss = model(**batch)["loss"]
        if i == 2:
            loss = loss * float("inf")  # overflow: the scaler skips this step
        accelerator.backward(loss)
        if i == 3:
            accelerator.clip_grad_norm_(model.parameters(), 0.05)  # capture happens before unscale+clip
        opt.step()
        opt.zero_grad()
    hook.close()
    meta, records = read_jsonl(tmp_path / "g.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[2]["skipped"] is True and "l1" not in records[2]
    torch.manual_seed(0)
    m = Reg()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(4):
        rows = data[step * 4 : (step + 1) * 4]
        x = torch.stack([r["x"] for r in rows])
        y = torch.stack([r["labels"] for r in rows])
        m(x, y)["loss"].backward()
        if step != 2:
            l1, l2 = ref_norms(m.parameters())
            assert close(records[step]["l1"], l1, 1e-5) and close(records[step]["l2"], l2, 1e-5)
            if step == 3:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
        o.zero_grad()


def test_norm_query_answered_from_recorder_only_for_all_params(tmp_path):
    from accelerate import Accelerator

    from llm_refine import AccelerateGradNormHook

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Reg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    hook = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl", reuse_norm=True)
    batch = reg_data(4)
    x = torch.stack([r["x"] for r in batch])
    y = torch.stack([r["labels"] for r in batch])
    accelerator.backward(model(x, y)["loss"])

    total = accelerator.clip_grad_norm_(model.parameters(), float("inf"))
    assert close(float(total), ref_norms(model.parameters())[1], 1e-6)
    sub = accelerator.clip_grad_norm_(list(model.l1.parameters()), float("inf"))  # a subset: really computed
    assert close(float(sub), ref_norms(model.l1.parameters())[1], 1e-6)
    opt.step()
    hook.close()
    _, records = read_jsonl(tmp_path / "g.jsonl")
    assert [r["step"] for r in records] == [0]


def test_hook_refuses_clipping_it_cannot_see(tmp_path):
    """If the loop says it clips but never calls accelerator.clip_grad_norm_, the grads at
    optimizer.step are post-clip: refuse rather than record them."""
    from accelerate import Accelerator

    from llm_refine import AccelerateGradNormHook

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(Reg())
    opt = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    hook = AccelerateGradNormHook(accelerator, model, opt, None, expect_clip_call=True)
    batch = reg_data(4)
    x = torch.stack([r["x"] for r in batch])
    y = torch.stack([r["labels"] for r in batch])
    accelerator.backward(model(x, y)["loss"])
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # behind the recorder's back
    with pytest.raises(UserError, match="clip"):
        opt.step()
    hook.close()


def test_hook_refuses_launch_accelerate_does_not_see(tmp_path, monkeypatch):
    """torchrun started 2 processes but accelerate runs as 1 (on CPU without cpu=True / use_cpu):
    the gradients are never reduced, so the recorder refuses instead of writing per-rank norms."""
    from accelerate import Accelerator

    from llm_refine import AccelerateGradNormHook

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(Reg())
    opt = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="use_cpu=True"):
        AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl")


def test_trainer_callback_bf16_close_to_fp32_reference(tmp_path):
    from transformers import TrainingArguments

    from llm_refine import GradNormCallback

    data = reg_data()
    torch.manual_seed(0)
    model = Reg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             logging_steps=1, report_to="none", use_cpu=True, bf16=True, max_grad_norm=0.0,
                             save_strategy="no", disable_tqdm=True)
    trainer = sequential_trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched),
                                 callbacks=[GradNormCallback()])
    trainer.train()
    meta, records = read_jsonl(tmp_path / "gradnorms.jsonl")
    assert meta["precision"] == "bf16"
    ref = reference_run(3, 4, 1, 0.0, data)
    for r, (l1, l2) in zip(records, ref):
        assert close(r["l1"], l1, 1e-2) and close(r["l2"], l2, 1e-2)


def test_comm_device_is_unchanged_for_gloo_and_device_tensors():
    """Host sums move to the GPU only for an NCCL group (exercised on GPU machines); with gloo
    (here, a 1-rank group) they stay where they are."""
    import os

    import torch.distributed as dist

    from llm_refine.recorder.backends import on_comm_device

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = torch.ones(2, dtype=torch.float64)
        assert on_comm_device(t, None) is t
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Structure: the backend contract, no import cycle, the engine helpers for training scripts


def test_backends_import_without_deepspeed_and_without_cycle():
    """Importing the recorder (hook, callback, detect_backend) never imports the DeepSpeed backend;
    each backend module imports only ``base`` (the DeepSpeed one is imported by ``detect`` only)."""
    import subprocess
    import sys

    code = (
        "import sys, llm_refine.recorder.callback, llm_refine.recorder.accelerate_hook;"
        "from llm_refine.recorder.backends import detect_backend;"
        "assert 'llm_refine.recorder.backends.deepspeed' not in sys.modules;"
        "assert 'deepspeed' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "llm_refine" / "recorder" / "backends"
    for name in ("base", "local", "fsdp", "deepspeed"):
        src = (pkg / f"{name}.py").read_text()
        siblings = {s for s in ("base", "local", "fsdp", "deepspeed", "detect") if f"from .{s} import" in src}
        assert siblings <= {"base"} - {name}, (name, siblings)


def test_backend_contract_is_public_and_complete():
    from llm_refine.recorder.backends import NormBackend, ParamGradBackend

    backend = detect_backend(Reg())
    assert isinstance(backend, ParamGradBackend) and isinstance(backend, NormBackend)
    assert backend.install_step_hook(lambda: None) is None and backend.clips_itself is False
    assert [id(p) for p in backend.parameters()] == [id(p) for p in backend.module.parameters()]
    t = torch.ones(2, dtype=torch.float64)
    assert backend.reduce(t) is t and backend.to_comm_device(t) is t  # replicated: no reduce
    with pytest.raises(TypeError):
        NormBackend()  # abstract: local_sums and device are what every engine must implement


def test_engine_info_and_release_engine():
    from types import SimpleNamespace

    from llm_refine.recorder import engine_info, release_engine

    class Engine:
        destroyed = 0

        def zero_optimization_stage(self):
            return 2

        def destroy(self):
            Engine.destroyed += 1

    acc = SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", num_processes=2, device="cpu",
                          mixed_precision="bf16")
    trainer = SimpleNamespace(accelerator=acc, model_wrapped=Engine())
    assert engine_info(trainer) == {"distributed_type": "DEEPSPEED", "world_size": 2, "device": "cpu",
                                    "mixed_precision": "bf16", "zero_stage": 2, "model_class": "Engine"}
    release_engine(trainer)
    assert Engine.destroyed == 1
    release_engine(SimpleNamespace(model_wrapped=Reg()))  # nothing to release: no error


def test_trainer_bit_identical_with_and_without_callback_single_process(tmp_path):
    """The observer must not change the run: the same 10 clipped steps (accumulation 2) without and
    with GradNormCallback give bit-identical losses and parameters; the opt-in reuse_norm=True
    (the Trainer's clip answered from the recorder's sums) is the documented exception."""
    from _recorder_trainer_workers import identity_case

    r = identity_case(str(tmp_path), steps=10, accum=2, clip=0.05)
    assert r["facts"]["distributed_type"].endswith("NO") and r["facts"]["wrapped_is_model"]
    assert r["facts"]["num_processes"] == 1 and not r["facts"]["is_ddp"]
    assert r["n_losses"] == 20 and r["recorded_steps"] == list(range(10))
    assert r["with_losses_equal"] and r["with_params_equal"] and r["with_max_loss_diff"] == 0.0
    # the probe sees the difference the opt-in path makes, so the equality above is not vacuous
    assert not r["reuse_params_equal"]


def test_header_precision_is_what_ran_under_accelerate_config(tmp_path, monkeypatch):
    """``accelerate launch`` with ``mixed_precision: bf16`` in its config sets
    ACCELERATE_MIXED_PRECISION; the Trainer's args.bf16 stays False, yet bf16 autocast runs. The
    header must say bf16 (it said fp32)."""
    from transformers import TrainingArguments

    from llm_refine import GradNormCallback

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, max_grad_norm=0.0)
    assert not args.bf16
    trainer = sequential_trainer(model=Reg(), args=args, train_dataset=reg_data(), callbacks=[GradNormCallback()])
    assert trainer.accelerator.mixed_precision == "bf16"  # what really runs
    trainer.train()
    meta, _ = read_jsonl(tmp_path / "gradnorms.jsonl")
    assert meta["precision"] == "bf16" and meta["param_dtype"] == "float32"


def test_header_precision_of_a_bf16_model_without_autocast(tmp_path):
    from transformers import TrainingArguments

    from llm_refine import GradNormCallback

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, max_grad_norm=0.0)
    data = [{"x": r["x"].bfloat16(), "labels": r["labels"].bfloat16()} for r in reg_data()]
    trainer = sequential_trainer(model=Reg().bfloat16(), args=args, train_dataset=data, callbacks=[GradNormCallback()])
    trainer.train()
    meta, _ = read_jsonl(tmp_path / "gradnorms.jsonl")
    assert meta["precision"] == "bf16" and meta["param_dtype"] == "bfloat16"


# The fp32 bound (docs/recorder.md, "Precision"): recorded ℓ2 vs a float64 reference.
FP32_L2_BOUND = 5e-6  # measured ≤ 7.7e-7 (cpu-0.5m / cpu-2m, 8 seeds), ≤ 1.9e-6 (cpu-8m, 3 seeds)
FP32_L1_BOUND = 5e-7  # measured ≤ 6.4e-8


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fp32_precision_bound_against_float64(seed):
    """fp32 gradients of a cpu-0.5m-shaped Llama (463K parameters) vs the same model and batch in
    float64: the recorded ℓ2 is within FP32_L2_BOUND, and no worse than torch's own fp32 total
    norm (the error is the float32 per-tensor norm kernel, the same one torch's clip uses)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1000 + seed))
    m64 = copy.deepcopy(model).double()
    model(input_ids=ids, labels=ids).loss.backward()
    m64(input_ids=ids, labels=ids).loss.backward()
    ref = torch.cat([p.grad.reshape(-1) for p in m64.parameters()])
    ref_l1, ref_l2 = ref.abs().sum().item(), ref.norm().item()
    sums = detect_backend(model).local_sums()
    l1, l2 = sums[0].item(), sums[1].sqrt().item()
    torch_l2 = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    err_l2, err_torch = abs(l2 - ref_l2) / ref_l2, abs(torch_l2 - ref_l2) / ref_l2
    assert abs(l1 - ref_l1) / ref_l1 < FP32_L1_BOUND
    assert err_l2 < FP32_L2_BOUND
    assert err_l2 <= err_torch + 1e-7, (err_l2, err_torch)
