"""Trackers through the Trainer's own ``report_to``: a pretraining run writes TensorBoard events
with the recorder's norms, the loss and the LR, read back with TensorBoard's own reader."""

from __future__ import annotations

import json

import pytest

from _pretrain_common import history_records, tiny_overrides
from llm_refine.train.config import load_pretrain_config
from llm_refine.train.pretrain import run_pretrain

STEPS = 6


def test_tensorboard_events_carry_norms_loss_and_lr(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_pretrain_config(None, tiny_overrides(out, "train.report_to=tensorboard", steps=STEPS))
    run_pretrain(cfg)
    # transformers 5 writes under <output_dir>/runs/<date>_<host> (TENSORBOARD_LOGGING_DIR moves it).
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/grad_l1_norm", "train/grad_l2_norm", "train/loss", "train/learning_rate"):
        assert tag in tags, sorted(tags)
    l1 = {e.step: e.value for e in acc.Scalars("train/grad_l1_norm")}
    hist = {r["step"]: r for r in history_records(out / "gradnorms.jsonl")}
    # TensorBoard step s is the Trainer's global_step after optimizer step s-1 (history step s-1).
    assert sorted(l1) == list(range(1, STEPS + 1))
    for s, v in l1.items():
        assert v == pytest.approx(hist[s - 1]["l1"], rel=1e-6)
    lr = {e.step: e.value for e in acc.Scalars("train/learning_rate")}
    logged = {r["step"]: r["lr"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}
    assert all(lr[s] == pytest.approx(logged[s - 1], rel=1e-6) for s in lr)
