"""objective.shift: auto (SD3's resolution-dependent time shift): the formula, the same shift in training
and sampling, the config's checks."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.config import ObjectiveConfig
from ldm.objectives import RectifiedFlow, build_objective
from ldm.samplers import sample


def _auto(**kw) -> RectifiedFlow:
    return build_objective(ObjectiveConfig(kind="flow", shift="auto", shift_base=3.0, shift_base_latent=128, **kw))


@pytest.mark.parametrize("hw,expected", [((128, 128), 3.0), ((64, 64), 1.5), ((32, 32), 0.75),
                                         ((64, 128), 3.0 / math.sqrt(2))])
def test_auto_shift_follows_the_token_count(hw, expected):
    obj = _auto()
    # shift_base * sqrt(m / n), m and n the image token counts at patch 2 (the patch cancels)
    m, n = hw[0] * hw[1] / 4, 128 * 128 / 4
    assert obj.shift_for(hw) == pytest.approx(3.0 * math.sqrt(m / n), rel=1e-12)
    assert obj.shift_for(hw) == pytest.approx(expected, rel=1e-12)


def test_256_to_512_continuation_doubles_the_shift():
    obj = build_objective(ObjectiveConfig(kind="flow", shift="auto", shift_base=1.0, shift_base_latent=32))
    assert obj.shift_for((32, 32)) == 1.0 and obj.shift_for((64, 64)) == 2.0


def test_training_and_sampling_use_the_same_shift():
    obj = _auto(time_sampling="uniform")
    for side in (32, 96):
        s = obj.shift_for((side, side))
        x0 = torch.zeros(4096, 1, side, side)
        g = torch.Generator().manual_seed(0)
        t = obj.training_inputs(x0, generator=g).t
        u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(t, RectifiedFlow.shift_time(u, s), atol=1e-6)
        assert torch.allclose(t, RectifiedFlow(time_sampling="uniform", shift=s).sample_t(
            4096, generator=torch.Generator().manual_seed(0)), atol=1e-6)
        times = []

        def model(x, tt, cond):
            times.append(float(tt[0]))
            return torch.zeros_like(x)

        sample("euler", model, obj, torch.zeros(1, 1, side, side), {}, 8)
        want = RectifiedFlow.shift_time(torch.linspace(1, 0, 9, dtype=torch.float64), s).float()
        assert times == pytest.approx(want[:-1].tolist(), abs=1e-6)
        assert torch.allclose(obj.sampling_times(8, latent_hw=(side, side)), want)
    assert obj.sampling_times(8, shift=1.0, latent_hw=(32, 32))[1] == pytest.approx(7 / 8)   # explicit override


def test_fixed_shift_still_works_and_auto_needs_a_size():
    fixed = build_objective(ObjectiveConfig(kind="flow", shift=3.0))
    assert fixed.shift_for() == 3.0 and fixed.shift_for((8, 8)) == 3.0
    with pytest.raises(ValueError, match="latent_hw"):
        _auto().sample_t(4)
    # 2-D toy data (no spatial size) with a fixed shift is unaffected
    assert fixed.training_inputs(torch.zeros(5, 2)).t.shape == (5,)


def test_config_values_are_checked_before_compute():
    from launch.runtime.configio import ConfigError, build_dataclass
    ok = build_dataclass(ObjectiveConfig, {"kind": "flow", "shift": "auto"}, "objective")
    assert ok.shift == "auto"
    assert build_dataclass(ObjectiveConfig, {"kind": "flow", "shift": 3}, "objective").shift == 3.0
    with pytest.raises(ConfigError, match=r"objective\.shift.*'fast'.*float \| 'auto'"):
        build_dataclass(ObjectiveConfig, {"kind": "flow", "shift": "fast"}, "objective")
    with pytest.raises(ConfigError, match=r"objective\.shift.*> 0"):
        build_dataclass(ObjectiveConfig, {"kind": "flow", "shift": 0}, "objective")
    with pytest.raises(ConfigError, match="shift: auto applies to kind: flow"):
        build_dataclass(ObjectiveConfig, {"kind": "eps", "shift": "auto"}, "objective")
    with pytest.raises(ConfigError, match=r"objective\.shift_base_latent"):
        build_dataclass(ObjectiveConfig, {"kind": "flow", "shift": "auto", "shift_base_latent": 0}, "objective")
