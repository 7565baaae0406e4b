"""LoRA through peft (ldm/lora.py), trained by the real runtime (DeepSpeed ZeRO-2, 2 ranks, gloo) on
configs/ldm/unet-small.yaml, exported (launch/interop/export_lora.py) and loaded by diffusers.

Runs reuse the export tests' helpers (tests/export/export_helpers.py: run_job over tests/runtime/harness)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from export_helpers import RUN_FLAGS, harness, run_job  # noqa: E402

UNET = "configs/ldm/unet-small.yaml"
LORA_STEPS = 16


# ----------------------------------------------------------------------------- fast: config
def test_lora_config_names_key_and_allowed_values():
    from launch.runtime.config import ConfigError, load_config
    from ldm.training import build_denoiser_for

    assert load_config(UNET).lora.rank == 0                     # off by default
    with pytest.raises(ConfigError, match=r"lora\.rank.*>= 0"):
        load_config(UNET, ["lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        load_config(UNET, ["lora.rank=4", "lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"lora.*targets.*to_q"):
        load_config(UNET, ["lora.rank=4", "lora.targets=['']"])
    with pytest.raises(ValueError, match=r"lora\.targets.*allowed.*to_q"):
        build_denoiser_for(load_config(UNET, ["lora.rank=4", "lora.targets=[nothing_here]"]))


def test_default_targets_exist_for_each_denoiser_kind():
    from launch.runtime.config import load_config
    from ldm.lora import has_lora
    from ldm.training import build_denoiser_for

    for config in (UNET, "configs/ldm/dit-small.yaml"):
        net = build_denoiser_for(load_config(config, ["lora.rank=2"]))
        assert has_lora(net)
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)


# ----------------------------------------------------------------------------- runs
def _common(root: Path, *changes: str) -> list[str]:
    """The data, autoencoder and logging every run here shares (ZeRO-2), with `changes` (KEY=VALUE) replacing
    the shared value of their key (the config loader refuses a key given twice)."""
    shared = [f"data.urls={root}/synth/00000.tar", "data.image_size=32", f"latents.autoencoder={root}/ae_export",
              "deepspeed.zero_stage=2", "train.log_every=1", "optimizer.warmup_steps=0", *RUN_FLAGS]
    changed = {c.split("=", 1)[0] for c in changes}
    return [f for f in shared if f.split("=", 1)[0] not in changed] + list(changes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data_pipeline.synthetic import write_synthetic
    from launch.interop.export import export_run

    root = tmp_path_factory.mktemp("lora")
    write_synthetic(root / "synth", 64, size=32, seed=3, shard_size=64)
    run_job(["configs/autoencoder/kl-f4-small.yaml", f"run_dir={root}/ae", f"data.urls={root}/synth/00000.tar",
             "train.max_steps=2", *RUN_FLAGS], nproc=1)
    export_run(root / "ae", root / "ae_export")
    common = _common(root)
    # the base: full fine-tuning long enough that the UNet's zero-initialised conv_out (frozen under LoRA)
    # no longer outputs 0; the LoRA run starts from it (init.from a run directory)
    run_job([UNET, f"run_dir={root}/full", "train.max_steps=8", "optimizer.lr=1e-3", *common], nproc=2)
    run_job([UNET, f"run_dir={root}/lora", f"train.max_steps={LORA_STEPS}", "lora.rank=4", "optimizer.lr=1e-2",
             f"init.from={root}/full", f"data.val_urls={root}/synth/00000.tar", "validation.every=4",
             "conditioning.dropout_prob=0", "train.micro_batch_size=16",
             *[a for a in common if not a.startswith(("train.micro_batch_size=", "validation.every="))]], nproc=2)
    return {"root": root, "full": root / "full", "lora": root / "lora"}


def _optim_bytes(run: Path) -> float:
    rec = next(r for r in harness.metrics(run) if "mem/optimizer_state_bytes_max/denoiser" in r)
    return rec["mem/optimizer_state_bytes_max/denoiser"]


def test_lora_zero2_trains_only_adapters_with_small_optimizer_state(runs):
    from peft.utils import get_peft_model_state_dict

    from launch.runtime.config import load_config
    from ldm.training import build_denoiser_for

    net = build_denoiser_for(load_config(UNET, ["lora.rank=4"]))
    ours = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert ours == sum(t.numel() for t in get_peft_model_state_dict(net).values())   # peft's own count
    full, lora = _optim_bytes(runs["full"]), _optim_bytes(runs["lora"])
    # AdamW: two fp32 moments per trainable parameter (+ a step counter), split over 2 ranks by ZeRO-2
    assert lora <= 0.05 * full, f"LoRA {lora:.0f} B vs full fine-tuning {full:.0f} B per rank"
    assert lora >= 2 * 4 * ours / 2 * 0.9
    print(f"trainable {ours} of {sum(p.numel() for p in net.parameters())}; optimizer bytes/rank "
          f"{lora:.0f} vs {full:.0f} ({lora / full:.4f})")


def test_lora_loss_falls(runs):
    """The fixed-t validation loss (same samples, t and noise every evaluation) falls as the adapter trains:
    the per-batch training loss is too noisy over random t to show 16 steps of progress."""
    losses = [r["loss"] for r in harness.metrics(runs["lora"]) if "loss" in r]
    assert len(losses) == LORA_STEPS
    val = [(r["step"], r["val/val_loss"]) for r in harness.metrics(runs["lora"]) if "val/val_loss" in r]
    print("train losses", [round(x, 3) for x in losses], "val", val)
    assert len(val) >= 3, val
    # An adapter with no effect leaves these bit-equal (same weights, samples, t and noise): a fall at every
    # evaluation is the adapter learning. (Measured: 0.81727 -> 0.81710 -> 0.81700 -> 0.81674 -> 0.81651.)
    vals = [v for _, v in val]
    assert all(b < a for a, b in zip(vals, vals[1:])), f"validation loss should fall at every evaluation: {val}"
    assert vals[-1] < vals[0] - 5e-4, val


def test_exported_adapter_in_diffusers_matches_our_merged_model(runs):
    import diffusers
    from safetensors.torch import load_file

    from launch.interop.export import export_run
    from launch.interop.export_lora import ADAPTER_FILE
    from launch.runtime.config import load_config
    from ldm.training import build_denoiser

    root = runs["root"]
    base = export_run(runs["lora"], root / "exp_base", fmt="diffusers")
    merged = export_run(runs["lora"], root / "exp_merged", merge_lora=True)
    assert (base / ADAPTER_FILE).is_file() and not (merged / ADAPTER_FILE).exists()
    keys = list(load_file(str(base / ADAPTER_FILE)))
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert any(".to_out.0.lora_A" in k for k in keys)          # diffusers module paths (to_out -> to_out.0)

    ours = build_denoiser(load_config(UNET).denoiser).eval()
    ours.load_state_dict(load_file(str(merged / "model.safetensors")))
    unet = diffusers.UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([50.0, 700.0])
    ctx = torch.randn(2, 77, load_config(UNET).denoiser.unet.context_dim, generator=g)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        unet.load_lora_adapter(str(base / ADAPTER_FILE), prefix="unet", adapter_name="ours")
        theirs = unet(x, t, encoder_hidden_states=ctx).sample
        mine = ours(x, t, ctx)
    diff = (theirs - mine).abs().max().item()
    assert (theirs - plain).abs().max() > 1e-3       # the adapter changes the output
    assert diff < 1e-4, f"diffusers + adapter vs our merged model: max diff {diff:.2e}"
    print(f"max diff diffusers+LoRA vs merged: {diff:.2e}")


def test_lora_under_zero3_resumes_bit_exact(runs, tmp_path):
    """LoRA under ZeRO-3 (parameters partitioned over the 2 ranks) from the same base: a run that lost its
    last checkpoint (a crash after step 4's save) resumes from step 4 and ends with the exported adapters and
    every logged loss of the uninterrupted run, bit for bit; only adapters reach the optimizer there too."""
    import shutil

    from safetensors.torch import load_file

    from launch.interop.export import export_run
    from launch.interop.export_lora import ADAPTER_FILE

    root = runs["root"]
    args = [UNET, *_common(root, "deepspeed.zero_stage=3", "train.checkpoint_every=4", "train.micro_batch_size=16"),
            "train.max_steps=8", "train.keep_checkpoints=2", "lora.rank=4", "optimizer.lr=1e-2",
            f"init.from={root}/full", "conditioning.dropout_prob=0"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run_job([*args, f"run_dir={ref}"], nproc=2)
    shutil.copytree(ref, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000008")      # the crash took the step-8 save with it
    (crashed / "checkpoints" / "latest").write_text("step_00000008")   # and left `latest` naming it
    (crashed / "result.json").unlink()
    run_job([*args, f"run_dir={crashed}"], nproc=2)

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in harness.metrics(run) if "loss" in r}   # the last record per step
    assert sorted(losses(crashed)) == list(range(1, 9)) and losses(crashed) == losses(ref)
    for name in ("a", "b"):
        export_run(ref if name == "a" else crashed, tmp_path / f"export_{name}", fmt="diffusers")
    a, b = (load_file(str(tmp_path / f"export_{n}" / ADAPTER_FILE)) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B." in k)      # the adapters moved off their zero init
    assert _optim_bytes(ref) <= 0.05 * _optim_bytes(runs["full"])
