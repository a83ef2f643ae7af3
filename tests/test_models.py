"""Model sizes: counts from the formula equal the built model's, seeded init, errors, the table."""

from __future__ import annotations

import pytest
import torch

from llm_refine.errors import UserError
from llm_refine.train.models import MODEL_SIZES, build_model, count_parameters, format_size_table, llama_config

CPU_SIZES = [n for n, s in MODEL_SIZES.items() if s.device == "cpu"]
GPU_SIZES = [n for n, s in MODEL_SIZES.items() if s.device == "gpu"]


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_table_has_the_agreed_names():
    assert {"cpu-0.5m", "cpu-2m", "cpu-8m", "124m", "350m", "760m", "1.3b"} <= set(MODEL_SIZES)


@pytest.mark.parametrize("size", CPU_SIZES)
@pytest.mark.parametrize("vocab", [2048, 1000])
def test_cpu_size_count_matches_built_model(size, vocab):
    model = build_model(size, vocab, seed=0)
    assert _numel(model) == count_parameters(size, vocab)
    assert model.config.vocab_size == vocab


def test_cpu_sizes_span_half_to_ten_million():
    counts = [count_parameters(s) for s in CPU_SIZES]
    assert min(counts) >= 0.3e6 and max(counts) <= 10e6
    assert counts == sorted(counts)


# Hand-computed with the LLaMA layout (untied embeddings, SwiGLU, RMSNorm weights, no biases):
# 2·V·h + L·(4h² + 3·h·mlp + 2h) + h.
EXPECTED_GPU = {
    "124m": 2 * 32000 * 768 + 12 * (4 * 768**2 + 3 * 768 * 2048 + 2 * 768) + 768,
    "350m": 2 * 32000 * 1024 + 24 * (4 * 1024**2 + 3 * 1024 * 2816 + 2 * 1024) + 1024,
    "760m": 2 * 32000 * 1536 + 24 * (4 * 1536**2 + 3 * 1536 * 4096 + 2 * 1536) + 1536,
    "1.3b": 2 * 32000 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 * 5632 + 2 * 2048) + 2048,
}


@pytest.mark.parametrize("size", GPU_SIZES)
def test_gpu_shape_counts_formula(size):
    assert count_parameters(size) == EXPECTED_GPU[size]
    nominal = {"124m": 124e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9}[size]
    assert 0.85 < count_parameters(size) / nominal < 1.15


def test_gpu_shape_counts_match_transformers_on_meta_device():
    """The formula against transformers' own module tree, without allocating any weights."""
    from transformers import LlamaForCausalLM

    for size in GPU_SIZES:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(size))
        assert _numel(model) == count_parameters(size), size


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cpu-0.5m", 512, seed=7)
    after = torch.rand(1)
    b = build_model("cpu-0.5m", 512, seed=7)
    c = build_model("cpu-0.5m", 512, seed=8)
    assert torch.equal(before, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_unknown_size_is_a_user_error():
    with pytest.raises(UserError, match="unknown model size 'cpu-3m'.*cpu-0.5m"):
        build_model("cpu-3m", 100)
    with pytest.raises(UserError, match="unknown model size"):
        count_parameters("huge")


def test_format_size_table():
    table = format_size_table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "size" and len(lines) == 2 + len(MODEL_SIZES)
    for name in MODEL_SIZES:
        assert any(line.split()[0] == name for line in lines[2:])
    assert "463.42K" in table and "1.36B" in table
