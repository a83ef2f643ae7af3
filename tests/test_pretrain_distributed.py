"""Pretraining under torchrun on CPU: 2-process DDP and DeepSpeed ZeRO-2 through the Trainer.

Each run is checked for what it claims to be (the Trainer's accelerator really ran 2-process
MULTI_CPU DDP / a DeepSpeed engine at ZeRO stage 2, and the history says the same), for the files,
a finite loss that goes down, one history record per optimizer step, and — for DDP — for the same
global batches as a single process (equal step-0 loss and gradient norm).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from _pretrain_common import REPO, history_records, read_jsonl, tiny_overrides
from llm_refine.train.pretrain import load_pretrain_config, run_pretrain

pytestmark = pytest.mark.distributed
STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *overrides: str, env_extra: dict | None = None, timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "_pretrain_launch.py"), str(REPO / "recipes" / "pretrain_tiny.yaml"),
           "--set", *tiny_overrides(out, *overrides, steps=STEPS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "summary.json").read_text())


def _check_run(out, summary):
    for name in ("run_config.json", "gradnorms.jsonl", "train_log.jsonl", "eval_log.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / f"checkpoint-{STEPS}").is_dir()
    train = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in train] == list(range(STEPS))
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses) and math.isfinite(summary["final_val_loss"])
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    hist = history_records(out / "gradnorms.jsonl")
    assert [r["step"] for r in hist] == list(range(STEPS))
    assert all(math.isfinite(r["l2"]) and r["l1"] > r["l2"] > 0 for r in hist)
    runtime = json.loads((out / "run_config.json").read_text())["runtime"]
    assert runtime["world_size"] == 2 and runtime["micro_batch_size"] == 4
    assert summary["tokens_seen"] == STEPS * 8 * 128
    return train, hist, json.loads((out / "gradnorms.jsonl").read_text().splitlines()[0])["meta"]


def test_ddp_two_processes_matches_single_process(tmp_path):
    summary = _torchrun(tmp_path / "ddp")
    train, hist, meta = _check_run(tmp_path / "ddp", summary)
    assert summary["engine"]["distributed_type"] == "MULTI_CPU" and summary["engine"]["world_size"] == 2
    assert summary["engine"]["model_class"] == "DistributedDataParallel"
    assert meta["engine"] == "ddp" and meta["world_size"] == 2

    # The same global batch per step as one process: step 0 (same init, no update yet) agrees to
    # fp32 rounding, and the next steps stay close.
    single = load_pretrain_config(None, tiny_overrides(tmp_path / "single", steps=STEPS))
    run_pretrain(single)
    s_train = read_jsonl(tmp_path / "single" / "train_log.jsonl")
    s_hist = history_records(tmp_path / "single" / "gradnorms.jsonl")
    assert train[0]["loss"] == pytest.approx(s_train[0]["loss"], rel=1e-5)
    assert hist[0]["l2"] == pytest.approx(s_hist[0]["l2"], rel=1e-4)
    assert hist[0]["l1"] == pytest.approx(s_hist[0]["l1"], rel=1e-4)
    assert [r["loss"] for r in train[:5]] == pytest.approx([r["loss"] for r in s_train[:5]], rel=1e-3)
    assert [r["lr"] for r in train] == pytest.approx([r["lr"] for r in s_train], rel=1e-12)


def test_deepspeed_zero2_through_the_trainer(tmp_path):
    ds = tmp_path / "ds_zero2.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }))
    out = tmp_path / "zero2"
    summary = _torchrun(out, f"train.deepspeed={ds}", env_extra={"DS_ACCELERATOR": "cpu"}, timeout=300)
    train, hist, meta = _check_run(out, summary)
    eng = summary["engine"]
    assert eng["distributed_type"] == "DEEPSPEED" and eng["world_size"] == 2
    assert eng["zero_stage"] == 2 and eng["model_class"] == "DeepSpeedEngine"
    assert meta["engine"] == "deepspeed" and meta["world_size"] == 2 and meta["zero_stage"] == 2


def test_accelerate_launch_with_a_launch_config(tmp_path):
    """The recipe under ``accelerate launch --config_file launch/single_cpu.yaml``."""
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "single_cpu.yaml"),
           str(REPO / "recipes" / "pretrain.py"), str(REPO / "recipes" / "pretrain_tiny.yaml"),
           "--set", *tiny_overrides(out, "train.eval_every=4", steps=4)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["engine"]["distributed_type"] == "NO"
    assert [r["step"] for r in history_records(out / "gradnorms.jsonl")] == [0, 1, 2, 3]
