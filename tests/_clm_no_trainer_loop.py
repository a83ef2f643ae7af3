"""A custom accelerate training loop for causal-LM pretraining, written for llm-refine's tests in the
style of transformers' ``run_clm_no_trainer.py`` example (same command-line flags for what the tests
use, same checkpoint layout ``<output_dir>/step_<N>``, same tracker project name ``clm_no_trainer``),
but its own code. It is what a user's hand-written loop looks like: ``Accelerator()`` without
``cpu=True``, a shuffled train loader, ``accelerator.accumulate``, ``save_state`` every N optimizer
steps, ``load_state`` + ``skip_first_batches`` on resume, a short evaluation, ``end_training``.

The only llm-refine line is the one-line hook right after ``accelerator.prepare(...)`` (marked below).
Everything is local: ``--config_name`` and ``--tokenizer_name`` are directories, the data are text
files read with the ``datasets`` "text" builder.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from itertools import chain

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, get_scheduler

from llm_refine import AccelerateGradNormHook

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a causal LM from a config with a custom accelerate loop.")
    p.add_argument("--config_name", required=True, help="directory (or hub id) of the model config")
    p.add_argument("--tokenizer_name", required=True, help="directory (or hub id) of the tokenizer")
    p.add_argument("--train_file", required=True, help="a .txt file, one document per line")
    p.add_argument("--validation_file", default=None, help="a .txt file; without it nothing is evaluated")
    p.add_argument("--block_size", type=int, default=None,
                   help="tokens per training block (default: the tokenizer's model_max_length, at most 1024)")
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--per_device_eval_batch_size", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps in all; overrides --num_train_epochs when given")
    p.add_argument("--lr_scheduler_type", default="linear")
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--checkpointing_steps", default=None,
                   help="an integer N: save_state every N optimizer steps into <output_dir>/step_<steps done>; "
                        "or 'epoch': at the end of each epoch into <output_dir>/epoch_<e>")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a directory written by --checkpointing_steps (step_<N> or epoch_<e>)")
    p.add_argument("--with_tracking", action="store_true", help="log to the trackers named by --report_to")
    p.add_argument("--report_to", default="all", help="accelerate tracker name(s), e.g. tensorboard")
    return p


def load_blocks(args, tokenizer, accelerator):
    """Tokenize the text files and cut the token stream into --block_size blocks (labels = inputs)."""
    files = {"train": args.train_file}
    if args.validation_file:
        files["validation"] = args.validation_file
    raw = load_dataset("text", data_files=files)

    limit = min(tokenizer.model_max_length, 1024)
    size = args.block_size or limit
    if size > tokenizer.model_max_length:
        log.warning(f"--block_size {size} exceeds the tokenizer's model_max_length; using {limit}")
        size = limit

    def tokenize(batch):
        return tokenizer(batch["text"])

    def to_blocks(batch):
        joined = {k: list(chain.from_iterable(v)) for k, v in batch.items()}
        usable = (len(joined["input_ids"]) // size) * size  # the tail shorter than a block is dropped
        out = {k: [v[i:i + size] for i in range(0, usable, size)] for k, v in joined.items()}
        out["labels"] = [ids.copy() for ids in out["input_ids"]]
        return out

    with accelerator.main_process_first():  # the first process fills the cache, the others read it
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names,
                            desc="tokenizing")
        blocks = tokenized.map(to_blocks, batched=True, desc=f"grouping into blocks of {size}")
    return blocks


def step_from_checkpoint(path: str) -> tuple[str, int]:
    """('step', N) or ('epoch', e) from a checkpoint directory's name."""
    name = os.path.basename(os.path.normpath(path))
    m = re.fullmatch(r"(step|epoch)_(\d+)", name)
    if not m:
        raise SystemExit(f"--resume_from_checkpoint {path!r}: expected a directory named step_<N> or epoch_<e>")
    return m.group(1), int(m.group(2))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    acc_kwargs = {"gradient_accumulation_steps": args.gradient_accumulation_steps, "project_dir": args.output_dir}
    if args.with_tracking:
        acc_kwargs["log_with"] = args.report_to
    accelerator = Accelerator(**acc_kwargs)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    config = AutoConfig.from_pretrained(args.config_name)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    blocks = load_blocks(args, tokenizer, accelerator)
    train_dataloader = DataLoader(blocks["train"], shuffle=True, collate_fn=default_data_collator,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = None
    if "validation" in blocks:
        eval_dataloader = DataLoader(blocks["validation"], collate_fn=default_data_collator,
                                     batch_size=args.per_device_eval_batch_size)

    # Biases and norm weights (the 1-d parameters) get no weight decay.
    decayed = [p for p in model.parameters() if p.ndim > 1]
    undecayed = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": args.weight_decay},
                                   {"params": undecayed, "weight_decay": 0.0}], lr=args.learning_rate)

    # The schedule's length before prepare: the prepared loader is split across processes, and the
    # prepared scheduler steps once per process per optimizer step, so both counts are per process
    # times the number of processes.
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=total_steps * accelerator.num_processes)

    prepared = accelerator.prepare(model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = prepared
    # llm-refine: the one-line hook
    AccelerateGradNormHook(accelerator, model, optimizer, f"{args.output_dir}/gradnorms.jsonl")

    # With the loader's real (per process) length.
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    every = args.checkpointing_steps
    if every is not None and every != "epoch":
        every = int(every)

    if args.with_tracking:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("clm_no_trainer", hparams)

    completed_steps, first_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.print(f"resuming from {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)
        kind, n = step_from_checkpoint(args.resume_from_checkpoint)
        if kind == "epoch":
            first_epoch, completed_steps = n + 1, (n + 1) * steps_per_epoch
        else:
            completed_steps = n
            consumed = n * args.gradient_accumulation_steps  # micro-batches already trained on
            first_epoch, skip = divmod(consumed, len(train_dataloader))

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(f"{len(blocks['train'])} training blocks, {epochs} epoch(s), {args.max_train_steps} "
                      f"optimizer steps of {total_batch} blocks; starting at step {completed_steps}")

    for epoch in range(first_epoch, epochs):
        model.train()
        batches = train_dataloader
        if epoch == first_epoch and skip:
            batches = accelerator.skip_first_batches(train_dataloader, skip)
        window_loss, window_batches = 0.0, 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                window_loss += loss.detach().float().item()
                window_batches += 1
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            if args.with_tracking:
                accelerator.log({"train_loss": window_loss / window_batches, "lr": lr_scheduler.get_last_lr()[0]},
                                step=completed_steps)
            window_loss, window_batches = 0.0, 0
            if isinstance(every, int) and completed_steps % every == 0:
                accelerator.save_state(os.path.join(args.output_dir, f"step_{completed_steps}"))
            if completed_steps >= args.max_train_steps:
                break

        if every == "epoch":
            accelerator.save_state(os.path.join(args.output_dir, f"epoch_{epoch}"))
        if completed_steps >= args.max_train_steps:
            break

    if eval_dataloader is not None:
        model.eval()
        losses = []
        for batch in eval_dataloader:
            with torch.no_grad():
                loss = model(**batch).loss
            n = batch["input_ids"].shape[0]
            losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(n)))
        eval_loss = torch.cat(losses).mean().item()
        perplexity = math.exp(eval_loss) if eval_loss < 50 else float("inf")
        accelerator.print(f"after {completed_steps} steps: eval loss {eval_loss:.4f}, perplexity {perplexity:.2f}")
        if args.with_tracking:
            accelerator.log({"eval_loss": eval_loss, "perplexity": perplexity}, step=completed_steps)

    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
    accelerator.end_training()  # also closes the llm-refine hook (flushes the last records)


if __name__ == "__main__":
    main()
