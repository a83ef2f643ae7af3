"""Validation loss of a saved checkpoint on the run's fixed held-out set.

The validation set is the one the run evaluated on during training (`llm_refine.train.data.prepare_data`
with the run's data config: same documents, tokenizer and rows), so ``evaluate_checkpoint`` on the
last checkpoint reproduces the run's final ``val_loss`` and compares runs of a sweep on equal terms.
"""

from __future__ import annotations

import math
import os
import statistics
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


def evaluate_checkpoint(checkpoint_dir: str | os.PathLike, config=None, *, batch_size: int = 16, device: str | None = None,
                        sequence_losses: bool = False) -> dict:
    """``{"val_loss", "perplexity", "tokens", "sequences", "val_loss_se", "val_loss_se_tokens"}`` of the
    model in ``checkpoint_dir``.

    ``config``: the run's `PretrainConfig`; default: the ``run_config.json`` of the run that holds the
    checkpoint. The loss is the mean over every predicted token (all rows have the same length).
    ``device``: default the first GPU if there is one, else the CPU (fp32 either way).

    The validation estimate's own noise, as a standard error of ``val_loss`` (the held-out set is a
    sample; another sample of the same size would give a loss about this far off):

    - ``val_loss_se``: over sequences, sd(per-sequence mean losses) / sqrt(sequences). The honest
      one: tokens of one sequence share their context and are correlated, while held-out sequences
      are (nearly) independent draws, so the sequence is the unit of sampling.
    - ``val_loss_se_tokens``: sd(per-token losses) / sqrt(tokens), which treats every token as an
      independent draw; shown for comparison, it understates the noise when tokens are correlated.

    Both are None with fewer than 2 sequences. ``val_loss`` itself is computed exactly as before
    (the model's own mean loss per batch, weighted by its predicted tokens).

    ``sequence_losses=True`` adds ``"sequence_losses"``: the mean token loss of each held-out
    sequence, in the validation set's order. Two runs scored on the same set can then be compared
    sequence by sequence: the held-out set's share of the noise in their difference is
    sd(per-sequence differences) / sqrt(sequences), usually far below either run's own SE.
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
    seq_means: list[float] = []  # per held-out sequence: its mean token loss
    tok_sum = tok_sq = 0.0  # per-token losses: sum and sum of squares (float64)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x = rows[i: i + batch_size]
            n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens: every position but the first
            out = model(input_ids=x, labels=x)
            total += float(out.loss) * n
            count += n
            # Per-token losses of the same forward pass (the model's loss: logits[t] predicts x[t+1]).
            tok = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            ).double().view(x.shape[0], -1)
            seq_means += tok.mean(dim=1).tolist()
            tok_sum += float(tok.sum())
            tok_sq += float((tok * tok).sum())
    loss = total / count
    se_seq = se_tok = None
    if len(seq_means) >= 2:
        se_seq = statistics.stdev(seq_means) / math.sqrt(len(seq_means))
        mean_tok = tok_sum / count
        var_tok = max(tok_sq - count * mean_tok * mean_tok, 0.0) / (count - 1)
        se_tok = math.sqrt(var_tok / count)
    res = {"val_loss": loss, "perplexity": math.exp(loss) if loss < 700 else None, "tokens": count, "sequences": len(rows),
           "val_loss_se": se_seq, "val_loss_se_tokens": se_tok}
    if sequence_losses:
        res["sequence_losses"] = seq_means
    return res
