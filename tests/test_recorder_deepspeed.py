"""DeepSpeed backend of the gradient-norm recorder.

Distributed tests (CPU, ``DS_ACCELERATOR=cpu``, gloo, 2 processes) run many engine configurations
inside ONE ``torch.multiprocessing.spawn`` (starting processes and importing deepspeed is the
expensive part) and compare, for every optimizer step, the recorded ℓ1/ℓ2 with a single-process
float64 reference computed on the same global batch at the same parameters. Each case also
asserts the ZeRO stage and the gradient layout the backend picked, since frameworks downgrade
silently. DeepSpeed's shared-memory comm op is not compiled (see ``_ds_common.skip_shm_comm_build``).
"""

from __future__ import annotations

import importlib.util
import math

import pytest

import _ds_engines
from _ds_engines import Case
from llm_refine.errors import UserError
from llm_refine.recorder.backends import deepspeed as dsrec

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")

FP32_TOL = 1e-6  # relative, fp32 engine vs float64 reference
LOW_TOL = 1e-2  # relative, bf16/fp16 engine vs float64 reference at the same (rounded) parameters


# ---------------------------------------------------------------------------------------------
# Pure pieces (no processes)


def test_zero3_trim_formula():
    # 7 elements in pieces of 4 over 2 ranks: rank 0 holds 4 real, rank 1 holds 3 + 1 padding
    assert dsrec.zero3_real_elements(4, 7, 0) == 4
    assert dsrec.zero3_real_elements(4, 7, 1) == 3
    # 3 elements over 4 ranks (pieces of 1): ranks 3 has only padding
    assert [dsrec.zero3_real_elements(1, 3, r) for r in range(4)] == [1, 1, 1, 0]
    assert dsrec.zero3_real_elements(5, 5, 1) == 0


class _FakeEngine:
    """Just enough of a DeepSpeedEngine for the hook: engine.step() -> _take_model_step()."""

    def __init__(self):
        self.calls = []
        self.overflow = False
        self._step_applied = False

    def _take_model_step(self, lr_kwargs=None):
        self.calls.append("step")
        self._step_applied = not self.overflow

    def step(self):
        self._step_applied = False
        self._take_model_step(None)


def test_step_hook_order_skip_and_remove():
    engine = _FakeEngine()
    handle = dsrec.install_step_hook(
        engine, lambda: engine.calls.append("before"), lambda skipped: engine.calls.append(("after", skipped))
    )
    engine.step()
    engine.overflow = True
    engine.step()
    assert engine.calls == ["before", "step", ("after", False), "before", "step", ("after", True)]
    handle.remove()
    handle.remove()  # idempotent
    engine.calls.clear()
    engine.step()
    assert engine.calls == ["step"]
    assert "_take_model_step" not in engine.__dict__


def test_step_hooks_stack_and_remove_out_of_order():
    engine = _FakeEngine()
    h1 = dsrec.install_step_hook(engine, lambda: engine.calls.append("a"))
    h2 = dsrec.install_step_hook(engine, lambda: engine.calls.append("b"))
    engine.step()
    assert engine.calls == ["b", "a", "step"]
    h1.remove()  # not the outermost: becomes a pass-through
    engine.calls.clear()
    engine.step()
    assert engine.calls == ["b", "step"]
    h2.remove()
    engine.calls.clear()
    engine.step()
    assert engine.calls == ["step"]


class _Opt:
    def __init__(self, engine):
        self.engine, self.overflow = engine, False

    def step(self):
        self.engine.calls.append("opt.step")


class _OldEngine:
    """A DeepSpeed engine without _take_model_step: the hook falls back to optimizer.step."""

    def __init__(self, stage=0, clip=0.0, half=False):
        self.calls, self.stage, self.clip, self.half = [], stage, clip, half
        self.optimizer = _Opt(self)

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return self.half

    def bfloat16_enabled(self):
        return False

    def gradient_clipping(self):
        return self.clip


def test_step_hook_fallback_and_its_refusal():
    engine = _OldEngine(stage=2, clip=1.0)
    seen = []
    handle = dsrec.install_step_hook(engine, lambda: engine.calls.append("before"), seen.append)
    engine.optimizer.overflow = True
    engine.optimizer.step()
    assert engine.calls == ["before", "opt.step"] and seen == [True]
    handle.remove()
    assert "step" not in engine.optimizer.__dict__
    # ZeRO-0 fp32 clips in the engine before optimizer.step: the fallback would be post-clip
    with pytest.raises(UserError, match="post-clip"):
        dsrec.install_step_hook(_OldEngine(stage=0, clip=1.0), lambda: None)


class _Mpu:
    def get_model_parallel_world_size(self):
        return 2


class _UnsupportedEngine:
    def __init__(self, **attrs):
        self.mpu = None
        self.has_moe_layers = False
        self.optimizer = None
        self.__dict__.update(attrs)

    def zero_cpu_offload(self):
        return False

    def zero_partial_offload(self):
        return 1.0


@pytest.mark.parametrize(
    "attrs, what",
    [
        ({"mpu": _Mpu()}, "tensor/model parallelism"),
        ({"has_moe_layers": True}, "mixture-of-experts"),
        ({"sequence_parallel_size": 2}, "sequence parallelism"),
        ({"pipeline_parallelism": True}, "pipeline parallelism"),
    ],
)
def test_unsupported_setups_raise_user_error(attrs, what):
    with pytest.raises(UserError, match=what):
        dsrec.DeepSpeedBackend(_UnsupportedEngine(**attrs))


def test_per_group_norms_are_refused_not_faked():
    """DeepSpeed has no per-parameter gradients: its backend implements the base contract only
    (no group_sums / local_grads that would raise), and the recorder refuses per-group norms."""
    from llm_refine.recorder.backends import NormBackend, ParamGradBackend
    from llm_refine.recorder.core import GradNormRecorder

    assert issubclass(dsrec.DeepSpeedBackend, NormBackend)
    assert not issubclass(dsrec.DeepSpeedBackend, ParamGradBackend)
    assert not hasattr(dsrec.DeepSpeedBackend, "group_sums") and not hasattr(dsrec.DeepSpeedBackend, "local_grads")
    backend = object.__new__(dsrec.DeepSpeedBackend)  # the refusal needs no engine
    with pytest.raises(UserError, match="per-group norms are not supported by the deepspeed backend"):
        GradNormRecorder(backend, None, param_groups=[[]])


# ---------------------------------------------------------------------------------------------
# Raw DeepSpeed engines: ZeRO-0/1/2/3 x fp32/bf16/fp16 x offload x accumulation x clipping


CASES = [
    Case("z0_fp32_acc2_clip", 0, gas=2, clip=0.01, layout="params"),
    Case("z0_bf16", 0, "bf16", layout="lp_params"),
    Case("z0_fp16_clip", 0, "fp16", clip=0.01, layout="lp_params"),
    Case("z1_fp32_clip", 1, clip=0.01, layout="zero12"),
    Case("z1_bf16", 1, "bf16", layout="zero12"),
    Case("z1_bf16_fp32accum", 1, "bf16", bf16_fp32_accum=True, layout="bf16_opt"),
    Case("z1_fp32_offload", 1, offload=True, layout="zero12_off"),
    Case("z2_fp32_acc2", 2, gas=2, layout="zero12"),
    Case("z2_bf16_clip", 2, "bf16", clip=0.01, layout="zero12"),
    Case("z2_fp32_offload_acc2_clip", 2, offload=True, gas=2, clip=0.01, layout="zero12_off"),
    Case("z2_bf16_offload", 2, "bf16", offload=True, layout="zero12_off"),
    Case("z2_fp16_overflow", 2, "fp16", inf_at_step=1, steps=4, layout="zero12"),
    Case("z2_fp32_lossscale", 2, force_scale=1024.0, layout="zero12"),
    Case("z3_fp32_clip", 3, clip=0.01, layout="zero3"),
    Case("z3_bf16_acc2", 3, "bf16", gas=2, layout="zero3"),
    Case("z3_fp32_offload_acc2_clip", 3, offload=True, gas=2, clip=0.01, layout="zero3_off"),
    Case("z3_bf16_offload", 3, "bf16", offload=True, layout="zero3_off"),
    Case("z3_fp16_acc2", 3, "fp16", gas=2, layout="zero3"),
    Case("z3_fp32_lossscale", 3, force_scale=1024.0, layout="zero3"),
    Case("z3_bf16_overflow", 3, "bf16", inf_at_step=1, layout="zero3"),
]
CASE_BY_NAME = {c.name: c for c in CASES}


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    results = _ds_engines.main(str(tmp_path_factory.mktemp("ds_engines")), CASES)
    return {r["name"]: r for r in results}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


@needs_deepspeed
@pytest.mark.distributed
def test_fp16_is_refused_by_deepspeed_on_this_cpu_so_tests_override_the_check(engine_runs):
    probe = engine_runs["fp16_probe"]
    assert probe["accelerator"] == "cpu"
    if probe["native"]:
        pytest.skip("this CPU has oneDNN fp16: DeepSpeed runs fp16 without the override")
    assert "fp16 is not supported" in (probe["initialize_error"] or "")


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASE_BY_NAME))
def test_engine_norms_match_single_process_reference(engine_runs, name):
    case, r = CASE_BY_NAME[name], engine_runs[name]
    assert "error" not in r, r.get("error")
    # the engine really is what the case claims (DeepSpeed would not say otherwise)
    assert r["stage"] == case.stage
    assert r["layout"] == case.layout
    assert r["backend_class"] == "DeepSpeedBackend"  # detect_backend chose it
    meta = r["meta"]
    assert meta["zero_stage"] == case.stage and meta["world_size"] == 2 and meta["dtype"] == case.dtype
    assert meta["offload_optimizer"] == ("cpu" if case.offload else "none")
    assert meta["gradient_accumulation_steps"] == case.gas and meta["gradient_clipping"] == case.clip
    # one capture per optimizer step (not per micro-batch), skips reported where the engine skipped
    assert r["global_steps"] == case.steps and r["before_calls"] == case.steps
    assert r["before_steps"] == list(range(case.steps))
    assert r["skipped"] == [s == case.inf_at_step for s in range(case.steps)]
    assert r["hook_removed"]
    records = r["records"]
    assert [rec["step"] for rec in records] == list(range(case.steps))
    tol = FP32_TOL if case.dtype == "fp32" else LOW_TOL
    for step, (rec, ref, ds_norm) in enumerate(zip(records, r["refs"], r["ds_norms"])):
        if step == case.inf_at_step:
            assert rec == {"step": step, "skipped": True, "reason": "overflow"}
            continue
        assert set(rec) == {"step", "l1", "l2"}
        assert _rel(rec["l1"], ref[0]) <= tol, (step, rec, ref)
        assert _rel(rec["l2"], ref[1]) <= tol, (step, rec, ref)
        if ds_norm is not None and math.isfinite(ds_norm):
            # DeepSpeed's own pre-clip ℓ2 of the same gradient: a cross-check, not the source
            assert _rel(rec["l2"], ds_norm) <= (1e-6 if case.dtype == "fp32" else 1e-3), (step, rec, ds_norm)
        if case.clip:
            assert ref[1] > 10 * case.clip  # clipping was active, yet the pre-clip norm is recorded
    if case.force_scale:
        assert r["scales"] == [case.force_scale] * case.steps
    elif case.dtype == "fp16" and case.stage > 0:
        assert min(r["scales"]) > 1.0  # dynamic loss scale really was on the grads, and undone
    else:
        assert r["scales"] == [1.0] * case.steps


# ---------------------------------------------------------------------------------------------
# HF Trainer + DeepSpeed with GradNormCallback


TRAINER_RUNS = [
    {"name": "trainer_zero2_acc2_clip", "kw": {"stage": 2, "gas": 2, "clip": 1e-3, "steps": 3}},
    {"name": "trainer_zero3", "kw": {"stage": 3, "gas": 1, "clip": 0.0, "steps": 3}},
    {"name": "accelerate_zero3_acc2_clip", "kind": "accelerate", "kw": {"stage": 3, "gas": 2, "clip": 1e-3, "steps": 3}},
    # crash after the 3rd optimizer step (checkpoint-2 exists), then resume from checkpoint-2
    {"name": "crash", "kw": {"stage": 2, "gas": 1, "clip": 0.0, "steps": 5, "run_dir": "resume", "save_steps": 2, "crash_at": 3}},
    {"name": "resume", "kw": {"stage": 2, "gas": 1, "clip": 0.0, "steps": 5, "run_dir": "resume", "save_steps": 2, "resume_from": "checkpoint-2"}},
    # the same ZeRO-2 run (accumulation 2, clipping active) without and with the recorder
    {"name": "id_without", "kw": {"stage": 2, "gas": 2, "clip": 1e-3, "steps": 4, "run_dir": "id_without", "recorder": False}},
    {"name": "id_with", "kw": {"stage": 2, "gas": 2, "clip": 1e-3, "steps": 4, "run_dir": "id_with"}},
]
TRAINER_BY_NAME = {r["name"]: r for r in TRAINER_RUNS}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    import _ds_trainer

    results = _ds_trainer.main(str(tmp_path_factory.mktemp("ds_trainer")), TRAINER_RUNS)
    return {r["name"]: r for r in results}


def _check_engine_run(r, kw):
    assert "error" not in r, r.get("error")
    assert r["is_engine"] and r["stage"] == kw["stage"]
    assert r["distributed_type"].endswith("DEEPSPEED") and r["num_processes"] == 2


def _check_against_refs(records, refs):
    for rec in records:
        ref = refs[str(rec["step"])]
        assert _rel(rec["l1"], ref[0]) <= FP32_TOL, (rec, ref)
        assert _rel(rec["l2"], ref[1]) <= FP32_TOL, (rec, ref)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["trainer_zero2_acc2_clip", "trainer_zero3"])
def test_trainer_with_deepspeed_records_every_optimizer_step(trainer_runs, name):
    from llm_refine.history import read_jsonl

    r, kw = trainer_runs[name], TRAINER_BY_NAME[name]["kw"]
    _check_engine_run(r, kw)
    assert r["engine_gas"] == kw["gas"] and r["engine_clip"] == kw["clip"]
    assert r["global_step"] == kw["steps"] and not r["crashed"]
    meta, records = read_jsonl(r["history_path"])
    assert meta["engine"] == "deepspeed" and meta["zero_stage"] == kw["stage"]
    assert [rec["step"] for rec in records] == list(range(kw["steps"]))  # one per optimizer step
    _check_against_refs(records, r["refs"])
    logs = [h for h in r["log_history"] if "loss" in h]
    assert len(logs) == kw["steps"]
    for rec, log in zip(records, logs):
        assert log["grad_l1_norm"] == rec["l1"] and log["grad_l2_norm"] == rec["l2"]
        assert _rel(rec["l2"], float(log["grad_norm"])) <= 1e-6  # the Trainer's (DeepSpeed's) pre-clip ℓ2
        if kw["clip"]:
            assert r["refs"][str(rec["step"])][1] > 100 * kw["clip"]  # clipped, yet pre-clip recorded


@needs_deepspeed
@pytest.mark.distributed
def test_accelerate_loop_with_deepspeed(trainer_runs):
    r, kw = trainer_runs["accelerate_zero3_acc2_clip"], TRAINER_BY_NAME["accelerate_zero3_acc2_clip"]["kw"]
    _check_engine_run(r, kw)
    assert r["global_step"] == kw["steps"]
    assert [rec["step"] for rec in r["records"]] == list(range(kw["steps"]))
    _check_against_refs(r["records"], r["refs"])
    assert min(ref[1] for ref in r["refs"].values()) > 100 * kw["clip"]


@needs_deepspeed
@pytest.mark.distributed
def test_trainer_deepspeed_resume_keeps_history_without_gap_or_duplicate(trainer_runs):
    crash, resume = trainer_runs["crash"], trainer_runs["resume"]
    _check_engine_run(crash, TRAINER_BY_NAME["crash"]["kw"])
    _check_engine_run(resume, TRAINER_BY_NAME["resume"]["kw"])
    assert crash["crashed"] and crash["global_step"] == 3
    assert [rec["step"] for rec in crash["records"]] == [0, 1, 2]  # flushed before the crash
    assert not resume["crashed"] and resume["global_step"] == 5
    # checkpoint-2 is global step 2: step 2 is recorded again (once), 3 and 4 follow
    assert [rec["step"] for rec in resume["records"]] == [0, 1, 2, 3, 4]
    assert resume["records"][:2] == crash["records"][:2]
    assert sorted(resume["refs"]) == ["2", "3", "4"]
    _check_against_refs(resume["records"][2:], resume["refs"])
    _check_against_refs(crash["records"], crash["refs"])


@needs_deepspeed
@pytest.mark.distributed
def test_trainer_deepspeed_bit_identical_with_and_without_the_recorder(trainer_runs):
    """The observer must not change the run: with DeepSpeed the recorder only reads the gradients
    inside the engine's model step, so every micro-batch loss and the final parameters are the
    same bits with and without GradNormCallback (ZeRO-2, accumulation 2, clipping active)."""
    without, with_ = trainer_runs["id_without"], trainer_runs["id_with"]
    _check_engine_run(without, TRAINER_BY_NAME["id_without"]["kw"])
    _check_engine_run(with_, TRAINER_BY_NAME["id_with"]["kw"])
    assert len(without["losses"]) == 4 * 2 and with_["losses"] == without["losses"]
    assert with_["params_sha256"] == without["params_sha256"]
    assert [rec["step"] for rec in with_["records"]] == [0, 1, 2, 3] and without["records"] == []
    assert min(ref[1] for ref in with_["refs"].values()) > 100 * 1e-3  # clipping was active
