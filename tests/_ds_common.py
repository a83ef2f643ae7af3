"""Shared pieces of the DeepSpeed recorder tests (imported inside spawned worker processes).

Kept free of deepspeed/transformers imports at module level: the parent pytest process imports it
only to read the case list.
"""

from __future__ import annotations

import math
import os
import socket
import traceback


def free_port() -> int:
    """A free TCP port for the rendezvous, chosen BELOW the kernel's ephemeral range.

    A port from ``bind(("", 0))`` comes from the ephemeral range (32768-60999 here), which every
    outgoing connection also draws from: other sessions' gloo meshes open many such connections,
    and one of them can take the port in the seconds between this probe and rank 0's TCPStore
    bind. A random port from 20000-32000 (that is free now) avoids that race.
    """
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything taken: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args: tuple, world: int) -> None:
    """``torch.multiprocessing.spawn`` with a fresh rendezvous port as ``args[1]``; retried once
    when (and only when) the port was taken by someone else before rank 0 could bind it."""
    import torch.multiprocessing as mp

    for attempt in range(2):
        try:
            mp.spawn(fn, args=(args[0], free_port(), *args[1:]), nprocs=world, join=True)
            return
        except Exception as e:  # ProcessRaisedException carries the child's traceback text
            if attempt == 0 and "address already in use" in str(e).lower():
                continue
            raise


def setup_worker_env(rank: int, world: int, port: int) -> None:
    """Environment of one CPU DeepSpeed rank; must run before deepspeed is imported."""
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
    )
    import torch

    torch.set_num_threads(1)


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory all-reduce op (35-75 s of g++).

    deepspeed 0.19.8, ``comm/torch.py``: ``TorchBackend.__init__`` calls ``build_shm_op()``, which
    returns None (and the backend falls back to torch.distributed for ``inference_all_reduce``, the
    only user of the op) when ``deepspeed.ops.__compatible_ops__[builder.NAME]`` is False. That dict
    is computed once per process and cached in the module, "so edits to it persist"
    (``deepspeed/ops/__init__.py``). Training collectives never use the op.
    """
    import deepspeed.ops

    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_dist() -> None:
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    skip_shm_comm_build()
    # A rank that fails while its peer waits in a collective should end the test, not hang it.
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=180))
    assert dist.get_backend() == "gloo" and dist.get_world_size() == int(os.environ["WORLD_SIZE"])


def teardown_dist() -> None:
    """Destroy the process group, then leave the worker with ``os._exit(0)``.

    Even after ``engine.destroy()`` and ``destroy_process_group()``, a spawned DeepSpeed/gloo worker
    sometimes dies at interpreter shutdown with "terminate called without an active exception"
    (SIGABRT from a C++ destructor; seen about 1 run in 10 on the 2-core machine) after it has
    written its results. The results are on disk by now, so skipping interpreter shutdown loses
    nothing and keeps the test from failing on an exit-time crash that is not the recorder's.
    """
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def error_text() -> str:
    return traceback.format_exc(limit=12)


def norms64(grads) -> tuple[float, float]:
    """Reference ℓ1/ℓ2 of full gradients, in float64."""

    l1 = 0.0
    sq = 0.0
    for g in grads:
        g = g.detach().double()
        l1 += float(g.abs().sum())
        sq += float(g.square().sum())
    return l1, math.sqrt(sq)
