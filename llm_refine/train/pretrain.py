"""Pretraining runs: a recipe (YAML/dict + dotted overrides) → a trained LLaMA-style model and the
files the rest of llm-refine reads.

``run_pretrain(config)`` trains in-process with the HF ``Trainer`` (AdamW; the LR schedule from
``config.schedule`` through `llm_refine.schedules.use_schedule`, refined schedule files included;
`GradNormCallback` always on) and works the same under plain ``python``, ``torchrun`` and
``accelerate launch --config_file launch/<engine>.yaml``. It writes to ``output_dir``:

- ``config.json``: the resolved config (``runtime`` adds world size, batch split, vocabulary...).
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

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .data import DataConfig
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text
from ..schedules import ScheduleConfig, make_schedule

SUMMARY = "summary.json"
CONFIG = "config.json"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
GRADNORMS = "gradnorms.jsonl"


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    size: str = "cpu-0.5m"
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        from .models import get_size

        get_size(self.size)  # unknown size: UserError naming the choices


@dataclass
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 8  # global batch, in sequences per optimizer step
    micro_batch_size: int | None = None  # per process; None: batch_size / world_size (no accumulation)
    eval_batch_size: int = 16
    learning_rate: float = 3e-3  # the peak LR; the schedule multiplies it
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping (norms are recorded before clipping either way)
    seed: int = 0  # model init and data order
    eval_every: int = 100
    save_every: int = 100
    save_total_limit: int | None = 2
    log_every: int = 1
    print_every: int = 50  # progress lines on stdout; 0 = none
    bf16: bool | None = None  # None: on when the launcher asks for bf16 (accelerate config mixed_precision: bf16)
    num_threads: int | None = None  # CPU threads per process; None: 1 on CPU (fastest for small models)
    deepspeed: str | dict | None = None  # a DeepSpeed config (file or dict) for the Trainer
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "save_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"train.learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    output_dir: str = "runs/pretrain"

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "train": asdict(self.train),
            "schedule": self.schedule.to_dict(),
            "output_dir": self.output_dir,
        }


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """``["train.max_steps=50", "schedule.name=cosine"]`` applied to a nested dict (values parsed as YAML)."""
    d = copy.deepcopy(d)
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value; write e.g. train.max_steps=50")
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise UserError(f"override {item!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    return d


def _coerce_numbers(cls, d: dict) -> dict:
    """YAML reads ``1e-3`` (no dot) as a string: turn such strings into the field's number type."""
    out = dict(d)
    for f in fields(cls):
        v = out.get(f.name)
        if not isinstance(v, str):
            continue
        kind = str(f.type)
        for typ in ((float,) if "float" in kind else ()) + ((int,) if kind.startswith("int") else ()):
            try:
                out[f.name] = typ(v)
                break
            except ValueError:
                pass
    return out


def _section(cls, d: Any, name: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise UserError(f"recipe section {name!r} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in recipe section {name!r}; known: {sorted(known)}")
    try:
        return cls(**_coerce_numbers(cls, d))
    except TypeError as e:
        raise UserError(f"recipe section {name!r}: {e}") from None


def load_pretrain_config(path_or_dict: str | os.PathLike | Mapping | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """A `PretrainConfig` from a recipe YAML/JSON file (or a dict) plus dotted ``key=value`` overrides.

    A ``config.json`` written by a run loads back too (its ``runtime`` section is ignored). A
    schedule ``file`` always means the refined schedule and is made absolute.
    """
    import yaml

    if path_or_dict is None:
        raw: dict = {}
    elif isinstance(path_or_dict, Mapping):
        raw = copy.deepcopy(dict(path_or_dict))
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise UserError(f"recipe {p} does not exist; give a recipe YAML such as recipes/pretrain_tiny.yaml")
        try:
            raw = (json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())) or {}
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise UserError(f"recipe {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe {p} must be a mapping of sections (model, data, train, schedule, output_dir)")
    raw = apply_overrides(raw, overrides)
    raw.pop("runtime", None)
    known = {"model", "data", "train", "schedule", "output_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown recipe section(s) {unknown}; known: {sorted(known)}")
    sched = raw.get("schedule") or {}
    if isinstance(sched, str):
        sched = {"name": sched}
    sched = dict(sched)
    if sched.get("file"):
        sched["file"] = str(Path(sched["file"]).expanduser().resolve())
        sched["name"] = "refined"
    return PretrainConfig(
        model=_section(ModelConfig, raw.get("model"), "model"),
        data=_section(DataConfig, raw.get("data"), "data"),
        train=_section(TrainConfig, raw.get("train"), "train"),
        schedule=ScheduleConfig.from_dict(sched),
        output_dir=str(raw.get("output_dir") or PretrainConfig.output_dir),
    )


# ---------------------------------------------------------------------------------------------
# Logs that survive resume


def read_jsonl_records(path: Path) -> list[dict]:
    """Records of a JSONL log; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_log(path: Path, max_step: int) -> None:
    """Drop records with ``step > max_step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl_records(path) if int(r.get("step", -1)) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


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
    """A progress line on stdout; tqdm.write keeps an active progress bar intact around it."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _make_callbacks(out: Path, probe: _BatchProbe, is_main: bool, print_every: int):
    from transformers import TrainerCallback

    class RunLogCallback(TrainerCallback):
        """Appends train/eval records (rank 0), prints progress, and forces a final checkpoint."""

        def __init__(self):
            self.last_eval_step = -1
            self.t0 = time.perf_counter()
            self.s0 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.s0 = time.perf_counter(), state.global_step

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
            _append(out / TRAIN_LOG, rec)
            if print_every and (state.global_step % print_every == 0 or state.global_step == state.max_steps):
                rate = (state.global_step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
                _say(f"[pretrain] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                     f"lr {rec['lr']:.3g} ({rate:.1f} steps/s)")

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not metrics or "eval_loss" not in metrics or state.global_step == self.last_eval_step:
                return
            self.last_eval_step = state.global_step
            if is_main:
                _append(out / EVAL_LOG, {"step": state.global_step, "val_loss": metrics["eval_loss"]})
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


def _comparable(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k not in ("runtime", "output_dir")}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("print_every",)}
    return d


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` with the largest N that has a complete trainer state, or None."""
    best = None
    for p in Path(output_dir).glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / "trainer_state.json").is_file():
            if best is None or int(suffix) > int(best.name.split("-", 1)[1]):
                best = p
    return best


def _checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])


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


def _engine_info(trainer) -> dict:
    acc = trainer.accelerator
    info = {
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "world_size": acc.num_processes,
        "device": str(acc.device),
        "mixed_precision": str(acc.mixed_precision),
    }
    wrapped = getattr(trainer, "model_wrapped", None)
    if hasattr(wrapped, "zero_optimization_stage"):
        info["zero_stage"] = int(wrapped.zero_optimization_stage())
    info["model_class"] = type(wrapped).__name__
    return info


def run_pretrain(config: PretrainConfig, *, callbacks: Sequence = ()) -> dict:
    """Train (or resume, or return the finished run's summary) and return the summary dict.

    ``callbacks``: extra ``TrainerCallback``s (e.g. for monitoring; tests use one to crash a run).
    """
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .data import PackedDataset, prepare_data
    from .models import build_model, count_parameters
    from ..schedules import use_schedule

    cfg = config
    out = Path(cfg.output_dir)
    cuda = torch.cuda.is_available()
    if not cuda:
        # Small models train fastest on one thread per process; more only adds sync overhead.
        torch.set_num_threads(cfg.train.num_threads or 1)
    elif cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # Bad schedule options or a malformed schedule file fail here, before any data work.
    make_schedule(cfg.schedule, cfg.train.max_steps)(0, cfg.train.max_steps)

    resolved = cfg.to_dict()
    if (out / SUMMARY).is_file() and (out / CONFIG).is_file():
        old = json.loads((out / CONFIG).read_text())
        if _comparable(old) == _comparable(resolved):
            return json.loads((out / SUMMARY).read_text())
    if (out / CONFIG).is_file():
        old = json.loads((out / CONFIG).read_text())
        if _comparable(old) != _comparable(resolved):
            raise UserError(
                f"{out} holds a run with a different config; use a new output_dir or delete {out} to start over"
            )

    # The launcher's WORLD_SIZE (torchrun, accelerate launch, srun via accelerate) fixes the batch
    # split before TrainingArguments exists: a DeepSpeed config fills its batch sizes from it.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = _batch_split(cfg.train, world)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.train.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        per_device_eval_batch_size=cfg.train.eval_batch_size,
        learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
        adam_beta1=cfg.train.adam_beta1,
        adam_beta2=cfg.train.adam_beta2,
        adam_epsilon=cfg.train.adam_epsilon,
        max_grad_norm=cfg.train.max_grad_norm,
        optim="adamw_torch",
        logging_strategy="steps",
        logging_steps=cfg.train.log_every,
        eval_strategy="steps",
        eval_steps=cfg.train.eval_every,
        save_strategy="steps",
        save_steps=cfg.train.save_every,
        save_total_limit=cfg.train.save_total_limit,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,  # under torchrun on CPU the Trainer only reduces grads with use_cpu=True
        bf16=_use_bf16(cfg.train),
        deepspeed=cfg.train.deepspeed,
        activation_checkpointing=cfg.train.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_drop_last=False,  # the train set is an exact multiple of the global batch; keep every val row
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        ddp_find_unused_parameters=False,
    )
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
    resume_step = _checkpoint_step(ckpt) if ckpt else 0
    runtime = {
        "world_size": world, "micro_batch_size": micro, "gradient_accumulation_steps": accum,
        "vocab_size": data.vocab_size, "parameters": n_params, "data": data.meta,
    }
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG, {**resolved, "runtime": runtime})
        # Records written after the checkpoint we resume from would repeat: drop them.
        truncate_log(out / TRAIN_LOG, resume_step - 1)
        truncate_log(out / EVAL_LOG, resume_step)

    train_set = PackedDataset(data.train, seed=cfg.train.seed, length=cfg.train.max_steps * cfg.train.batch_size)
    val_set = PackedDataset(data.val, shuffle=False)
    probe = _BatchProbe()
    log_cb = _make_callbacks(out, probe, is_main, cfg.train.print_every)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
        callbacks=[_gradnorm_callback(), log_cb, *callbacks],
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
    use_schedule(trainer, cfg.schedule)

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_time = time.perf_counter() - t0
    metrics = trainer.evaluate()  # logged to eval_log.jsonl unless the last periodic eval was this step
    wall = time.perf_counter() - t0

    steps = trainer.state.global_step
    val_loss = float(metrics["eval_loss"])
    steps_run = steps - resume_step
    summary = {
        "final_val_loss": val_loss,
        "perplexity": math.exp(val_loss) if val_loss < 700 else float("inf"),
        "tokens_seen": steps * cfg.train.batch_size * cfg.data.seq_len,
        "wall_time_s": round(wall, 3),
        "train_time_s": round(train_time, 3),
        "steps_per_s": round(steps_run / train_time, 3) if train_time > 0 and steps_run else None,
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
        "engine": _engine_info(trainer),
        "last_checkpoint": str(out / f"checkpoint-{steps}"),
    }
    if not math.isfinite(summary["perplexity"]):
        summary["perplexity"] = None  # JSON has no inf; the val loss says it all
    if is_main:
        atomic_write_json(out / SUMMARY, summary)  # last: its presence means the run finished
    _teardown(trainer)
    return summary


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


def _teardown(trainer) -> None:
    """Release DeepSpeed engines; without it gloo runs occasionally abort at exit."""
    wrapped = getattr(trainer, "model_wrapped", None)
    if hasattr(wrapped, "destroy"):
        try:
            wrapped.destroy()
        except Exception:  # pragma: no cover - best effort at exit
            pass
