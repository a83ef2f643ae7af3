"""LLaMA-style decoder-only models by name, from CPU-sized to ~1B parameters.

Every size is a ``transformers.LlamaForCausalLM`` built from a config (random init, seeded): RMSNorm,
rotary positions, SwiGLU MLP, untied input/output embeddings, no biases. The CPU sizes are small
enough that the tiny recipe trains several runs in minutes on two cores; the GPU shapes follow the
usual GPT-2/3 width/depth ladder (124M, 350M, 760M, 1.3B) with a LLaMA MLP (≈ 8/3 · hidden,
rounded) and a 32k vocabulary. The names are nominal; `count_parameters` gives exact counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError


@dataclass(frozen=True)
class ModelSize:
    """The shape of one named size. ``vocab_size`` is the default used in the table; a run uses
    its tokenizer's vocabulary."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # None: = num_heads (plain multi-head attention)
    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    device: str = "cpu"  # what the size is meant for: "cpu" or "gpu" (documentation only)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


MODEL_SIZES: dict[str, ModelSize] = {
    # CPU sizes: chosen so cpu-0.5m runs well over 10 optimizer steps/s on one thread
    # (seq_len 128, batch 8) and cpu-8m is still usable for a few hundred steps.
    "cpu-0.5m": ModelSize(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=176),
    "cpu-2m": ModelSize(hidden_size=128, num_layers=6, num_heads=4, intermediate_size=352),
    "cpu-8m": ModelSize(hidden_size=256, num_layers=8, num_heads=8, intermediate_size=688),
    # GPU shapes.
    "124m": ModelSize(768, 12, 12, 2048, vocab_size=32000, device="gpu"),
    "350m": ModelSize(1024, 24, 16, 2816, vocab_size=32000, device="gpu"),
    "760m": ModelSize(1536, 24, 16, 4096, vocab_size=32000, device="gpu"),
    "1.3b": ModelSize(2048, 24, 32, 5632, vocab_size=32000, device="gpu"),
}


def get_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    try:
        return MODEL_SIZES[size]
    except KeyError:
        raise UserError(
            f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)} (`llm-refine sizes` lists them)"
        ) from None


def llama_config(size: str | ModelSize, vocab_size: int | None = None, *, max_position_embeddings: int | None = None, **extra):
    """The ``transformers.LlamaConfig`` for a named size."""
    from transformers import LlamaConfig

    s = get_size(size)
    if s.hidden_size % s.num_heads:
        raise ValueError(f"hidden_size {s.hidden_size} is not divisible by num_heads {s.num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size or s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max_position_embeddings or s.max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        **extra,
    )


def build_model(size: str | ModelSize, vocab_size: int | None = None, seed: int = 0, **config_kwargs):
    """A freshly initialized ``LlamaForCausalLM``; the same (size, vocab, seed) gives the same weights.

    The init draws from a forked RNG so building a model does not move the caller's global seed.
    ``from_config`` (not the bare constructor) so that under DeepSpeed ZeRO-3 with ``zero3_init``
    the weights are partitioned as they are created instead of materialized whole on every rank.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = llama_config(size, vocab_size, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def count_parameters(size: str | ModelSize, vocab_size: int | None = None) -> int:
    """Exact parameter count from the shape alone (no model is built)."""
    s = get_size(size)
    v = vocab_size or s.vocab_size
    h, kv = s.hidden_size, s.kv_heads * s.head_dim
    attention = 2 * h * h + 2 * h * kv  # q, o: h×h; k, v: h×(kv_heads·head_dim)
    mlp = 3 * h * s.intermediate_size  # gate, up, down
    norms = 2 * h  # input and post-attention RMSNorm weights
    embeddings = 2 * v * h  # untied input embedding and lm_head
    return embeddings + s.num_layers * (attention + mlp + norms) + h  # + final norm


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_size_table(vocab_size: int | None = None) -> str:
    """A plain-text table of every named size (what ``llm-refine sizes`` prints)."""
    header = ("size", "device", "hidden", "layers", "heads", "kv_heads", "mlp", "vocab", "params", "non-emb")
    rows = [header]
    for name, s in MODEL_SIZES.items():
        v = vocab_size or s.vocab_size
        total = count_parameters(s, v)
        non_emb = total - 2 * v * s.hidden_size
        rows.append(
            (name, s.device, str(s.hidden_size), str(s.num_layers), str(s.num_heads), str(s.kv_heads),
             str(s.intermediate_size), str(v), _human(total), _human(non_emb))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def size_dict(size: str | ModelSize) -> dict:
    return asdict(get_size(size))
