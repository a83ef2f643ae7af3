import math

import numpy as np
import pytest
import torch

from llm_refine.artifact import make_schedule_artifact, write_schedule
from llm_refine.errors import UserError
from llm_refine.schedules import (
    ScheduleConfig,
    constant,
    cosine,
    inverse_sqrt,
    lambda_lr,
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
        ScheduleConfig(name="cosin")
    with pytest.raises(UserError, match="unknown schedule option"):
        ScheduleConfig.from_dict({"name": "linear", "warmup": 3})
    with pytest.raises(UserError, match="needs file"):
        ScheduleConfig(name="refined")
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
    cfg = ScheduleConfig(name=name, warmup_steps=5)
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
