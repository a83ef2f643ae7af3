"""Pretraining runs: a `PretrainConfig` → a trained LLaMA-style model and the
files the rest of llm-refine reads.

``run_pretrain(config)`` trains in-process with the HF ``Trainer`` (AdamW; the LR schedule from
``config.schedule`` through `llm_refine.lr_schedulers.use_schedule`, refined schedule files included;
`GradNormCallback` always on) and works the same under plain ``python``, ``torchrun`` and
``accelerate launch --config_file launch/<engine>.yaml``. It writes to ``output_dir``:

- ``run_config.json``: the resolved config (``runtime`` adds world size, batch split, vocabulary...);
  run it again with ``python -m llm_refine.train <run_dir>/run_config.json``.
- ``gradnorms.jsonl``: the gradient-norm history (step = 0-based optimizer step).
- ``train_log.jsonl``: ``{"step", "loss", "lr", "batch", ...}`` per logged step; ``step`` is the
  0-based index of the optimizer step (as in ``gradnorms.jsonl``), ``lr`` the LR that step used,
  ``batch`` a fingerprint of the step's input ids (rank 0's share).
- ``eval_log.jsonl``: ``{"step", "val_loss"}``; ``step`` = optimizer steps done when evaluated.
- ``checkpoint-N/``: Trainer checkpoints (always one at the last step).
- ``summary.json``: written atomically last; its presence means the run finished.

Restarted on the same ``output_dir`` it resumes from the latest checkpoint: the logs are cut back to
that checkpoint, so nothing is duplicated, and the data order, LR and RNG states continue exactly.
A finished run (``summary.json`` present, same config) returns its summary without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..fileio import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl
from ..recorder import engine_info, release_engine
from ..schedules import make_schedule
from .config import PretrainConfig, TrainConfig, load_pretrain_config  # noqa: F401  (re-exported: the run's API)
from .rundir import EVAL_LOG, PROGRESS_FILE, RUN_CONFIG, SUMMARY, TRAIN_LOG, checkpoint_step, latest_checkpoint

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Logs that survive resume


def truncate_log(path: Path, max_step: int) -> None:
    """Drop records with ``step > max_step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if int(r.get("step", -1)) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class _BatchProbe:
    """Fingerprints the input ids of the micro-batches of each optimizer step."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._n = 0

    def add(self, input_ids) -> None:
        self._h.update(input_ids.detach().cpu().numpy().tobytes())
        self._n += 1

    def take(self) -> str | None:
        digest = self._h.hexdigest()[:16] if self._n else None
        self._h, self._n = hashlib.sha256(), 0
        return digest


def _say(line: str) -> None:
    """A progress line, through logging (entry points print llm_refine's INFO records on stdout)."""
    logger.info(line)


def _make_callbacks(out: Path, probe: _BatchProbe, is_main: bool, print_every: int, resumed: dict):
    """``resumed``: what the checkpoint we resume from says (``last_eval_step``, and the train and
    wall seconds of the segments before it), so a resumed run neither logs the same evaluation
    twice nor reports only its last segment's time."""
    from transformers import TrainerCallback

    class RunLogCallback(TrainerCallback):
        """Appends train/eval records (rank 0), prints progress, forces a final checkpoint, and
        stores the run's elapsed time in every checkpoint."""

        def __init__(self):
            self.last_eval_step = resumed.get("last_eval_step", -1)
            self.t0 = time.perf_counter()
            self.s0 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.s0 = time.perf_counter(), state.global_step

        def elapsed(self) -> dict:
            seg = time.perf_counter() - self.t0
            return {"train_time_s": resumed.get("train_time_s", 0.0) + seg, "wall_time_s": resumed.get("wall_time_s", 0.0) + seg,
                    "segments": resumed.get("segments", 0) + 1}

        def on_save(self, args, state, control, **kw):
            ckpt = out / f"checkpoint-{state.global_step}"
            if is_main and ckpt.is_dir():
                atomic_write_json(ckpt / PROGRESS_FILE, self.elapsed())

        def on_step_end(self, args, state, control, **kw):
            # Always checkpoint the last step: `evaluate_checkpoint` and a restart need it.
            if state.global_step >= state.max_steps:
                control.should_save = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                return
            batch = probe.take()
            if not is_main:
                return
            rec = {"step": state.global_step - 1, "loss": logs["loss"], "lr": logs.get("learning_rate")}
            for k in ("grad_norm", "grad_l1_norm", "grad_l2_norm"):
                if k in logs:
                    rec[k] = logs[k]
            rec["batch"] = batch
            append_jsonl(out / TRAIN_LOG, rec)
            if print_every and (state.global_step % print_every == 0 or state.global_step == state.max_steps):
                rate = (state.global_step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
                _say(f"[pretrain] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                     f"lr {rec['lr']:.3g} ({rate:.1f} steps/s)")

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not metrics or "eval_loss" not in metrics or state.global_step == self.last_eval_step:
                return
            self.last_eval_step = state.global_step
            if is_main:
                append_jsonl(out / EVAL_LOG, {"step": state.global_step, "val_loss": metrics["eval_loss"]})
                if print_every:
                    _say(f"[pretrain] step {state.global_step} val_loss {metrics['eval_loss']:.4f}")

    return RunLogCallback()


def _trainer_class():
    from transformers import Trainer

    class PretrainTrainer(Trainer):
        """The HF Trainer plus a batch fingerprint per step. Data order: the dataset is already in
        its seeded order and is read sequentially (``train_sampling_strategy="sequential"``)."""

        batch_probe: _BatchProbe | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.batch_probe is not None:
                self.batch_probe.add(inputs["input_ids"])
            return super().training_step(model, inputs, num_items_in_batch)

    return PretrainTrainer


def _gradnorm_callback():
    try:
        from ..recorder.callback import GradNormCallback
    except ImportError as e:  # pragma: no cover - the recorder ships with the package
        raise RuntimeError(f"llm_refine.recorder.callback is unavailable ({e}); gradient norms cannot be recorded") from e
    return GradNormCallback()


# ---------------------------------------------------------------------------------------------
# Running


def _comparable(d) -> dict:
    if not isinstance(d, dict):
        return {}
    d = {k: v for k, v in d.items() if k not in ("runtime", "output_dir")}
    d["train"] = {k: v for k, v in (d.get("train") or {}).items() if k not in ("print_every",)}
    return d


def _use_bf16(cfg: TrainConfig) -> bool:
    if cfg.bf16 is not None:
        return bool(cfg.bf16)
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() == "bf16"


def _batch_split(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per process, gradient accumulation steps) for the global batch."""
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world_size)
    if cfg.batch_size % (micro * world_size):
        raise UserError(
            f"train.batch_size={cfg.batch_size} is not a multiple of micro_batch_size × processes = {micro} × {world_size}; "
            "change train.batch_size or train.micro_batch_size"
        )
    return micro, cfg.batch_size // (micro * world_size)


def _finished_or_check(out: Path, resolved: dict) -> dict | None:
    """The summary of a finished run with this config; None to train; a UserError when ``out``
    holds a run of another config."""
    old = read_json(out / RUN_CONFIG)
    if old is None:
        return None
    if _comparable(old) != _comparable(resolved):
        raise UserError(f"{out} holds a run with a different config; use a new output_dir or delete {out} to start over")
    return read_json(out / SUMMARY) if (out / SUMMARY).is_file() else None


def _training_arguments(cfg: PretrainConfig, out: Path, micro: int, accum: int, cuda: bool):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(out),
        max_steps=t.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        logging_strategy="steps",
        logging_steps=t.log_every,
        eval_strategy="steps",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        disable_tqdm=True,
        use_cpu=not cuda,  # under torchrun on CPU the Trainer only reduces grads with use_cpu=True
        bf16=_use_bf16(t),
        deepspeed=t.deepspeed,
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_drop_last=False,  # the train set is an exact multiple of the global batch; keep every val row
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        ddp_find_unused_parameters=False,
        **t.trainer_args,
    )


def _build_trainer(cfg: PretrainConfig, args, data, model, out: Path, is_main: bool, callbacks: Sequence, resumed: dict):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..lr_schedulers import use_schedule
    from .data import PackedDataset

    t = cfg.train
    train_set = PackedDataset(data.train, seed=t.seed, length=t.max_steps * t.batch_size)
    val_set = PackedDataset(data.val, shuffle=False)
    probe = _BatchProbe()
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
        optimizer_cls_and_kwargs=_optimizer(t, args),
        callbacks=[_gradnorm_callback(), _make_callbacks(out, probe, is_main, t.print_every, resumed), *callbacks],
    )
    trainer.batch_probe = probe
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if is_main and sys.stderr.isatty():
        # At a terminal: the Trainer's progress bar, without its per-log dict lines (the
        # [pretrain] lines and train_log.jsonl carry those). In logs (no TTY): lines only.
        class _BarOnlyProgress(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                pass

        trainer.add_callback(_BarOnlyProgress())
    return use_schedule(trainer, cfg.schedule)


def _resumed_state(out: Path, ckpt: Path | None, resume_step: int) -> dict:
    """What a restart carries over from its checkpoint: the elapsed time of the earlier segments
    and whether the evaluation at the checkpoint's step is already in eval_log.jsonl (a run killed
    between its final checkpoint and summary.json must not log the final evaluation twice)."""
    if ckpt is None:
        return {}
    state = dict(read_json(ckpt / PROGRESS_FILE, {}) or {})
    evals = read_jsonl(out / EVAL_LOG)
    if evals and evals[-1].get("step") == resume_step:
        state["last_eval_step"] = resume_step
    return state


def _optimizer(train: TrainConfig, args):
    """``(class, kwargs)`` for the Trainer, or None for its own AdamW (``optim="adamw_torch"``)."""
    if train.optimizer == "adamw":
        return None
    from transformers import Trainer

    from .optim import AdamC

    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)  # lr, betas, eps as AdamW gets them
    return AdamC, kwargs


def _summary(cfg: PretrainConfig, trainer, out: Path, val_loss: float, times: dict, resume_step: int, data, n_params: int) -> dict:
    steps = trainer.state.global_step
    train_time = times["train"]
    ppl = math.exp(val_loss) if val_loss < 700 else float("inf")
    return {
        "final_val_loss": val_loss,
        "perplexity": ppl if math.isfinite(ppl) else None,  # JSON has no inf; the val loss says it all
        "tokens_seen": steps * cfg.train.batch_size * cfg.data.seq_len,
        "wall_time_s": round(times["wall"], 3),  # all segments of a resumed run
        "train_time_s": round(train_time, 3),
        "steps_per_s": round(steps / train_time, 3) if train_time > 0 and steps else None,
        "segments": times["segments"],
        "max_steps": cfg.train.max_steps,
        "steps": steps,
        "resumed_from_step": resume_step,
        "parameters": n_params,
        "size": cfg.model.size,
        "vocab_size": data.vocab_size,
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.train.batch_size,
        "learning_rate": cfg.train.learning_rate,
        "schedule": cfg.schedule.to_dict(),
        "engine": engine_info(trainer),
        "last_checkpoint": str(out / f"checkpoint-{steps}"),
    }


def run_pretrain(config: PretrainConfig, *, callbacks: Sequence = ()) -> dict:
    """Train (or resume, or return the finished run's summary) and return the summary dict.

    ``callbacks``: extra ``TrainerCallback``s (e.g. for monitoring; tests use one to crash a run).
    """
    import torch

    from .data import prepare_data
    from .models import build_model, count_parameters

    cfg, out = config, Path(config.output_dir)
    # Bad schedule options or a malformed schedule file fail here, before any data work.
    make_schedule(cfg.schedule, cfg.train.max_steps)(0, cfg.train.max_steps)
    resolved = cfg.to_dict()
    finished = _finished_or_check(out, resolved)
    if finished is not None:
        return finished

    # The launcher's WORLD_SIZE (torchrun, accelerate launch, srun via accelerate) fixes the batch
    # split before TrainingArguments exists: a DeepSpeed config fills its batch sizes from it.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = _batch_split(cfg.train, world)
    args = _training_arguments(cfg, out, micro, accum, torch.cuda.is_available())
    if args.world_size != world:
        raise RuntimeError(f"the Trainer sees {args.world_size} processes but WORLD_SIZE is {world}")
    is_main = args.process_index == 0

    with args.main_process_first(local=False, desc="tokenize and pack data"):
        data = prepare_data(cfg.data)
    model = build_model(
        cfg.model.size, data.vocab_size, cfg.train.seed,
        max_position_embeddings=cfg.data.seq_len, attn_implementation=cfg.model.attn_implementation,
    )
    n_params = count_parameters(cfg.model.size, data.vocab_size)

    ckpt = latest_checkpoint(out)
    resume_step = checkpoint_step(ckpt) if ckpt else 0
    if is_main:
        runtime = {
            "world_size": world, "micro_batch_size": micro, "gradient_accumulation_steps": accum,
            "vocab_size": data.vocab_size, "parameters": n_params, "data": data.meta,
        }
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG, {**resolved, "runtime": runtime})
        # Records written after the checkpoint we resume from would repeat: drop them.
        truncate_log(out / TRAIN_LOG, resume_step - 1)
        truncate_log(out / EVAL_LOG, resume_step)

    resumed = _resumed_state(out, ckpt, resume_step)
    trainer = _build_trainer(cfg, args, data, model, out, is_main, callbacks, resumed)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_time = time.perf_counter() - t0
    metrics = trainer.evaluate()  # logged to eval_log.jsonl unless the last periodic eval was this step
    times = {"train": resumed.get("train_time_s", 0.0) + train_time,
             "wall": resumed.get("wall_time_s", 0.0) + time.perf_counter() - t0, "segments": resumed.get("segments", 0) + 1}
    summary = _summary(cfg, trainer, out, float(metrics["eval_loss"]), times, resume_step, data, n_params)
    if is_main:
        atomic_write_json(out / SUMMARY, summary)  # last: its presence means the run finished
    release_engine(trainer)
    return summary


def set_threads(train: TrainConfig) -> None:
    """Entry points call this once: small models train fastest on one CPU thread per process (more
    only adds sync overhead); ``train.num_threads`` overrides. Library code never changes it."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(train.num_threads or 1)
    elif train.num_threads:
        torch.set_num_threads(train.num_threads)


def shutdown_distributed(*, barrier: bool = True) -> None:
    """End of a launched (torchrun / accelerate) run: destroy the process group. Without it, gloo
    processes occasionally abort at interpreter exit ("terminate called without an active
    exception", measured about 1 run in 14) after a run that finished fine. Entry points call this;
    ``run_pretrain`` does not, since an in-process caller may still need the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:  # only after success: after a failure on one rank a barrier could hang
                dist.barrier()
        finally:
            dist.destroy_process_group()


