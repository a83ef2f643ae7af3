"""The report's statistics: paired differences to the baseline, intervals, verdicts, validation noise;
the report built from synthetic run dirs with known differences; no absolute path in the report;
the validation standard error of `evaluate_checkpoint`."""

from __future__ import annotations

import argparse
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps
from test_report import make_run

from llm_refine.report import build_report, collect_runs, main_compare
from llm_refine.report.stats import (
    BETTER,
    NO_PAIRS,
    ONE_SEED,
    VERDICT_RULE,
    WITHIN_NOISE,
    WORSE,
    comparisons,
    headline,
    noise,
    paired_difference,
    verdict_sentence,
)

# ---------------------------------------------------------------------------------------------
# paired_difference on numbers


def test_paired_difference_matches_a_paired_t_test():
    base = {0: 4.00, 1: 4.30, 2: 3.90, 3: 4.10}
    cand = {0: 3.90, 1: 4.10, 2: 3.75, 3: 4.02}
    d = paired_difference(cand, base)
    diffs = [cand[k] - base[k] for k in range(4)]
    assert d.keys == (0, 1, 2, 3) and d.diffs == pytest.approx(diffs)
    assert d.n == 4 and d.mean == pytest.approx(np.mean(diffs)) and d.sd == pytest.approx(np.std(diffs, ddof=1))
    ref = sps.ttest_rel([cand[k] for k in range(4)], [base[k] for k in range(4)]).confidence_interval(0.95)
    assert d.ci == pytest.approx((ref.low, ref.high), rel=1e-12)
    # by hand: t(0.975, 3) = 3.182446305284263
    half = 3.182446305284263 * np.std(diffs, ddof=1) / 2
    assert d.ci == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert d.verdict == BETTER  # the whole interval is below 0
    d90 = paired_difference(cand, base, level=0.9)
    assert d90.ci[1] - d90.ci[0] < d.ci[1] - d.ci[0]


def test_verdicts_and_the_one_seed_path():
    base = {0: 4.0, 1: 4.2, 2: 4.1}
    assert paired_difference({k: v + 0.10 + 0.01 * k for k, v in base.items()}, base).verdict == WORSE
    assert paired_difference({k: v - 0.10 + 0.01 * k for k, v in base.items()}, base).verdict == BETTER
    noisy = paired_difference({0: 4.05, 1: 4.15, 2: 4.12}, base)  # diffs +0.05, -0.05, +0.02
    assert noisy.ci[0] < 0 < noisy.ci[1] and noisy.verdict == WITHIN_NOISE
    one = paired_difference({0: 3.5, 7: 1.0}, {0: 4.0, 5: 2.0})  # only seed 0 is in both
    assert (one.n, one.keys, one.unpaired, one.ci, one.sd) == (1, (0,), (5, 7), None, None)
    assert one.mean == pytest.approx(-0.5) and one.verdict == ONE_SEED == "one seed: no interval"
    none = paired_difference({1: 3.0}, {2: 3.0})
    assert none.n == 0 and none.mean is None and none.verdict == NO_PAIRS
    with pytest.raises(ValueError):
        paired_difference(base, base, level=95)


def test_the_interval_covers_the_truth_95_percent_of_the_time():
    """Simulated experiments: a seed effect shared by both schedules (same init and data order) plus
    independent noise, true difference 0.03, 3 seeds. The paired Student-t interval covers 0.03 in
    95% of experiments; a normal (z) interval would cover ~86%, an unpaired one ~100%."""
    rng = np.random.default_rng(1234)
    reps, n, truth = 4000, 3, 0.03
    covered = 0
    for _ in range(reps):
        seed_effect = rng.normal(0, 0.2, n)
        base = {s: 4.0 + seed_effect[s] + rng.normal(0, 0.02) for s in range(n)}
        cand = {s: 4.0 + truth + seed_effect[s] + rng.normal(0, 0.02) for s in range(n)}
        lo, hi = paired_difference(cand, base).ci
        covered += lo <= truth <= hi
    assert 0.94 <= covered / reps <= 0.96, covered / reps


# ---------------------------------------------------------------------------------------------
# Synthetic run directories with known differences

TRUE = {"refined": -0.05, "cosine": +0.04, "wsd": 0.0}


def make_seeded(out, *, seeds=range(5), size="cpu-0.5m", val_se=0.002, sequences=48, true=TRUE, lr_multiplier=None,
                lr_tag=""):
    """Per seed a shared seed effect (sd 0.1) for every schedule, plus a schedule's true difference to
    linear and a small independent noise (sd 0.005). eval.json carries the validation SE."""
    rng = np.random.default_rng(7)
    effect = rng.normal(0, 0.1, max(seeds) + 1)
    for sched, delta in {"linear": 0.0, **true}.items():
        for seed in seeds:
            loss = 4.0 + effect[seed] + delta + rng.normal(0, 0.005)
            rd = make_run(out / size / f"{sched}{lr_tag}-seed{seed}", size=size, schedule=sched, seed=seed, loss=loss,
                          lr_multiplier=lr_multiplier, lr=1e-3 * (lr_multiplier or 1.0))
            (rd / "eval.json").write_text(json.dumps({
                "val_loss": loss, "perplexity": math.exp(loss), "tokens": sequences * 31, "sequences": sequences,
                "val_loss_se": val_se, "val_loss_se_tokens": val_se / 3}))
    return out


def test_verdicts_on_run_dirs_with_known_differences(tmp_path):
    runs = collect_runs([make_seeded(tmp_path)])
    heads = headline(runs)
    for sched, truth in TRUE.items():
        d = heads[("cpu-0.5m", sched)].diff
        assert d.n == 5 and d.ci[0] <= truth <= d.ci[1]  # the interval covers the truth
        assert d.mean == pytest.approx(truth, abs=0.01)
    assert heads[("cpu-0.5m", "refined")].diff.verdict == BETTER
    assert heads[("cpu-0.5m", "cosine")].diff.verdict == WORSE
    assert heads[("cpu-0.5m", "wsd")].diff.verdict == WITHIN_NOISE
    # Pairing matters: the seed effect (sd 0.1) is larger than every difference, so an unpaired
    # comparison of the same numbers could not tell refined from linear.
    lin = [r.final_val_loss for r in runs if r.schedule == "linear"]
    ref = [r.final_val_loss for r in runs if r.schedule == "refined"]
    assert sps.ttest_ind(ref, lin).pvalue > 0.05
    s = verdict_sentence(runs, "cpu-0.5m")
    assert s.startswith("cpu-0.5m: refined is better than linear (Δ -0.0")
    assert "cosine is worse than linear" in s and "wsd is within noise" in s and "5 seeds" in s


def test_report_puts_the_verdict_first_and_states_the_rule(tmp_path):
    make_seeded(tmp_path)
    build_report(collect_runs([tmp_path]), tmp_path)
    md = (tmp_path / "report.md").read_text()
    heads = re.findall(r"^## (.+)$", md, flags=re.M)
    assert heads[:3] == ["Verdict", "Final validation loss", "Validation noise"]
    assert "Size cpu-0.5m" in heads and heads[-1] == "Runs"
    verdict = md.split("## Verdict", 1)[1].split("## ", 1)[0]
    assert "- cpu-0.5m: refined is better than linear" in verdict and VERDICT_RULE in verdict
    # the per-seed table: seeds 0..4, every schedule's loss and its Δ to linear
    per_seed = md.split("### Final validation loss per seed", 1)[1]
    assert "| seed | linear | refined | cosine | wsd | Δ refined | Δ cosine | Δ wsd |" in per_seed
    assert sum(1 for line in per_seed.splitlines() if re.match(r"\| [0-4] \| 3\.|\| [0-4] \| 4\.", line)) == 5
    # every cell's paired difference, with its interval and verdict
    assert re.search(r"\| cpu-0\.5m \| refined \| lr 0\.001 \| lr 0\.001 \| 0, 1, 2, 3, 4 \| .+ \| -0\.0\d+ \| 0\.\d+ \| \[-0\.\d+, -0\.\d+\] \| better \|", md)


def test_one_seed_says_no_interval(tmp_path):
    make_seeded(tmp_path, seeds=[0])
    runs = collect_runs([tmp_path])
    assert all(c.diff.verdict == ONE_SEED for c in comparisons(runs))
    s = verdict_sentence(runs, "cpu-0.5m")
    assert s.startswith("cpu-0.5m: one seed, so no interval and no verdict for refined, cosine, wsd (observed Δ vs linear: refined -0.0")
    build_report(runs, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "one seed: no interval" in md and "one seed: not measured" in md  # no seed sd either
    tables = md.split("## Final validation loss", 1)[1].split("## Validation noise")[0]
    assert not re.search(r"\] (better|worse|within noise)|\| (better|worse|within noise) \|", tables)
    assert tables.count("| — | one seed: no interval |") == 3  # no interval, no verdict


def test_lr_sweep_pairs_by_seed_and_lr(tmp_path):
    make_seeded(tmp_path, seeds=[0, 1, 2], lr_multiplier=1.0, lr_tag="-lr1", true={"cosine": 0.04})
    make_seeded(tmp_path, seeds=[0, 1, 2], lr_multiplier=2.0, lr_tag="-lr2", true={"cosine": -0.03})
    runs = collect_runs([tmp_path])
    by_lr = {c.lr: c for c in comparisons(runs)}
    assert set(by_lr) == {1.0, 2.0}
    for lr, truth in ((1.0, 0.04), (2.0, -0.03)):
        c = by_lr[lr]
        assert c.baseline_lr == lr and c.diff.keys == (0, 1, 2)
        assert c.diff.mean == pytest.approx(truth, abs=0.015)
        assert {r.lr_multiplier for r in c.baseline.runs} == {lr}
    # the headline compares cosine at its best LR with linear at that LR
    h = headline(runs)[("cpu-0.5m", "cosine")]
    assert h.lr == h.baseline_lr


def test_validation_noise_against_seed_noise(tmp_path):
    make_seeded(tmp_path / "ok", val_se=0.002)
    make_seeded(tmp_path / "noisy", val_se=0.08)
    ok, noisy = (noise(collect_runs([tmp_path / d]), "cpu-0.5m") for d in ("ok", "noisy"))
    lin = [r.final_val_loss for r in collect_runs([tmp_path / "ok"]) if r.schedule == "linear"]
    assert ok.seed_df == 4 * 4 and ok.seed_sd == pytest.approx(np.std(lin, ddof=1), rel=0.3)  # pooled over 4 schedules
    assert ok.val_se == 0.002 and not ok.too_noisy and ok.val_sequences == 48
    assert noisy.too_noisy and noisy.ratio == pytest.approx(0.08 / noisy.seed_sd)
    # SE ~ 1/sqrt(sequences): this many sequences bring it to a third of the seed sd
    need = noisy.sequences_needed
    assert 0.08 * math.sqrt(48 / need) <= noisy.seed_sd / 3 < 0.08 * math.sqrt(48 / (need - 1))
    build_report(collect_runs([tmp_path / "noisy"]), tmp_path / "noisy")
    md = (tmp_path / "noisy" / "report.md").read_text()
    verdict = md.split("## Verdict", 1)[1].split("## Final", 1)[0]
    assert "enlarge data.val_sequences" in verdict and f"to about {need} or more" in verdict
    build_report(collect_runs([tmp_path / "ok"]), tmp_path / "ok")
    md_ok = (tmp_path / "ok" / "report.md").read_text()
    assert "enlarge data.val_sequences" not in md_ok
    assert "| cpu-0.5m | 48 sequences, 1488 predicted tokens | 0.00200 | 0.00067 |" in md_ok


def test_old_eval_files_without_se_say_not_recorded(tmp_path):
    make_run(tmp_path / "linear-seed0", seed=0, eval_loss=4.0)
    make_run(tmp_path / "linear-seed1", seed=1, eval_loss=4.1)
    runs = collect_runs([tmp_path])
    assert noise(runs, "cpu-0.5m").val_se is None
    build_report(runs, tmp_path)
    assert "not recorded" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# The report's paths


def test_report_has_no_absolute_paths(tmp_path):
    """Runs outside the report folder (compare --out elsewhere), a refined schedule file and a data
    path given as absolute paths: the documents show them relative to the report."""
    src = tmp_path / "sweep"
    make_seeded(src, seeds=[0, 1], true={"refined": -0.05})
    sched_file = src / "cpu-0.5m" / "refined_schedule.json"
    m = np.linspace(1, 0, 40)
    sched_file.write_text(json.dumps({
        "format": "llm-refine/schedule", "version": 1, "multipliers": m.tolist(),
        "provenance": {"source": str(src / "cpu-0.5m" / "linear-seed0" / "gradnorms.jsonl"), "norm": "l1", "tau": 0.1},
        "diagnostics": {"degenerate": False, "warmup_steps": 0, "peak_step": 0}, "fit": {"warmup_fraction": 0.0}}))
    for cfg_file in src.glob("cpu-0.5m/*/run_config.json"):
        cfg = json.loads(cfg_file.read_text())
        if cfg["schedule"]["name"] == "refined":
            cfg["schedule"]["file"] = str(sched_file)
        cfg["data"]["path"] = str(tmp_path / "corpus")
        cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "elsewhere" / "report"
    assert main_compare(argparse.Namespace(dirs=[str(src)], out=str(out), title=None)) == 0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for doc in (md, page):
        assert str(tmp_path) not in doc and "file://" not in doc
        assert not re.search(r"(?<![\w.])/(tmp|home|root|work)/", doc)
    assert "../../sweep/cpu-0.5m/refined_schedule.json" in md  # the refinement table
    assert "| ../../sweep/cpu-0.5m/linear-seed0 |" in md  # the runs table
    assert "path=../../corpus" in md
    assert page.count("data:image/png;base64,") == len(re.findall(r"!\[[^]]*\]\(plots/[^)]+\.png\)", md)) >= 4
    assert "<style>" in page and "<link" not in page and "<script" not in page  # standalone


# ---------------------------------------------------------------------------------------------
# evaluate_checkpoint: the validation estimate's standard error


def test_evaluate_checkpoint_standard_errors(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    import llm_refine.train.data as data_mod
    from llm_refine.train.evaluate import evaluate_checkpoint

    torch.manual_seed(0)
    V, S, L = 64, 21, 9
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=L))
    model.save_pretrained(tmp_path / "checkpoint-1")
    val = np.random.default_rng(0).integers(0, V, size=(S, L)).astype("uint16")
    monkeypatch.setattr(data_mod, "prepare_data", lambda cfg: SimpleNamespace(val=val, vocab_size=V))
    res = evaluate_checkpoint(tmp_path / "checkpoint-1", SimpleNamespace(data=None), batch_size=8, device="cpu")
    assert set(res) == {"val_loss", "perplexity", "tokens", "sequences", "val_loss_se", "val_loss_se_tokens"}
    per_seq = evaluate_checkpoint(tmp_path / "checkpoint-1", SimpleNamespace(data=None), batch_size=8, device="cpu",
                                  sequence_losses=True)
    assert {k: v for k, v in per_seq.items() if k != "sequence_losses"} == res

    # val_loss: exactly the previous computation (the model's batch loss weighted by its tokens)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "checkpoint-1")).eval()
    rows = torch.from_numpy(val.astype("int64"))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, S, 8):
            x = rows[i: i + 8]
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
        # per sequence, alone: its mean token loss
        seq = [float(model(input_ids=rows[i: i + 1], labels=rows[i: i + 1]).loss) for i in range(S)]
        logits = model(input_ids=rows).logits
        tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), rows[:, 1:].reshape(-1), reduction="none")
    assert res["val_loss"] == total / count  # bit-identical
    assert (res["tokens"], res["sequences"]) == (S * (L - 1), S)
    assert res["val_loss_se"] == pytest.approx(np.std(seq, ddof=1) / math.sqrt(S), rel=1e-4)
    assert res["val_loss_se_tokens"] == pytest.approx(tok.double().std().item() / math.sqrt(S * (L - 1)), rel=1e-4)
    assert 0 < res["val_loss_se"] and 0 < res["val_loss_se_tokens"]
    assert per_seq["sequence_losses"] == pytest.approx(seq, rel=1e-5)


def test_heldout_se_of_a_paired_difference(tmp_path):
    """With per-sequence losses in eval.json, the comparison table shows sd(per-sequence Δ) / √S,
    the median over the seed pairs."""
    rng = np.random.default_rng(5)
    S = 40
    level = rng.normal(5.0, 0.5, S)  # sequences differ a lot in difficulty (a large per-run SE) ...
    expected = []
    for seed in (0, 1, 2):
        base = level + rng.normal(0, 0.01, S)
        cand = base - 0.02 + rng.normal(0, 0.01 * (seed + 1), S)  # ... but the difference is small and steady
        expected.append(np.std(cand - base, ddof=1) / math.sqrt(S))
        for sched, xs in (("linear", base), ("cosine", cand)):
            rd = make_run(tmp_path / f"{sched}-seed{seed}", schedule=sched, seed=seed, loss=float(xs.mean()))
            (rd / "eval.json").write_text(json.dumps({
                "val_loss": float(xs.mean()), "tokens": S * 31, "sequences": S, "sequence_losses": xs.tolist(),
                "val_loss_se": float(np.std(xs, ddof=1) / math.sqrt(S))}))
    runs = collect_runs([tmp_path])
    (cmp,) = comparisons(runs)
    assert cmp.heldout_se() == pytest.approx(float(np.median(expected)))
    assert cmp.heldout_se() < 0.1 * noise(runs, "cpu-0.5m").val_se
    build_report(runs, tmp_path)
    row = next(ln for ln in (tmp_path / "report.md").read_text().splitlines() if ln.startswith("| cpu-0.5m | cosine | lr"))
    assert row.endswith(f"| {np.median(expected):.5f} |")


def _paired_runs(root, *, seq_noise, seed_effect, S=64):
    """linear and cosine at seeds 0..3 on the same S sequences: sequences differ a lot in difficulty
    (a large level SE); Δ = cosine − linear has a per-seed part (sd `seed_effect`) and a per-sequence
    part (sd `seq_noise`)."""
    rng = np.random.default_rng(11)
    level = rng.normal(5.0, 0.5, S)
    for seed in range(4):
        base = level + rng.normal(0, 0.001, S)
        cand = base + 0.03 + rng.normal(0, seed_effect) + rng.normal(0, seq_noise, S)
        for sched, xs in (("linear", base), ("cosine", cand)):
            rd = make_run(root / f"{sched}-seed{seed}", schedule=sched, seed=seed, loss=float(xs.mean()))
            (rd / "eval.json").write_text(json.dumps({
                "val_loss": float(xs.mean()), "tokens": S * 63, "sequences": S, "sequence_losses": xs.tolist(),
                "val_loss_se": float(np.std(xs, ddof=1) / math.sqrt(S))}))
    return collect_runs([root])


def test_heldout_set_is_judged_by_the_paired_differences_when_recorded(tmp_path):
    """Levels: the SE of one run's loss (~0.5/√64) dwarfs the seed sd, so a level yardstick would ask for
    a held-out set far beyond the corpus; but the verdicts rest on paired Δs, whose held-out share is
    sd(per-sequence Δ)/√S, small against the sd of Δ over seeds: no warning. When the per-sequence part
    dominates the seed part instead, the paired yardstick warns."""
    runs = _paired_runs(tmp_path / "ample", seq_noise=0.01, seed_effect=0.02)
    nz = noise(runs, "cpu-0.5m")
    assert nz.ratio > 1 and nz.judged_by == "paired" and not nz.too_noisy
    (cmp,) = comparisons(runs)
    assert nz.paired_se == pytest.approx(cmp.heldout_se()) and nz.paired_sd == pytest.approx(cmp.diff.sd)
    assert nz.paired_ratio == pytest.approx(nz.paired_se / nz.paired_sd) and nz.paired_ratio < 1 / 3
    build_report(runs, tmp_path / "ample")
    md = (tmp_path / "ample" / "report.md").read_text()
    assert "enlarge data.val_sequences" not in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| cpu-0.5m | 64 sequences"))
    assert row.endswith("| yes, for the paired Δs |") and f"| {nz.paired_ratio:.2f} |" in row

    runs = _paired_runs(tmp_path / "small", seq_noise=0.4, seed_effect=0.001)
    nz = noise(runs, "cpu-0.5m")
    assert nz.judged_by == "paired" and nz.too_noisy and nz.sequences_needed > 64
    build_report(runs, tmp_path / "small")
    verdict = (tmp_path / "small" / "report.md").read_text().split("## Verdict", 1)[1].split("## Final", 1)[0]
    assert "held-out share of the paired Δs' noise" in verdict and f"to about {nz.sequences_needed} or more" in verdict


def test_verdict_leads_with_the_tuned_comparison_when_the_best_lrs_differ(tmp_path):
    """linear is best at ×2, wsd at ×1: the sentence gives wsd(×1) vs linear(×2) first (what a user
    would train), then the same-LR comparison at ×1; refined, best at ×2 like linear, keeps one."""
    losses = {("linear", 1.0): 3.90, ("linear", 2.0): 3.80, ("wsd", 1.0): 3.78, ("wsd", 2.0): 3.85,
              ("refined", 1.0): 4.00, ("refined", 2.0): 3.95}
    for (sched, m), base in losses.items():
        for seed in (0, 1, 2):
            make_run(tmp_path / f"{sched}-lr{m:g}-seed{seed}", schedule=sched, seed=seed, lr_multiplier=m,
                     lr=1e-3 * m, loss=base + 0.01 * seed + (0.002 * seed if sched == "wsd" else 0.0))
    runs = collect_runs([tmp_path])
    sentence = verdict_sentence(runs, "cpu-0.5m")
    tuned = re.search(r"wsd at its best lr×1 vs linear at its best lr×2 is (.*?) \(Δ ([-+.0-9]+),", sentence)
    assert tuned and tuned.group(1) == "better than linear" and float(tuned.group(2)) == pytest.approx(-0.02 + 0.002)
    same = re.search(r"at the same lr×1 it is better than linear \(Δ ([-+.0-9]+),", sentence)
    assert same and float(same.group(1)) == pytest.approx(-0.12 + 0.002)
    assert "refined at lr×2 is worse than linear (Δ +0.1500" in sentence


def test_edge_cases_say_what_is_missing(tmp_path):
    make_run(tmp_path / "a" / "cosine", schedule="cosine", seed=0)  # no linear at this size
    make_run(tmp_path / "b" / "linear", size="cpu-2m", schedule="linear", seed=0, lr_multiplier=1.0)
    make_run(tmp_path / "b" / "cosine", size="cpu-2m", schedule="cosine", seed=0, loss=4.2, lr=2e-3, lr_multiplier=2.0)
    make_run(tmp_path / "c" / "linear", size="cpu-8m", schedule="linear", seed=0, marker=False)
    make_run(tmp_path / "c" / "wsd", size="cpu-8m", schedule="wsd", seed=1, marker=False)
    runs = collect_runs([tmp_path])
    assert verdict_sentence(runs, "cpu-0.5m") == "cpu-0.5m: no linear run, so nothing is compared."
    # linear ran at one LR only: cosine at lr×2 is paired with it, and the sentence says so
    assert verdict_sentence(runs, "cpu-2m") == ("cpu-2m: one seed, so no interval and no verdict for cosine "
                                                "(observed Δ vs linear: cosine at lr×2 (vs linear at lr×1) +0.2000).")
    assert verdict_sentence(runs, "cpu-8m") == "cpu-8m: wsd has no seed in common with linear."
    by = {(c.size, c.schedule): c for c in comparisons(runs)}
    assert by[("cpu-0.5m", "cosine")].baseline is None and by[("cpu-0.5m", "cosine")].diff.verdict == NO_PAIRS
    assert by[("cpu-8m", "wsd")].diff.unpaired == (0, 1)
