"""`ldm export` to safetensors: bit-exact consolidation (EMA / live, ZeRO-0 and 2-rank ZeRO-3), dtypes,
metadata, self-contained stage-two exports, no pickle, clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from export_helpers import cli, ldm
from launch.interop.export import export_run, live_weights, open_run
from launch.runtime.exportdir import ExportError, export_metadata, load_autoencoder, load_text_encoder, read_export


def _equal_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k].double() - b[k].double()).abs().max()}"


def test_zero3_two_rank_ema_export_equals_inprocess_gather_bit_for_bit(unet_run, unet_export):
    meta = json.loads((unet_run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"], meta["ema"]) == (2, 3, True)
    assert len(list((unet_run / "checkpoints" / "step_00000003" / "ema").glob("rank_*.safetensors"))) == 2
    exported = load_file(str(unet_export / "model.safetensors"))
    _equal_bits(exported, load_file(str(unet_run / "inproc_ema.safetensors")))
    assert export_metadata(unet_export)["weights"] == "ema"


def test_no_ema_equals_deepspeed_consolidation_and_inprocess_live(unet_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = export_run(unet_run, tmp_path / "live", use_ema=False)
    exported = load_file(str(out / "model.safetensors"))
    tag_dir = unet_run / "checkpoints" / "step_00000003"
    ds = {k: v.contiguous() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag="denoiser").items()}
    _equal_bits(exported, ds)
    _equal_bits(exported, load_file(str(unet_run / "inproc_live.safetensors")))
    ema = load_file(str(unet_run / "inproc_ema.safetensors"))
    assert any(not torch.equal(ema[k], exported[k]) for k in ema), "EMA and live weights should differ"
    assert export_metadata(out)["weights"] == "live"


def test_zero0_autoencoder_export_ema_and_live_bit_for_bit(ae_run, ae_export, tmp_path):
    _equal_bits(load_file(str(ae_export / "model.safetensors")), load_file(str(ae_run / "inproc_ema.safetensors")))
    live = export_run(ae_run, tmp_path / "live", use_ema=False)
    _equal_bits(load_file(str(live / "model.safetensors")), load_file(str(ae_run / "inproc_live.safetensors")))
    config = json.loads((ae_export / "config.json").read_text())
    stats = json.loads((ae_run / "latent_stats.json").read_text())
    assert config["kind"] == "autoencoder" and config["scaling_factor"] == pytest.approx(stats["scaling_factor"])
    model, _ = load_autoencoder(ae_export)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_export_casts_floats_and_records_metadata(unet_run, unet_export, tmp_path, dtype, torch_dtype):
    out = export_run(unet_run, tmp_path / dtype, dtype=dtype)
    meta = export_metadata(out)
    assert meta["dtype"] == dtype and meta["step"] == "3" and meta["kind"] == "diffusion"
    low, ref = load_file(str(out / "model.safetensors")), load_file(str(unet_export / "model.safetensors"))
    assert all(v.dtype == torch_dtype for v in low.values())
    for k, v in ref.items():   # exactly the rounded fp32 EMA weights
        assert torch.equal(low[k], v.to(torch_dtype)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert (out / "model.safetensors").stat().st_size < 0.6 * (unet_export / "model.safetensors").stat().st_size


def test_metadata_config_and_no_pickle_in_the_export(unet_run, unet_export):
    meta = json.loads((unet_run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    md = export_metadata(unet_export)
    assert md["step"] == "3" and md["config_hash"] == meta["config_hash"] and md["format"] == "ldm-train/1"
    config = json.loads((unet_export / "config.json").read_text())
    assert config["kind"] == "diffusion" and config["objective"]["kind"] == "eps"
    assert config["denoiser"]["unet"]["model_channels"] == 32
    ae_config = json.loads((unet_export / "autoencoder" / "config.json").read_text())
    assert config["scaling_factor"] == 1.0           # unet-small sets latents.scaling_factor: 1.0
    assert ae_config["scaling_factor"] is not None and config["autoencoder"] == "autoencoder"
    assert config["text_encoder_weights"] == "text_encoder/open_clip_text.safetensors"
    for f in unet_export.rglob("*"):
        if f.is_file():
            assert f.suffix in (".json", ".safetensors"), f
            head = f.read_bytes()[:2]
            assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), f"{f} looks like a pickle/zip"
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    assert len(list(h.keys())) > 0


def test_stage_two_export_is_self_contained(unet_run, unet_export, tmp_path):
    """The export works after the run, the autoencoder and the repository's model config are out of reach,
    and its text tower comes from the file, not from re-creating a random init."""
    from ldm.text import build_text_encoder

    moved = tmp_path / "moved"
    shutil.copytree(unet_export, moved)
    config = json.loads((moved / "config.json").read_text())
    assert not Path(config["text_encoder"]["model_config"]).is_absolute()
    cfg = open_run(unet_run).cfg
    captions = ["a red circle on a blue background", ""]
    want = build_text_encoder(cfg.text_encoder)(captions)
    # another init seed in the export's spec must not matter: every tensor comes from the file
    config["text_encoder"]["init_seed"] = 12345
    (moved / "config.json").write_text(json.dumps(config))
    got = load_text_encoder(moved)(captions)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # and without the weights file it would differ (the check above is not vacuous)
    del config["text_encoder_weights"]
    other = load_text_encoder(moved, config)(captions)
    assert not torch.equal(other["text_hidden"], want["text_hidden"])


def test_missing_inputs_give_errors_that_name_the_file(unet_run, tmp_path, copy_tree):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_run(tmp_path / "nowhere", tmp_path / "o1")
    broken = copy_tree(unet_run, "broken")
    shard = broken / "checkpoints" / "step_00000003" / "denoiser" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_mp_rank_00_model_states.pt"):
        export_run(broken, tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="missing file denoiser/zero_pp_rank_1"):
        export_run(broken, tmp_path / "o3", tag="step_00000003")
    # bypassing the manifest, the weights reader names the file itself
    ck = open_run(unet_run)
    ck.tag_dir = broken / "checkpoints" / "step_00000003"
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_mp_rank_00_model_states.pt"):
        live_weights(ck)
    with pytest.raises(FileNotFoundError, match="autoencoder export .* not found"):
        export_run(unet_run, tmp_path / "o4", autoencoder=tmp_path / "no_ae")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="half/model.safetensors not found"):
        read_export(tmp_path / "half")
    with pytest.raises(ExportError, match="format"):
        export_run(unet_run, tmp_path / "o5", fmt="tflite")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o5").exists()


def test_cli_export_and_its_errors(ae_run, tmp_path):
    (tmp_path / "cli" / "vae").mkdir(parents=True)                 # left by an earlier --format diffusers
    (tmp_path / "cli" / "vae" / "config.json").write_text("{}")
    (tmp_path / "cli" / "notes.txt").write_text("mine")             # not ours: kept
    proc = ldm("export", ae_run, tmp_path / "cli", "--dtype", "bf16", "--no-ema")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "autoencoder" and summary["weights"] == "live" and summary["dtype"] == "bf16"
    assert sorted(summary["files"]) == ["config.json", "model.safetensors", "notes.txt"]
    rc, _, err = cli("export", tmp_path / "nowhere", tmp_path / "x")
    assert rc == 2 and "not a run directory" in err
    rc, _, err = cli("export", ae_run)
    assert rc == 2 and "RUN_DIR OUT" in err


@pytest.fixture(scope="module")
def ae_zero2_run(synth_data, tmp_path_factory):
    """Stage one on 2 ranks, ZeRO-2 (one model-states file, optimizer states per rank), bf16 autocast, with
    the discriminator engine beside the autoencoder's."""
    from export_helpers import RUN_FLAGS, run_job

    run_dir = tmp_path_factory.mktemp("runs") / "ae_zero2"
    run_job(["configs/autoencoder/kl-f4-small.yaml", f"run_dir={run_dir}", f"data.urls={synth_data}/00000.tar",
             "train.max_steps=2", "deepspeed.zero_stage=2", "train.precision=bf16", *RUN_FLAGS], nproc=2)
    return run_dir


def test_zero2_two_rank_exports_equal_inprocess_and_deepspeed(ae_zero2_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = json.loads((ae_zero2_run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"]) == (2, 2) and meta["engines"] == ["autoencoder", "discriminator"]
    ema = export_run(ae_zero2_run, tmp_path / "ema")
    _equal_bits(load_file(str(ema / "model.safetensors")), load_file(str(ae_zero2_run / "inproc_ema.safetensors")))
    live = load_file(str(export_run(ae_zero2_run, tmp_path / "live", use_ema=False) / "model.safetensors"))
    _equal_bits(live, load_file(str(ae_zero2_run / "inproc_live.safetensors")))
    tag_dir = ae_zero2_run / "checkpoints" / "step_00000002"
    _equal_bits(live, {k: v.contiguous() for k, v in
                       get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag="autoencoder").items()})
