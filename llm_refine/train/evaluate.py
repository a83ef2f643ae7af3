"""Validation loss of a saved checkpoint on the run's fixed held-out set.

The validation set is the one the run evaluated on during training (`llm_refine.train.data.prepare_data`
with the run's data config: same documents, tokenizer and rows), so ``evaluate_checkpoint`` on the
last checkpoint reproduces the run's final ``val_loss`` and compares runs of a sweep on equal terms.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import UserError


def _find_config(checkpoint_dir: Path):
    """The config of the run that holds ``checkpoint_dir`` (its ``run_config.json``)."""
    from .config import load_pretrain_config
    from .rundir import RUN_CONFIG

    for d in (checkpoint_dir, checkpoint_dir.parent):
        if (d / RUN_CONFIG).is_file():
            return load_pretrain_config(d / RUN_CONFIG)
    raise UserError(
        f"no {RUN_CONFIG} next to {checkpoint_dir}; pass a checkpoint-N inside a run's output_dir (or the run's config)"
    )


def evaluate_checkpoint(checkpoint_dir: str | os.PathLike, config=None, *, batch_size: int = 16, device: str | None = None) -> dict:
    """``{"val_loss", "perplexity", "tokens", "sequences"}`` of the model in ``checkpoint_dir``.

    ``config``: the run's `PretrainConfig`; default: the ``run_config.json`` of the run that holds the
    checkpoint. The loss is the mean over every predicted token (all rows have the same length).
    ``device``: default the first GPU if there is one, else the CPU (fp32 either way).
    """
    import torch
    from transformers import LlamaForCausalLM

    from .data import prepare_data

    ckpt = Path(checkpoint_dir)
    if not (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt} is not a model checkpoint (no config.json); give a checkpoint-N directory")
    cfg = config if config is not None else _find_config(ckpt)
    data = prepare_data(cfg.data)
    model = LlamaForCausalLM.from_pretrained(str(ckpt))
    if model.config.vocab_size != data.vocab_size:
        raise UserError(
            f"{ckpt}: model vocabulary {model.config.vocab_size} != tokenizer's {data.vocab_size}; wrong config for this checkpoint"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    rows = torch.from_numpy(data.val.astype("int64")).to(dev)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x = rows[i: i + batch_size]
            n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens: every position but the first
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    loss = total / count
    return {"val_loss": loss, "perplexity": math.exp(loss) if loss < 700 else None, "tokens": count, "sequences": len(rows)}
