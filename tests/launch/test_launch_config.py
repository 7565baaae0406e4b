"""Typed configs: overrides, inheritance, and errors that name the key before any compute."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from launch.runtime.config import Config, load_config
from launch.runtime.configio import ConfigError, apply_overrides, build_dataclass, config_hash, dump_yaml, parse_override

MINIMAL = {"stage": "diffusion", "run_dir": "runs/x"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.max_steps=7", "optimizer.betas=[0.8, 0.95]", "deepspeed.zero_stage=3",
                             "data.urls=shards/{00000..00003}.tar", "logging.wandb_entity=null"], base=MINIMAL)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.data.urls == ["shards/{00000..00003}.tar"]   # a single string becomes a list
    assert cfg.logging.wandb_entity is None
    assert isinstance(cfg, Config)
    assert load_config(None, ["optimizer.lr=2e-3"], base=MINIMAL).optimizer.lr == 0.002   # YAML 1.1 string


@pytest.mark.parametrize("override,needles", [
    ("train.max_stepz=3", ["train.max_stepz", "did you mean 'train.max_steps'"]),
    ("train.max_steps=-1", ["train.max_steps", "-1", ">= 1"]),
    ("train.max_steps=abc", ["train.max_steps", "'abc'", "integer"]),
    ("train.precision=fp8", ["train.precision", "'fp8'", "'fp32'", "'bf16'"]),
    ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "<= 3"]),
    ("ema.sigma_rel=0.5", ["ema.sigma_rel", "< 0.28"]),
    ("optimizer.betas=[0.9]", ["optimizer.betas", "2 items"]),
    ("bogus_section.x=1", ["bogus_section"]),
    ("train=3", ["train", "section"]),
    ("stage=vae", ["stage", "'autoencoder'", "'diffusion'"]),
])
def test_bad_values_name_key_value_and_allowed(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], base=MINIMAL)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} missing from: {err.value}"


def test_required_keys_and_cross_field_validation():
    with pytest.raises(ConfigError, match="'run_dir' is required"):
        load_config(None, [], base={"stage": "diffusion"})
    with pytest.raises(ConfigError, match=r"optimizer.*betas"):
        load_config(None, ["optimizer.betas=[0.9, 1.5]"], base=MINIMAL)


def test_inherit_merges_depth_first(tmp_path):
    (tmp_path / "base.yaml").write_text("stage: diffusion\nrun_dir: runs/base\ntrain: {max_steps: 5, seed: 3}\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\nrun_dir: runs/child\ntrain: {max_steps: 9}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.log_every=2"])
    assert (cfg.run_dir, cfg.train.max_steps, cfg.train.seed, cfg.train.log_every) == ("runs/child", 9, 3, 2)
    (tmp_path / "loop.yaml").write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_resolved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(None, ["train.max_steps=11"], base=MINIMAL)
    text = dump_yaml(cfg)
    (tmp_path / "c.yaml").write_text(text)
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["train.max_steps=12"], base=MINIMAL)) != config_hash(cfg)


@dataclass
class Inner:
    k: int = field(default=1, metadata={"gt": 0})


@dataclass
class Outer:
    mode: Literal["a", "b"] = "a"
    maybe: Optional[float] = None
    inner: Inner = field(default_factory=Inner)
    table: dict[str, float] = field(default_factory=dict)
    sizes: tuple[int, ...] = (1, 2)


def test_generic_types():
    o = build_dataclass(Outer, {"maybe": 3, "inner": {"k": 2}, "table": {"x": 1}, "sizes": [4, 5, 6]})
    assert o.maybe == 3.0 and o.inner.k == 2 and o.table == {"x": 1.0} and o.sizes == (4, 5, 6)
    with pytest.raises(ConfigError, match="'inner.k' = 0 is out of range: must be > 0"):
        build_dataclass(Outer, {"inner": {"k": 0}})
    with pytest.raises(ConfigError, match="'sizes\\[1\\]'"):
        build_dataclass(Outer, {"sizes": [1, "x"]})
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_shell_expanded_brace_pattern_is_caught():
    """`data.urls=d/{0..1}.tar` unquoted becomes two overrides; the second must not silently win."""
    with pytest.raises(ConfigError, match="given twice.*quote it"):
        load_config(None, ["data.urls=d/0.tar", "data.urls=d/1.tar"], base=MINIMAL)
