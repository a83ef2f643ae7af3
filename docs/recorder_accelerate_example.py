"""Record exact global gradient norms in a custom accelerate training loop.

    python docs/recorder_accelerate_example.py --output_dir out --cpu           # one process
    accelerate launch --config_file launch/<engine>.yaml \
        docs/recorder_accelerate_example.py --output_dir out                    # DDP / FSDP / DeepSpeed

Writes out/gradnorms.jsonl: one {"step", "l1", "l2"} line per optimizer step (global, pre-clip).
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from llm_refine import AccelerateGradNormHook


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--output_dir", default="out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--grad_accum", type=int, default=2)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=args.cpu)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    rows = args.steps * args.grad_accum * 4 * accelerator.num_processes
    data = torch.randint(0, config.vocab_size, (rows, 32))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # After prepare: pass what prepare returned. The hook registers itself for checkpointing, so
    # accelerator.save_state / load_state carry its step and the history position (no extra calls).
    hook = AccelerateGradNormHook(accelerator, model, optimizer, f"{args.output_dir}/gradnorms.jsonl",
                                  flush_every=10, meta={"max_grad_norm": 1.0, "grad_accum": args.grad_accum})
    for ids in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # recorded BEFORE this clip
            optimizer.step()  # the hook counts optimizer steps and notes loss-scaler skips
            scheduler.step()
            optimizer.zero_grad()
    hook.close()  # flush, close the file, remove the wrappers
    accelerator.print(f"recorded {hook.step} optimizer steps in {args.output_dir}/gradnorms.jsonl")
    accelerator.end_training()  # destroys the process group: gloo runs can abort at exit without it


if __name__ == "__main__":
    main()
