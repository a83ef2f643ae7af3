"""Overhead of the DeepSpeed recorder (a benchmark, not a test): ``python tests/_ds_bench.py``.

2 CPU processes (gloo), a small Llama, fp32, ZeRO-2 and ZeRO-3. For each stage one engine trains
in alternating blocks without and with the recorder (``install_step_hook`` + ``GradNormRecorder``,
flush every 50 steps), so drift from other load on the machine hits both alike. Reported per
stage: median step time without / with, the time spent inside the hook itself (the capture:
local sums; the all-reduce of the buffered sums happens once per flush),
and the local sums alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from _ds_common import init_dist, setup_worker_env, spawn, teardown_dist  # noqa: E402

MICRO, SEQ, VOCAB = 4, 64, 512
BLOCKS, STEPS_PER_BLOCK, WARMUP = 4, 10, 3


def model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def bench_stage(stage: int, rank: int, world: int, out_dir: str) -> dict:
    import deepspeed
    import torch

    from llm_refine.recorder.core import GradNormRecorder
    from llm_refine.recorder.backends import detect_backend

    m = model()
    n_params = sum(p.numel() for p in m.parameters())
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-4), config=config)
    g = torch.Generator().manual_seed(rank)
    # As the Trainer callback / accelerate hook do for DeepSpeed: one all-reduce per flush.
    recorder = GradNormRecorder(detect_backend(engine), os.path.join(out_dir, f"z{stage}.jsonl"), flush_every=50,
                                reduce_at_flush=True)
    hook_times: list[float] = []
    sums_times: list[float] = []

    def before():
        t = time.perf_counter()
        recorder.capture(engine.global_steps)
        hook_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        recorder.backend.local_sums()  # again, alone: the part that is not the all-reduce
        sums_times.append(time.perf_counter() - t)

    def step():
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    for _ in range(WARMUP):
        step()
    times = {"off": [], "on": []}
    for block in range(BLOCKS):
        for mode in ("off", "on"):
            handle = recorder.backend.install_step_hook(before) if mode == "on" else None
            for _ in range(STEPS_PER_BLOCK):
                t = time.perf_counter()
                step()
                # the second local_sums() call is bookkeeping of this benchmark, not recorder cost
                extra = sums_times[-1] if mode == "on" else 0.0
                times[mode].append(time.perf_counter() - t - extra)
            if handle is not None:
                handle.remove()
    t = time.perf_counter()
    recorder.close()
    flush_s = time.perf_counter() - t
    engine.destroy()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "zero_stage": stage, "parameters": n_params, "steps_each": BLOCKS * STEPS_PER_BLOCK,
        "median_step_ms_without": round(1e3 * off, 2), "median_step_ms_with": round(1e3 * on, 2),
        "median_hook_ms": round(1e3 * statistics.median(hook_times), 3),
        "median_local_sums_ms": round(1e3 * statistics.median(sums_times), 3),
        "hook_share_of_step": round(statistics.median(hook_times) / off, 5),
        "final_flush_ms": round(1e3 * flush_s, 2),
    }


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    setup_worker_env(rank, world, port)
    init_dist()
    results = [bench_stage(stage, rank, world, out_dir) for stage in (2, 3)]
    if rank == 0:
        for r in results:
            print(json.dumps(r), flush=True)
    teardown_dist()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        spawn(worker, (2, d), 2)
