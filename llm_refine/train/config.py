"""The pretraining run's configuration: model, data, train, schedule, output directory.

Every field has a type, a range and a one-line doc (`llm_refine.configs`); a run is fully described
by one `PretrainConfig`, written to ``<output_dir>/run_config.json`` when it starts and loadable
from there to run it again (``python -m llm_refine.train <run_dir>/run_config.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..configs import Config, ConfigError, merge, option, parse_overrides
from ..errors import UserError
from ..schedules import LinearSchedule, RefinedSchedule, ScheduleConfig

SOURCES = ("embedded", "files", "c4")
# TrainingArguments fields that pretraining derives from this config (llm_refine.train.pretrain).
TRAINER_ARGS_SET_HERE = {
    "output_dir": "output_dir", "max_steps": "train.max_steps", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size", "per_device_eval_batch_size": "train.eval_batch_size",
    "learning_rate": "train.learning_rate", "weight_decay": "train.weight_decay", "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2", "adam_epsilon": "train.adam_epsilon", "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every", "save_steps": "train.save_every",
    "save_total_limit": "train.save_total_limit", "seed": "train.seed", "data_seed": "train.seed", "report_to": "train.report_to",
    "bf16": "train.bf16", "deepspeed": "train.deepspeed", "activation_checkpointing": "train.gradient_checkpointing",
    "lr_scheduler_type": "schedule", "warmup_steps": "schedule", "warmup_ratio": "schedule", "optim": "AdamW, fixed",
    "train_sampling_strategy": "the data order, fixed", "use_cpu": "the device, automatic",
}
MIN_TRAINED_VOCAB = 512  # byte fallback alone takes 256 pieces, plus specials and the corpus' characters


@dataclass(kw_only=True)
class ModelConfig(Config):
    size: str = option("cpu-0.5m", doc="a named LLaMA-style size (`llm-refine sizes`)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = option("sdpa", doc="attention kernel")

    def validate(self) -> None:
        from .models import MODEL_SIZES

        if self.size not in MODEL_SIZES:
            raise ConfigError(("size",), f"unknown model size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}")


@dataclass(kw_only=True)
class DataConfig(Config):
    # Field names and order are part of the data cache key (llm_refine.train.data): keep them.
    source: Literal["embedded", "files", "c4"] = option("embedded", doc="embedded corpus, local files, or C4 streaming")
    path: str | None = option(None, doc="files: a file, a directory or a glob")
    val_path: str | None = option(None, doc="files: separate validation files (else a hashed split of path)")
    text_field: str = option("text", doc="JSON field that holds a document's text")
    seq_len: int = option(128, doc="tokens per training sequence", ge=2)
    val_fraction: float = option(0.05, doc="share of documents held out (embedded, files without val_path)", gt=0.0, lt=1.0)
    val_sequences: int = option(48, doc="size of the fixed validation set, in sequences", ge=1)
    max_train_chars: int | None = option(5_000_000, doc="budget of training text; null: everything", ge=1)
    max_val_chars: int | None = option(400_000, doc="budget of validation text; null: everything", ge=1)
    tokenizer: str = option("sentencepiece", doc='"sentencepiece" (trained here), a .model file, or an HF tokenizer dir')
    vocab_size: int = option(2048, doc=f"vocabulary of a trained sentencepiece model (>= {MIN_TRAINED_VOCAB})", ge=1)
    tokenizer_train_chars: int = option(2_000_000, doc="sentencepiece trains on this much of the training text", ge=1)
    c4_name: str = option("allenai/c4", doc="C4's dataset name")
    c4_config: str = option("en", doc="C4's config")

    def validate(self) -> None:
        if self.source == "files" and not self.path:
            raise ConfigError(("path",), "data.source 'files' needs data.path: a file, directory or glob of .jsonl/.json.gz/.txt/.parquet")
        if self.tokenizer == "sentencepiece" and self.vocab_size < MIN_TRAINED_VOCAB:
            raise ConfigError(
                ("vocab_size",),
                f"{self.vocab_size} is too small for a trained sentencepiece tokenizer; allowed: >= {MIN_TRAINED_VOCAB}",
            )


@dataclass(kw_only=True)
class TrainConfig(Config):
    max_steps: int = option(300, doc="optimizer steps of the run", ge=1)
    batch_size: int = option(8, doc="global batch, in sequences per optimizer step", ge=1)
    micro_batch_size: int | None = option(None, doc="per process; null: batch_size / processes (no accumulation)", ge=1)
    eval_batch_size: int = option(16, doc="sequences per evaluation batch", ge=1)
    learning_rate: float = option(3e-3, doc="the peak LR; the schedule multiplies it", gt=0.0)
    optimizer: Literal["adamw", "adamc"] = option(
        "adamw", doc="adamw, or adamc: AdamW with weight decay scaled by lr_t/lr_max (Defazio 2025)"
    )
    weight_decay: float = option(0.1, doc="decoupled weight decay (adamc: at the peak LR)", ge=0.0)
    adam_beta1: float = option(0.9, doc="AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = option(0.95, doc="AdamW beta2", ge=0.0, lt=1.0)
    adam_epsilon: float = option(1e-8, doc="AdamW epsilon", gt=0.0)
    max_grad_norm: float = option(1.0, doc="clip threshold; 0 disables clipping (norms are recorded before it)", ge=0.0)
    seed: int = option(0, doc="model init and data order", ge=0)
    eval_every: int = option(100, doc="optimizer steps between evaluations", ge=1)
    save_every: int = option(100, doc="optimizer steps between checkpoints (the last step is always saved)", ge=1)
    save_total_limit: int | None = option(2, doc="checkpoints kept; null: all", ge=1)
    log_every: int = option(1, doc="optimizer steps between train_log.jsonl records", ge=1)
    print_every: int = option(50, doc="optimizer steps between progress lines; 0: none", ge=0)
    bf16: bool | None = option(None, doc="null: on when the launcher asks for bf16 (accelerate mixed_precision: bf16)")
    num_threads: int | None = option(None, doc="CPU threads per process; null: 1 on CPU (fastest for small models)", ge=1)
    deepspeed: str | dict[str, object] | None = option(None, doc="a DeepSpeed config (file or mapping) for the Trainer")
    gradient_checkpointing: bool = option(False, doc="recompute activations in the backward pass")
    report_to: str | list[str] = option("none", doc='the Trainer\'s trackers, e.g. tensorboard or [tensorboard, wandb]; "none": no tracker')
    trainer_args: dict[str, Any] = option(
        default_factory=dict, doc="other transformers.TrainingArguments fields, passed through (e.g. logging_dir, run_name)"
    )

    def validate(self) -> None:
        if self.optimizer == "adamc" and self.deepspeed is not None:
            raise ConfigError(("optimizer",), "adamc is not available with DeepSpeed (its config builds the optimizer); use adamw")
        if not self.trainer_args:
            return
        import dataclasses as dc

        from transformers import TrainingArguments

        known = {f.name for f in dc.fields(TrainingArguments)}
        for key in self.trainer_args:
            if key in TRAINER_ARGS_SET_HERE:
                raise ConfigError(("trainer_args", key), f"is set from the train section ({TRAINER_ARGS_SET_HERE[key]}); set that instead")
            if key not in known:
                raise ConfigError(("trainer_args", key), "is not a transformers.TrainingArguments field")


@dataclass(kw_only=True)
class PretrainConfig(Config):
    model: ModelConfig = option(default_factory=ModelConfig, doc="the model")
    data: DataConfig = option(default_factory=DataConfig, doc="the corpus, tokenizer and validation set")
    train: TrainConfig = option(default_factory=TrainConfig, doc="optimizer, batch, steps, evaluation, checkpoints")
    schedule: ScheduleConfig = option(default_factory=LinearSchedule, doc="the LR schedule (one of llm_refine.schedules)")
    output_dir: str = option("runs/pretrain", doc="the run directory")

    def validate(self) -> None:
        if isinstance(self.schedule, RefinedSchedule) and self.schedule.file:
            # A schedule file always means the refined schedule; made absolute so the run
            # directory's copy of this config works from any working directory.
            object.__setattr__(self, "schedule", self.schedule.replace(file=str(Path(self.schedule.file).expanduser().resolve())))


SECTIONS = ("model", "data", "train", "schedule", "output_dir")


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML or JSON config file (a run's ``run_config.json`` included)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such config file; give a pretraining YAML (`llm-refine examples copy "
                        "pretrain_tiny` writes one here) or a run's run_config.json")
    try:
        text = p.read_text(encoding="utf-8")
        raw = (json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)) or {}
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; save the config as UTF-8") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: must be a mapping of sections ({', '.join(SECTIONS)})")
    return raw


def load_pretrain_config(
    source: str | os.PathLike | Mapping | None = None,
    overrides: Mapping | Sequence[str] | None = None,
) -> PretrainConfig:
    """A validated `PretrainConfig` from a YAML/JSON file (or a mapping) plus overrides.

    ``overrides``: a nested mapping, or ``key=value`` strings from a command line (parsed once,
    here, with `llm_refine.configs.parse_overrides`). A ``run_config.json`` written by a run loads
    back too (its ``runtime`` section is ignored). A ``schedule.file`` always means ``refined``.
    """
    if source is None:
        raw, where = {}, None
    elif isinstance(source, Mapping):
        raw, where = dict(source), None  # errors are ConfigErrors with the key path; callers add the where
    else:
        raw, where = read_config_file(source), str(source)
    if overrides and not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    raw = merge(raw, overrides or {})
    raw.pop("runtime", None)
    sched = raw.get("schedule")
    if isinstance(sched, Mapping) and sched.get("file"):
        raw["schedule"] = {**sched, "name": "refined"}  # a schedule file always means the refined schedule
    return PretrainConfig.from_dict(raw, where=where)
