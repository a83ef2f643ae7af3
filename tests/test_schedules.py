import math

import numpy as np
import pytest
import torch

from llm_refine.artifact import make_schedule_artifact, write_schedule
from llm_refine.errors import UserError
from llm_refine.lr_schedulers import lambda_lr
from llm_refine.schedules import (
    SCHEDULES as SCHEDULE_NAMES,
    ScheduleConfig,
    constant,
    cosine,
    inverse_sqrt,
    linear_decay,
    make_schedule,
    polynomial,
    refined,
    wsd,
)

T = 100


def values(fn, total=T, **kw):
    return np.array([fn(s, total, **kw) for s in range(total)])


@pytest.mark.parametrize(
    "fn,kw",
    [
        (constant, {}),
        (linear_decay, {}),
        (linear_decay, {"min_ratio": 0.1}),
        (cosine, {"min_ratio": 0.1}),
        (polynomial, {"power": 2.0}),
        (wsd, {"decay_shape": "1-sqrt"}),
        (inverse_sqrt, {}),
        (refined, {"multipliers": [0.5, 1.0, 0.0]}),
    ],
)
@pytest.mark.parametrize("warmup", [0, 10])
def test_all_schedules_in_unit_interval(fn, kw, warmup):
    v = values(fn, warmup=warmup, **kw)
    assert np.all(v >= 0) and np.all(v <= 1)
    if warmup:
        np.testing.assert_allclose(v[:10] / (1 if fn is not refined else np.array([refined(s, T, multipliers=kw["multipliers"]) for s in range(10)])), (np.arange(10) + 1) / 11)


def test_linear_decay_values():
    assert linear_decay(0, 100) == 1.0
    assert linear_decay(50, 100) == 0.5
    assert linear_decay(99, 100) == pytest.approx(0.01)
    assert linear_decay(100, 100) == 0.0  # past the end: stays at the floor
    assert linear_decay(60, 100, warmup=20) == pytest.approx(0.5)
    assert linear_decay(100, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_cosine_values():
    assert cosine(0, 100) == 1.0
    assert cosine(50, 100) == pytest.approx(0.5)
    assert cosine(100, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_polynomial_power():
    assert polynomial(50, 100, power=2.0) == pytest.approx(0.25)
    assert polynomial(50, 100, power=1.0) == pytest.approx(linear_decay(50, 100))


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd(shape, mid):
    v = values(wsd, total=100, decay_fraction=0.2, decay_shape=shape, warmup=5)
    assert np.all(v[5:80] == 1.0)
    assert v[-1] == pytest.approx(0.0)
    assert wsd(89, 100, decay_fraction=0.2, decay_shape=shape) == pytest.approx(mid)
    assert np.all(np.diff(v[80:]) <= 0)
    with pytest.raises(ValueError):
        wsd(0, 10, decay_shape="exp")


def test_inverse_sqrt():
    assert inverse_sqrt(3, 100, warmup=4) == pytest.approx(0.8)  # still warming up
    assert inverse_sqrt(4, 100, warmup=4) == 1.0
    assert inverse_sqrt(16, 100, warmup=4) == pytest.approx(0.5)
    assert inverse_sqrt(4, 100) == pytest.approx(0.5)
    assert inverse_sqrt(16, 100, timescale=1) == pytest.approx(0.25)


def test_refined_resamples_over_normalized_time():
    src = (9 - np.arange(10)) / 9  # linear decay on 10 steps
    # on 1000 steps it is still linear decay from 1 to 0
    v = values(refined, total=1000, multipliers=src)
    np.testing.assert_allclose(v, (999 - np.arange(1000)) / 999, atol=1e-12)
    # same length: identity
    np.testing.assert_allclose(values(refined, total=10, multipliers=src), src)
    # extra warmup multiplies
    assert refined(0, 10, multipliers=src, warmup=4) == pytest.approx(src[0] / 5)


def test_bad_steps():
    with pytest.raises(ValueError):
        linear_decay(-1, 10)
    with pytest.raises(ValueError):
        cosine(0, 0)


def test_config_validation():
    with pytest.raises(UserError, match="unknown schedule"):
        ScheduleConfig.create("cosin")
    with pytest.raises(UserError, match=r"warmup: unknown key in LinearSchedule; allowed: warmup_steps, warmup_ratio, min_ratio"):
        ScheduleConfig.from_dict({"name": "linear", "warmup": 3})
    with pytest.raises(UserError, match="needs file"):
        ScheduleConfig.create("refined")
    c = ScheduleConfig.from_dict({"name": "cosine", "warmup_ratio": 0.1, "min_ratio": 0.1})
    f = make_schedule(c, total_steps=100)
    assert f(9, 100) == pytest.approx(10 / 11)
    assert f(100, 100) == pytest.approx(0.1)


def _write_refined(tmp_path, m):
    art = make_schedule_artifact(np.asarray(m), provenance={"source": "test"})
    p = tmp_path / "sched.json"
    write_schedule(p, art)
    return p


def test_refined_from_file_and_bad_file(tmp_path):
    p = _write_refined(tmp_path, [0.2, 1.0, 0.5, 0.0])
    f = make_schedule({"name": "refined", "file": str(p)})
    assert f(0, 4) == pytest.approx(0.2) and f(3, 4) == 0.0
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else", "multipliers": [1, 0]}')
    with pytest.raises(UserError, match="not a schedule file"):
        make_schedule({"name": "refined", "file": str(bad)})
    with pytest.raises(UserError, match="no such schedule file"):
        make_schedule({"name": "refined", "file": str(tmp_path / "nope.json")})


@pytest.mark.parametrize("name", ["linear", "cosine", "wsd", "inverse_sqrt", "constant", "polynomial"])
def test_lambda_lr_follows_schedule_and_resumes(name):
    cfg = ScheduleConfig.create(name, warmup_steps=5)
    fn = make_schedule(cfg, 50)

    def run(stop_at=None, state=None):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.3)
        sch = lambda_lr(opt, cfg, 50)
        start = 0
        if state is not None:
            opt.load_state_dict(state[0])
            sch.load_state_dict(state[1])
            start = state[2]
        lrs = []
        for step in range(start, 50):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
            if stop_at is not None and step + 1 == stop_at:
                return lrs, (opt.state_dict(), sch.state_dict(), step + 1)
        return lrs, None

    full, _ = run()
    np.testing.assert_allclose(full, [0.3 * fn(s, 50) for s in range(50)])
    first, state = run(stop_at=17)
    rest, _ = run(state=state)
    np.testing.assert_allclose(first + rest, full)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"name": "cosine", "power": 5}, "power: unknown key in CosineSchedule; allowed: warmup_steps, warmup_ratio, min_ratio"),
        ({"name": "polynomial", "power": -1}, r"power: -1.0 is out of range; allowed: \(0.0, inf\)"),
        ({"name": "wsd", "decay_shape": "zigzag"}, "decay_shape: 'zigzag' is not allowed; choose one of linear, cosine, 1-sqrt"),
        ({"name": "wsd", "decay_fraction": 5}, r"decay_fraction: 5.0 is out of range; allowed: \(0.0, 1.0\]"),
        ({"name": "wsd", "decay_fraction": -1}, r"decay_fraction: -1.0 is out of range"),
        ({"name": "linear", "warmup_steps": 10.5}, "warmup_steps: 10.5 is not an integer"),
        ({"name": "linear", "warmup_steps": True}, "warmup_steps: True is not an integer"),
        ({"name": "linear", "min_ratio": float("nan")}, "min_ratio: nan is not a finite number"),
        ({"name": "refined", "file": "s.json", "min_ratio": 0.1}, "min_ratio: unknown key in RefinedSchedule"),
        ({"name": "inverse_sqrt", "timescale": 0}, "timescale: 0 is out of range"),
    ],
)
def test_schedule_options_are_typed_and_must_apply(raw, message):
    """One class per schedule: wrong types, out-of-range values and options of another schedule are
    errors that name the key, the value and what is allowed."""
    with pytest.raises(UserError, match=message):
        ScheduleConfig.from_dict(raw, where="recipe.yaml")
    with pytest.raises(UserError, match="^recipe.yaml: "):
        ScheduleConfig.from_dict(raw, where="recipe.yaml")


def test_schedule_config_round_trips_and_builds_the_same_function():
    for name in SCHEDULE_NAMES:
        opts = {"file": "x.json"} if name == "refined" else {"warmup_steps": 3}
        c = ScheduleConfig.create(name, **opts)
        assert type(c).name == name and ScheduleConfig.from_dict(c.to_dict()) == c
    c = ScheduleConfig.from_dict({"name": "polynomial", "power": 2, "min_ratio": 0.1, "warmup_steps": 2})
    assert make_schedule(c, 20)(10, 20) == polynomial(10, 20, warmup=2, power=2.0, min_ratio=0.1)
    assert ScheduleConfig.from_dict("cosine") == ScheduleConfig.create("cosine")


def test_transformers_style_factory(tmp_path):
    from llm_refine.lr_schedulers import get_refined_schedule_with_warmup

    p = _write_refined(tmp_path, [0.2, 1.0, 0.5, 0.0])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sch = get_refined_schedule_with_warmup(opt, None, 4, str(p))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([0.02, 0.1, 0.05, 0.0])
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch2 = get_refined_schedule_with_warmup(opt2, 3, 10, "cosine")
    assert opt2.param_groups[0]["lr"] == pytest.approx(cosine(0, 10, warmup=3))
    with pytest.raises(UserError, match="no such schedule file"):
        get_refined_schedule_with_warmup(opt2, 0, 10, str(tmp_path / "missing.json"))
    del sch2
