"""`ldm export --format onnx`: the guided denoiser (CFG batch built inside) and the latent decoder, dynamic
batch, onnxruntime within 1e-3 of PyTorch - checked here independently of the exporter's own check."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from launch.runtime.exportdir import load_pipeline  # noqa: E402
from launch.interop.export_onnx import denoiser_inputs, export_onnx, ort_session  # noqa: E402

TOL = 1e-3


@pytest.fixture(scope="module")
def onnx_export(unet_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    shutil.copytree(unet_export, out)
    summary = export_onnx(out)
    return out, summary


def test_onnx_graphs_have_a_dynamic_batch_and_match_pytorch(onnx_export):
    from ldm.conditioning import unconditional_like
    from ldm.guidance import guided

    out, summary = onnx_export
    spec = json.loads((out / "onnx" / "onnx.json").read_text())["graphs"]
    for name in ("denoiser", "vae_decoder"):
        assert max(summary[name]["max_abs_diff"].values()) < TOL
    stage, _ = load_pipeline(out)
    den = ort_session(out / "onnx" / "denoiser.onnx")
    assert [i.name for i in den.get_inputs()] == list(spec["denoiser"]["inputs"])
    assert isinstance(den.get_inputs()[0].shape[0], str), "batch dimension must be symbolic"
    empty = stage.condition({"caption": [""]})
    for batch in (1, 4):
        inputs = denoiser_inputs(stage, batch, seed=10 + batch)
        # PyTorch reference through the sampler-facing path: model_fn (native time) wrapped by ldm.guidance.guided
        native_t = stage.objective.from_unit_time(stage.objective.unit_time(inputs["t"]))
        cond = {"context": inputs["context"], "context_mask": inputs["mask"]}
        w = float(inputs["guidance_scale"][0])
        fn = guided(stage.model_fn(stage.denoiser), unconditional_like(cond, "empty", empty), w)
        with torch.no_grad():
            ref = fn(inputs["x"], native_t, cond).numpy()
        got = den.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == ref.shape == (batch, 4, 8, 8)
        assert np.abs(got - ref).max() < TOL
        assert np.abs(ref).max() > 1e-3
        # the guidance scale is a real input: w = 1 gives the conditional prediction alone
        ones = dict(inputs, guidance_scale=torch.ones(batch))
        plain = den.run(None, {k: v.numpy() for k, v in ones.items()})[0]
        with torch.no_grad():
            cond_only = stage.model_fn(stage.denoiser)(inputs["x"], native_t, cond).numpy()
        assert np.abs(plain - cond_only).max() < TOL
    dec = ort_session(out / "onnx" / "vae_decoder.onnx")
    for batch in (1, 5):
        z = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = stage.decode(z).numpy()
        got = dec.run(None, {"latent": z.numpy()})[0]
        assert got.shape == (batch, 3, 32, 32)
        assert np.abs(got - ref).max() < TOL


def test_export_config_records_the_graphs(onnx_export):
    out, summary = onnx_export
    spec = json.loads((out / "onnx" / "onnx.json").read_text())
    den = spec["graphs"]["denoiser"]
    assert den["inputs"]["x"]["shape"] == ["B", 4, 8, 8] and den["inputs"]["mask"]["dtype"] == "bool"
    assert den["null_embedding"] == "empty" and den["objective"] == "eps"
    assert spec["graphs"]["vae_decoder"]["scaling_factor"] == pytest.approx(1.0)
    assert set(summary) == {"denoiser", "vae_decoder"}


def test_learned_null_pooled_dit_graph_matches_pytorch(ae_export, tmp_path):
    """Non-PixArt DiT (QK-norm), learned null caption, pooled text, flow objective: the graph's
    unconditional half uses the learned null (drop flags set inside), and w = 0 gives it alone."""
    from export_helpers import make_dit_export
    from ldm.conditioning import unconditional_like
    from ldm.guidance import guided

    out = make_dit_export(tmp_path / "dit", ae_export)
    summary = export_onnx(out)
    assert max(summary["denoiser"]["max_abs_diff"].values()) < TOL
    stage, config = load_pipeline(out)
    assert config["objective"]["kind"] == "flow" and stage.conditioning.null_embedding == "learned"
    sess = ort_session(out / "onnx" / "denoiser.onnx")
    assert [i.name for i in sess.get_inputs()] == ["x", "t", "context", "guidance_scale", "mask", "pooled"]
    inputs = denoiser_inputs(stage, 3, seed=4)
    native_t = inputs["t"] / 1000                     # flow: network time is 1000 t
    cond = {"context": inputs["context"], "context_mask": inputs["mask"], "pooled": inputs["pooled"]}
    fn = stage.model_fn(stage.denoiser)
    with torch.no_grad():
        ref = guided(fn, unconditional_like(cond, "learned"), float(inputs["guidance_scale"][0]))(
            inputs["x"], native_t, cond).numpy()
        null_only = fn(inputs["x"], native_t, unconditional_like(cond, "learned")).numpy()
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(got - ref).max() < TOL and np.abs(ref).max() > 1e-2
    zero = dict(inputs, guidance_scale=torch.zeros(3))
    got0 = sess.run(None, {k: v.numpy() for k, v in zero.items()})[0]
    assert np.abs(got0 - null_only).max() < TOL


def test_autoencoder_run_exports_its_decoder_only(ae_run, tmp_path):
    from launch.interop.export import export_run
    from launch.runtime.exportdir import load_autoencoder

    out = export_run(ae_run, tmp_path / "ae", fmt="onnx")
    config = json.loads((out / "config.json").read_text())
    assert set(config["onnx"]) == {"vae_decoder"} and not (out / "onnx" / "denoiser.onnx").exists()
    ae, _ = load_autoencoder(out)
    s, b = config["scaling_factor"], config["shift_factor"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = ort_session(out / "onnx" / "vae_decoder.onnx").run(None, {"latent": z.numpy()})[0]
    with torch.no_grad():
        ref = ae.decode(z / s + b).clamp(-1, 1).numpy()
    assert np.abs(got - ref).max() < TOL
