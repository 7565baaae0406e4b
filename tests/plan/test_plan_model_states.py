"""Model-state bytes per rank: launch/plan/zero.py's ZeRO model against a live DeepSpeed engine on CPU (1 and 2
ranks, ZeRO 0-3, a small UNet and a small DiT, built through launch/runtime/engine.py by plan_state_job.py), and
against DeepSpeed's own estimators."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from launch.plan import hardware as H
from launch.plan import zero as Z
from launch.plan.description import describe
from plankit import load, rel, run_job

JOB = Path(__file__).with_name("plan_state_job.py")
MODELS = {"unet": "ldm/unet-small", "dit": "ldm/dit-small"}
# small buckets and a persistence threshold that leaves some ZeRO-3 parameters whole and partitions the rest
OVERRIDES = ["train.micro_batch_size=2", "train.grad_accum_steps=2", "deepspeed.reduce_bucket_size=500000",
             "deepspeed.stage3_param_persistence_threshold=20000"]
ROLES = ("params", "grads", "optimizer", "ema", "buffers")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{(model, world, zero, rank): record} from one job per world size (all models and stages in it)."""
    from plankit import REPO

    out = {}
    for world in (1, 2):
        d = tmp_path_factory.mktemp(f"states{world}")
        models = ",".join(f"{k}:{REPO / 'configs' / (v + '.yaml')}" for k, v in MODELS.items())
        run_job(JOB, [str(d), *OVERRIDES], nproc=world, PLAN_MODELS=models)
        for f in d.glob("*.json"):
            rec = json.loads(f.read_text())
            out[(f.name.split("_")[0], rec["world"], rec["zero"], rec["rank"])] = rec
    assert len(out) == len(MODELS) * 4 * 3
    return out


@functools.lru_cache(maxsize=None)
def _describe(model):
    return describe(load(MODELS[model], *OVERRIDES))


def _predicted(model, zero, world):
    desc = _describe(model)
    return Z.zero_model_states(desc.params, zero, world, desc.precision, desc.ema,
                               int(desc.ds_zero["reduce_bucket_size"]),
                               int(desc.ds_zero.get("stage3_max_reuse_distance", H.DS_DEFAULT_REUSE_DISTANCE)),
                               bool(desc.ds_zero.get("overlap_comm", False)),
                               bool(desc.ds_zero.get("contiguous_gradients", True)), desc.comm_dtype)


@pytest.mark.parametrize("model", list(MODELS))
def test_plan_model_states_match_live_engine(measured, model):
    rows = []
    for (m, world, zero, rank), rec in sorted(measured.items()):
        if m != model:
            continue
        pred = _predicted(model, zero, world)
        got, live = rec["roles"], rec["live_total"]
        lo, hi = pred.after_backward
        rows.append(f"{model} N={world} ZeRO-{zero} rank {rank}: predicted {lo}..{hi} measured {live} "
                    f"({rel(lo, live):.2%} from at rest) " +
                    " ".join(f"{k} {getattr(pred, k)}/{got[k]}" for k in ROLES))
        # everything alive in the process that the engine and the EMA added, against the prediction: the
        # states at rest, plus at most the tensor of backward's last collective (one reduce bucket, 2,000,000 B
        # here, or ZeRO-0's flat all-reduce copy) when gloo's worker thread has not dropped it yet
        # (launch/plan/zero.py). The unet's rank 1 at N=2, ZeRO-2 holds 16,695,004 B at rest (predicted 16,715,512)
        # and once measured 18,695,004 B: one bucket more, which a point prediction of 5 % cannot hold
        assert lo - 0.05 * live <= live <= hi + 0.05 * live, rows[-1]
        for role in ROLES:
            want, have = getattr(pred, role), got[role]
            assert abs(want - have) <= max(0.05 * have, 64 * 1024), (role, rows[-1])
    print("\n".join(rows))


def test_plan_gradients_held_while_accumulating(measured):
    """Between micro-steps ZeRO-0 and ZeRO-1 hold full-size gradients, ZeRO-2/3 only their partition; ZeRO-1
    also keeps its reduce bucket (freed only by the boundary's reduction), ZeRO-2 frees it after each backward."""
    for (m, world, zero, rank), rec in sorted(measured.items()):
        pred = _predicted(m, zero, world)
        have = rec["accumulating"]["grads"]
        assert abs(pred.grads_accumulating - have) <= max(0.05 * have, 64 * 1024), (m, world, zero, rank,
                                                                                    pred.grads_accumulating, have)
        have = rec["accumulating"]["buffers"]
        assert abs(pred.buffers_accumulating - have) <= max(0.05 * have, 64 * 1024), (m, world, zero, rank,
                                                                                      pred.buffers_accumulating, have)
    full = measured[("unet", 2, 1, 0)]["accumulating"]["grads"]
    part = measured[("unet", 2, 2, 0)]["accumulating"]["grads"]
    assert full > 1.8 * part


def test_plan_ema_is_partitioned_only_under_zero3(measured):
    for (m, world, zero, rank), rec in measured.items():
        full = 4 * rec["numel"]
        ema = rec["roles"]["ema"]
        if zero < 3 or world == 1:
            assert rel(ema, full) <= 0.01
        else:
            assert rel(ema, full / world) <= 0.05


def _ds_cold(zero, total, largest, gpus):
    """DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs_all_cold`, its 'no offload' per-GPU figure
    (GB as printed, two decimals)."""
    import contextlib
    import io
    import re

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if zero == 2:
            estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus)
        else:
            estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus)
    rows = [line for line in buf.getvalue().splitlines() if re.search(r"offload_optimizer=none", line)
            and "offload_param=OffloadDeviceEnum" not in line]
    return float(re.findall(r"([\d.]+)GB", rows[0])[1]) * 2 ** 30


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("model", list(MODELS))
def test_plan_agrees_with_deepspeed_estimators(model, world, zero):
    """DeepSpeed's estimators describe its 16-bit mixed precision (2-byte weights and gradients, fp32
    master, moments and gradient partition) with nothing persistent and no buckets: in that setting
    (precision fp16) the model agrees within 10 %. With fp32 weights (precision fp32/bf16, what the live
    engine above ran) ZeRO-2 holds the weights' extra 2 bytes (2 P) and fp32 instead of 16-bit gradients
    without a separate fp32 copy; ZeRO-3's two layouts hold the same bytes (16-bit weights and gradients
    plus an fp32 gradient copy, against fp32 weights and gradients: 20 P/N with the master and moments)."""
    pi = _describe(model).params
    pi0 = Z.ParamInfo(pi.trainable, pi.group_numels, 0, pi.largest_layer, pi.count)
    ds = Z.deepspeed_estimate(pi0, zero, world)
    ours = Z.zero_model_states(pi0, zero, world, "fp16", ema=False)
    ours_states = ours.params + ours.grads + ours.optimizer
    print(f"{model} N={world} ZeRO-{zero}: ours {ours_states} DeepSpeed {ds} ({rel(ours_states, ds):+.1%})")
    assert rel(ours_states, ds) <= 0.10
    fp32 = Z.zero_model_states(pi0, zero, world, "fp32", ema=False)
    extra = (fp32.params + fp32.grads + fp32.optimizer) - ours_states
    part = sum(-(-n // world) for g in pi.group_numels for n in g)
    if zero == 2:
        _, grad_elems = Z.zero12_partition(pi.group_numels, world)
        assert extra == 2 * pi.trainable + 2 * grad_elems - 4 * part
    else:
        assert extra == 0


@pytest.mark.parametrize("config,overrides", [("ldm/unet-sd15", ()), ("ldm/dit-xl-2", ())])
def test_plan_full_size_agrees_with_deepspeed_cold_estimate(config, overrides):
    """The printed `_all_cold` figures for the real configs on 8 GPUs (fp16 setting, as above)."""
    import dataclasses

    cfg = load(config, *overrides)
    pi = describe(cfg).params
    pi0 = dataclasses.replace(pi, persistent=0)
    for zero in (2, 3):
        ds = _ds_cold(zero, pi.trainable, pi.largest_layer, 8)
        s = Z.zero_model_states(pi0, zero, 8, "fp16", ema=False)
        ours = s.params + s.grads + s.optimizer
        print(f"{config} ZeRO-{zero} on 8 GPUs: ours {ours / 2 ** 30:.2f} GiB, DeepSpeed {ds / 2 ** 30:.2f} GiB")
        assert rel(ours, ds) <= 0.10
