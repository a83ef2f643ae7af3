import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import scipy.ndimage

from llm_refine import refine_schedule
from llm_refine.errors import UserError
from llm_refine.history import load_trace
from llm_refine.refine import (
    RefinementWarning,
    describe_schedule,
    fit_warmup_poly,
    fitted_multiplier,
    median_width,
    prepare_norms,
    refine_trace,
    schedule_from_weights,
    smooth_norms,
)


def direct_schedule(norms, power):
    """O(T^2) evaluation of η_t ∝ w_t Σ_{p>t} w_p straight from the formula."""
    w = [n ** -power for n in norms]
    T = len(w)
    eta = [w[t] * sum(w[p] for p in range(t + 1, T)) for t in range(T)]
    top = max(eta)
    return np.array([e / top for e in eta])


@pytest.mark.parametrize("T", [5, 6, 10, 101, 1000])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_constant_norms_give_exact_linear_decay(T, norm):
    m = refine_schedule(np.full(T, 3.7), norm=norm)
    expected = (T - 1 - np.arange(T)) / (T - 1)
    np.testing.assert_allclose(m, expected, rtol=0, atol=1e-12)
    assert m[-1] == 0.0 and m[0] == 1.0


positive_norms = arrays(np.float64, st.integers(5, 60), elements=st.floats(1e-3, 1e3, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(norms=positive_norms, norm=st.sampled_from(["l1", "l2"]), tau=st.sampled_from([0.0, 0.1, 0.3]))
def test_properties(norms, norm, tau):
    m = refine_schedule(norms, norm=norm, tau=tau)
    assert m.shape == norms.shape
    assert np.all(m >= 0) and np.all(m <= 1)
    assert m.max() == 1.0
    assert m[-1] == 0.0


@settings(max_examples=40, deadline=None)
@given(norms=positive_norms, scale=st.floats(1e-3, 1e3), norm=st.sampled_from(["l1", "l2"]))
def test_invariant_to_scaling_all_norms(norms, scale, norm):
    np.testing.assert_allclose(refine_schedule(norms * scale, norm=norm), refine_schedule(norms, norm=norm), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(norms=positive_norms, norm=st.sampled_from(["l1", "l2"]))
def test_matches_direct_quadratic_evaluation(norms, norm):
    power = 1.0 if norm == "l1" else 2.0
    np.testing.assert_allclose(refine_schedule(norms, norm=norm, tau=0), direct_schedule(list(norms), power), rtol=1e-9, atol=1e-12)


def test_explicit_power_overrides_norm():
    n = np.linspace(1, 5, 20)
    np.testing.assert_allclose(refine_schedule(n, norm="l1", power=2.0, tau=0), refine_schedule(n, norm="l2", tau=0))
    np.testing.assert_allclose(refine_schedule(n, power=0.5, tau=0), direct_schedule(list(n), 0.5), rtol=1e-9)


def test_l1_and_l2_weights_differ_as_documented():
    n = np.array([1.0, 2.0, 4.0, 2.0, 1.0, 3.0])
    np.testing.assert_allclose(refine_schedule(n, norm="l1", tau=0), direct_schedule(list(n), 1.0), rtol=1e-12)
    np.testing.assert_allclose(refine_schedule(n, norm="l2", tau=0), direct_schedule(list(n), 2.0), rtol=1e-12)


@pytest.mark.parametrize("T,tau,width", [(1000, 0.1, 101), (999, 0.1, 99), (10, 0.1, 1), (10, 0.0, 1), (25000, 0.1, 2501), (7, 0.5, 3)])
def test_median_width(T, tau, width):
    assert median_width(T, tau) == width


def paper_smoothing(x, tau):
    """The paper's recipe, literally: reflect-pad the end by 2·width, filter, cut off."""
    width = median_width(x.size, tau)
    padded = np.pad(x, (0, 2 * width), mode="reflect")
    return scipy.ndimage.median_filter(padded, size=width, mode="nearest")[: x.size]


@settings(max_examples=40, deadline=None)
@given(norms=arrays(np.float64, st.integers(5, 400), elements=st.floats(1e-3, 1e3)), tau=st.sampled_from([0.05, 0.1, 0.3, 0.9]))
def test_smoothing_equals_literal_paper_padding(norms, tau):
    np.testing.assert_array_equal(smooth_norms(norms, tau), paper_smoothing(norms, tau))


def test_smoothing_start_is_edge_repeated_and_end_reflected():
    x = np.array([10.0, 1, 2, 3, 4, 5, 6, 7, 8, 100.0])
    s = smooth_norms(x, tau=0.3)  # width 3
    # start: window [10, 10, 1] -> 10 (edge repeat); end: window [8, 100, 8] -> 8 (reflection)
    assert s[0] == 10.0 and s[-1] == 8.0
    np.testing.assert_array_equal(s[1:-1], np.median(np.lib.stride_tricks.sliding_window_view(x, 3), axis=1))


def test_tau_zero_disables_smoothing():
    x = np.array([1.0, 5.0, 1.0, 5.0, 1.0, 5.0])
    np.testing.assert_array_equal(smooth_norms(x, 0.0), x)


def test_spike_is_removed_by_smoothing():
    x = np.ones(200)
    x[100] = 1e6
    m = refine_schedule(x, tau=0.1)
    np.testing.assert_allclose(m, (199 - np.arange(200)) / 199, atol=1e-12)


def test_gaps_are_filled_by_interpolation():
    steps = np.arange(10, 1001, 10)
    vals = 1.0 + steps / 100.0
    s, v, rep = prepare_norms(steps, vals)
    np.testing.assert_array_equal(s, np.arange(10, 1001))
    np.testing.assert_allclose(v, 1.0 + s / 100.0)
    assert rep["filled"] == 991 - 100 and rep["T"] == 991
    assert refine_schedule(vals, steps=steps).size == 991


def test_duplicates_keep_last_record_with_warning():
    steps = np.array([0, 1, 2, 3, 4, 5, 3, 4, 5, 6])
    vals = np.array([1, 1, 1, 9, 9, 9, 2, 2, 2, 2.0])
    with pytest.warns(RefinementWarning, match="duplicated"):
        s, v, rep = prepare_norms(steps, vals)
    np.testing.assert_array_equal(s, np.arange(7))
    np.testing.assert_array_equal(v, [1, 1, 1, 2, 2, 2, 2])
    assert rep["duplicates"] == 3


def test_unsorted_steps_error():
    with pytest.raises(UserError, match="not in increasing order"):
        prepare_norms([0, 1, 3, 2, 4, 5], np.ones(6))


def test_nonfinite_dropped_counted_and_filled():
    vals = np.array([1.0, 2.0, np.inf, 4.0, np.nan, 6.0, 7.0])
    with pytest.warns(RefinementWarning, match="2 non-finite"):
        s, v, rep = prepare_norms(np.arange(7), vals)
    assert rep["dropped_nonfinite"] == 2
    np.testing.assert_allclose(v, [1, 2, 3, 4, 5, 6, 7])


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_nonpositive_norms_error(bad):
    vals = np.ones(10)
    vals[3] = bad
    with pytest.raises(UserError, match="not positive"):
        refine_schedule(vals)


def test_too_few_points_error():
    with pytest.raises(UserError, match="at least 5"):
        refine_schedule([1.0, 2.0, 3.0])


def test_bad_arguments():
    with pytest.raises(UserError, match="norm must be"):
        refine_schedule(np.ones(10), norm="linf")
    with pytest.raises(UserError, match="tau"):
        refine_schedule(np.ones(10), tau=-0.1)
    with pytest.raises(UserError, match="power"):
        refine_schedule(np.ones(10), power=0)


def test_schedule_from_weights_tail_sum_exact_near_end():
    # Huge early weights, tiny late ones: total - cumsum would cancel to 0 at the end.
    w = np.concatenate([np.full(5, 1e12), np.full(5, 1.0)])
    m = schedule_from_weights(w)
    assert m[-2] > 0 and m[-1] == 0
    np.testing.assert_allclose(m[5:9] / m[5], [1, 3 / 4, 2 / 4, 1 / 4])


def test_describe_linear_decay():
    T = 1001
    d = describe_schedule((T - 1 - np.arange(T)) / (T - 1))
    assert d["peak_step"] == 0 and d["warmup_steps"] == 0
    assert d["above_half_fraction"] == pytest.approx(0.5, abs=0.002)
    assert d["final_anneal_steps"] == 500
    assert not d["degenerate"]


def test_degenerate_refinement_is_flagged():
    # Norms that collapse late (an over-fitting model): w = 1/n explodes at the end.
    t = np.linspace(0, 1, 2000)
    norms = np.exp(-12 * t**2)
    from llm_refine.history import NormTrace

    trace = NormTrace(np.arange(2000), norms, "overfit.jsonl", "l1")
    with pytest.warns(RefinementWarning, match="degenerate refinement"):
        m, info = refine_trace(trace, norm="l1")
    assert info["diagnostics"]["degenerate"]
    assert info["diagnostics"]["peak_fraction"] > 0.75


def test_fit_recovers_known_shape():
    T = 3000
    fit_true = {"warmup_fraction": 0.1, "power": 2.0, "start": 0.2}
    m = np.array([fitted_multiplier(s, T, fit_true) for s in range(T)])
    fit = fit_warmup_poly(m)
    assert fit["warmup_fraction"] == pytest.approx(0.1, abs=0.005)
    assert fit["power"] == pytest.approx(2.0, rel=0.02)
    assert fit["r2"] > 0.999


def test_fit_of_linear_decay():
    T = 500
    fit = fit_warmup_poly((T - 1 - np.arange(T)) / (T - 1))
    assert fit["warmup_fraction"] == pytest.approx(0.0, abs=0.01)
    assert fit["power"] == pytest.approx(1.0, rel=0.02)
    assert fit["r2"] > 0.999


# --- the paper authors' real traces (skipped when ../shared is absent) ------------------------


def test_roberta_l1_trace_has_warmup_and_final_anneal(traces_dir):
    trace = load_trace(traces_dir / "roberta_l1.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefinementWarning)
        m, info = refine_trace(trace, norm="l1", tau=0.1)
    d = info["diagnostics"]
    assert m.size == 25000
    assert d["peak_step"] > 0 and m[0] < 0.5  # a warm-up emerges by itself
    assert d["final_anneal_fraction"] < 0.3  # anneal faster than linear decay's last half
    assert not d["degenerate"]


def test_imagenet_trace_every_10_steps_yields_one_entry_per_step(traces_dir):
    trace = load_trace(traces_dir / "imagenet_gnorm.csv")
    assert trace.steps[1] - trace.steps[0] == 10
    m, info = refine_trace(trace, norm="l2")
    assert m.size == 500500 - 10 + 1
    assert info["prep"]["filled"] == m.size - 50050


def test_vit_trace_with_gaps(traces_dir):
    m, info = refine_trace(load_trace(traces_dir / "vit_l1.csv"), norm="l1")
    assert m.size == 45140 and info["prep"]["filled"] == 45140 - 35352
    assert m.max() == 1.0 and m[-1] == 0.0


# --- issue #12: scale invariance in floating point; messages --------------------------------


@pytest.mark.parametrize("scale,norm", [(1e308, "l1"), (1e308, "l2"), (1e-300, "l1"), (1e-300, "l2"), (1e100, "l2"), (1e-310, "l1"), (5e-324, "l2")])
def test_extreme_constant_norms_still_give_linear_decay(scale, norm):
    T = 200
    m = refine_schedule(np.full(T, scale), norm=norm)
    np.testing.assert_allclose(m, (T - 1 - np.arange(T)) / (T - 1), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(norms=positive_norms, exp=st.sampled_from([-1000, -600, -300, 300, 600, 1000]), norm=st.sampled_from(["l1", "l2"]))
def test_invariant_to_power_of_two_scaling_over_the_whole_range(norms, exp, norm):
    scaled = np.ldexp(norms, exp)
    if not np.all(np.isfinite(scaled)) or np.any(scaled == 0) or np.any(np.abs(np.ldexp(scaled, -exp) - norms) > 0):
        return  # out of float64's range (or subnormal rounding): not the same input
    np.testing.assert_allclose(refine_schedule(scaled, norm=norm), refine_schedule(norms, norm=norm), rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(norms=arrays(np.float64, st.integers(5, 300), elements=st.floats(1e-6, 1e6)), norm=st.sampled_from(["l1", "l2"]), tau=st.sampled_from([0.0, 0.1]))
def test_ordinary_norms_are_bit_for_bit_the_plain_formula(norms, norm, tau):
    p = 1.0 if norm == "l1" else 2.0
    plain = schedule_from_weights(np.power(smooth_norms(norms, tau), -p))
    np.testing.assert_array_equal(refine_schedule(norms, norm=norm, tau=tau), plain)


def test_messages_name_the_source_and_plain_numbers():
    with pytest.raises(UserError, match=r"run\.csv: refinement produced no positive learning rate"):
        schedule_from_weights(np.zeros(6), source="run.csv")
    with pytest.raises(UserError) as e:
        prepare_norms(np.arange(6), np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]), source="h.csv")
    assert "norm 0.0 at step 2" in str(e.value) and "np.float64" not in str(e.value)


def test_step_jump_is_capped_with_a_clear_message():
    with pytest.raises(UserError, match=r"0 to 1000000000000 .* limit of 100,000,000 steps"):
        prepare_norms(np.array([0, 1, 2, 3, 10**12]), np.ones(5), source="h.csv")


def test_all_steps_skipped_says_so():
    from llm_refine.history import NormTrace

    tr = NormTrace(np.zeros(0, np.int64), np.zeros(0), "g.jsonl", "l1", {}, skipped_steps=40)
    with pytest.raises(UserError, match="40 step\\(s\\) were skipped by the engine") as e:
        refine_trace(tr)
    assert "record a longer run" not in str(e.value)


def test_early_anneal_diagnostic_on_a_rising_trace_and_the_gpt_trace(traces_dir):
    """Rising norms after the transient make the refined schedule anneal early: the diagnostic says
    so, with the project's measured numbers; the authors' GPT trace (falls, then rises ~17%) gets a
    long warm-up and a near-linear decay, and no warning."""
    from llm_refine.history import load_trace
    from llm_refine.refine import early_anneal_message, refine_trace

    T = 2000
    t = np.arange(T)
    rising = np.where(t < 100, 3.0 - t / 50, 1.0 + 1.3 * (t - 100) / (T - 100))  # fall, then x2.3
    m = refine_schedule(rising, norm="l1", tau=0.1)
    from llm_refine.refine import describe_schedule, smooth_norms

    d = describe_schedule(m, norms=smooth_norms(rising, 0.1))
    assert d["norm_rise_after_min"] == pytest.approx(2.2, rel=0.1) and d["norm_min_fraction"] < 0.1
    assert d["lr_area_vs_linear"] < 0.9 and d["anneals_early"]
    msg = early_anneal_message(d)
    assert "anneals early" in msg and "+0.11 (+0.02 to +0.20)" in msg and "1.40x" in msg and "1.69x" in msg
    flat = describe_schedule(refine_schedule(np.ones(T), tau=0.1), norms=np.ones(T))
    assert flat["lr_area_vs_linear"] == pytest.approx(1.0, abs=0.01) and not flat["anneals_early"]

    gpt = load_trace(traces_dir / "more" / "gpt.csv", norm="l1")
    _, info = refine_trace(gpt, norm="l1", tau=0.1)
    g = info["diagnostics"]
    assert 0.2 < g["norm_min_fraction"] < 0.45 and 1.05 < g["norm_rise_after_min"] < 1.3
    assert g["lr_area_vs_linear"] > 1.0 and not g["anneals_early"]


def test_show_says_when_a_schedule_anneals_early(tmp_path, capsys):
    from llm_refine.cli import main
    from llm_refine.history import write_history

    T = 400
    t = np.arange(T)
    vals = np.where(t < 20, 3.0 - t / 10, 1.0 + 1.3 * (t - 20) / (T - 20))
    h = tmp_path / "h.jsonl"
    write_history(h, [{"step": i, "l1": float(v), "l2": float(v)} for i, v in enumerate(vals)])
    out = tmp_path / "s.json"
    assert main(["refine", str(h), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "  trend      norms: minimum at" in text and "anneals early" in text
