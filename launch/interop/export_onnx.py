"""`ldm export --format onnx`: the guided denoiser and the latent decoder as ONNX graphs (dynamic batch),
checked in onnxruntime against PyTorch when written.

OUT/onnx/denoiser.onnx: one classifier-free-guidance evaluation, the uncond/cond batch built inside
    inputs   x               float32 [B, C, h, w]   latents at the current noise level (denoiser units)
             t               float32 [B]            NETWORK time: objective.net_time(t), i.e. the discrete
                                                    index for eps / v objectives, 1000 t for flow matching
             context         float32 [B, L, D]      text token states (the text encoder's `text_hidden`)
             guidance_scale  float32 [B]            w: 1 = conditional only, 0 = unconditional
             mask            bool    [B, L]         text padding mask, True = token (only when
                                                    conditioning.use_text_mask)
             pooled          float32 [B, P]         pooled text (only when denoiser.pooled_dim > 0)
             (in this order; onnx.json lists the graph's inputs)
    output   prediction      float32 [B, C, h, w]   u + w (c - u) in the objective's parametrisation (eps, v or
                                                    velocity), with guidance rescale when sampling.guidance_rescale
    Inside, as in `ldm.guidance.cfg_batch`: x2 = [x; x], t2 = [t; t], text2 = [uncond; cond] (uncond first),
    one network call on 2B rows, then u = first B rows, c = last B rows. The unconditional text is the
    empty-prompt embedding (a constant of the graph) or, for conditioning.null_embedding "learned", the
    model's learned null caption (drop flags set inside). A guidance interval is the caller's: pass w = 1
    for steps outside it.
OUT/onnx/vae_decoder.onnx
    input    latent  float32 [B, C, h, w]   latents in denoiser units; the graph applies
                                            z = latent / scaling_factor + shift_factor, decodes, clamps to [-1, 1]
    output   image   float32 [B, 3, H, W]   in [-1, 1]
OUT/onnx/onnx.json: the input/output spec above as data, latent scaling, and the measured max |ORT - PyTorch|.
The sampler loop (objective, times, sampler) stays outside the graphs: config.json has all its parameters.
Graphs are fp32 whatever --dtype says.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

ONNX_DIR = "onnx"
TOLERANCE = 1e-3
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)
EXTERNAL_DATA_BYTES = 1_500_000_000   # larger graphs keep their weights in a side file (protobuf limit 2 GB)
CHECK_CAPTIONS = ("a red circle on a blue background", "a green square on a white background",
                  "a yellow triangle on a purple background", "")


def onnx_problems() -> list[str]:
    problems = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or a broken wheel
            problems.append(f"{mod} is not importable ({e}); pip install 'ldm-train[export]'")
    return problems


class GuidedDenoiser(nn.Module):
    """One CFG evaluation of a denoiser, traceable: (x, t, text, w) -> guided prediction."""

    def __init__(self, net: nn.Module, channels: int, null_mode: str, rescale: float = 0.0,
                 empty: Optional[dict] = None):
        super().__init__()
        self.net = net
        self.channels = channels
        self.null_mode = null_mode
        self.rescale = float(rescale)
        if null_mode == "empty":
            if empty is None:
                raise ValueError("null_embedding 'empty' needs the empty-prompt condition")
            for key in ("context", "context_mask", "pooled"):
                if empty.get(key) is not None:
                    self.register_buffer(f"empty_{key}", empty[key].detach().clone(), persistent=False)
        elif null_mode != "learned":
            raise ValueError(f"null mode {null_mode!r}: expected 'empty' or 'learned'")

    @classmethod
    def from_stage(cls, stage) -> "GuidedDenoiser":
        """From a `DiffusionStage` (as `launch.runtime.exportdir.load_pipeline` builds it)."""
        from ldm.conditioning import fit_tokens

        empty = None
        if stage.conditioning.null_embedding == "empty":
            length = stage.text_encoder.context_length if stage.text_encoder is not None else None
            cond = stage.condition({"caption": [""]})
            if length is not None:
                cond["context"] = fit_tokens(cond["context"], length)
                if "context_mask" in cond:
                    cond["context_mask"] = fit_tokens(cond["context_mask"], length, fill=False)
            empty = cond
        channels = stage.latent_shape[0]
        return cls(stage.denoiser, channels, stage.conditioning.null_embedding, stage.sampling.guidance_rescale,
                   empty)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance_scale: torch.Tensor,
                mask: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = x.shape[0]
        cond = {"context": context}
        if mask is not None:
            cond["context_mask"] = mask
        if pooled is not None:
            cond["pooled"] = pooled
        if self.null_mode == "learned":
            cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
            cond2["drop"] = torch.cat([torch.ones_like(t, dtype=torch.bool), torch.zeros_like(t, dtype=torch.bool)])
        else:
            cond2 = {}
            for key, value in cond.items():
                empty = getattr(self, f"empty_{key}")
                cond2[key] = torch.cat([empty.to(value.dtype).expand(b, *value.shape[1:]), value])
        pred = self.net(torch.cat([x, x]), torch.cat([t, t]), **cond2)[:, : self.channels]
        uncond, condp = pred[:b], pred[b:]       # slices, not chunk(): keeps the batch symbolic
        w = guidance_scale.to(pred.dtype).reshape(-1, *([1] * (pred.dim() - 1)))
        guided = uncond + w * (condp - uncond)
        if self.rescale > 0:
            dims = tuple(range(1, pred.dim()))
            std_c = condp.std(dim=dims, keepdim=True)
            std_g = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
            guided = self.rescale * guided * (std_c / std_g) + (1 - self.rescale) * guided
        return guided


class LatentDecoder(nn.Module):
    """Denoiser-unit latents -> images in [-1, 1] (the autoencoder's decoder, un-scaling included)."""

    def __init__(self, autoencoder: nn.Module, scaling_factor: float, shift_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latent / self.scaling_factor + self.shift_factor).float().clamp(-1, 1)


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _export(module: nn.Module, kwargs: dict[str, torch.Tensor], path: Path, output: str,
            opset: Optional[int]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch} for name in kwargs}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (), str(path), kwargs=kwargs, input_names=list(kwargs), output_names=[output],
                          dynamic_shapes=dynamic, dynamo=True, external_data=_param_bytes(module) > EXTERNAL_DATA_BYTES,
                          opset_version=opset, verbose=False)


def ort_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _max_diff(session, module: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        ref = module(**inputs).float().numpy()
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    if got.shape != ref.shape:
        raise AssertionError(f"onnxruntime output shape {got.shape} != PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def denoiser_inputs(stage, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Realistic inputs for the guided graph: real text states, mid-range noise levels."""
    g = torch.Generator().manual_seed(seed)
    captions = [CHECK_CAPTIONS[i % len(CHECK_CAPTIONS)] for i in range(batch)]
    cond = stage.condition({"caption": captions})
    shape = tuple(stage.latent_shape)
    x = torch.randn((batch,) + shape, generator=g)
    u = torch.rand(batch, generator=g) * 0.9 + 0.05
    t = stage.objective.net_time(stage.objective.from_unit_time(u)).float()
    inputs = {"x": x, "t": t, "context": cond["context"].float(),
              "guidance_scale": torch.full((batch,), float(stage.sampling.cfg_scale))}
    if "context_mask" in cond:
        inputs["mask"] = cond["context_mask"].bool()
    if "pooled" in cond:
        inputs["pooled"] = cond["pooled"].float()
    return inputs


def _spec(inputs: dict[str, torch.Tensor]) -> dict:
    names = {torch.float32: "float32", torch.bool: "bool"}
    return {k: {"dtype": names.get(v.dtype, str(v.dtype)), "shape": ["B", *list(v.shape[1:])]}
            for k, v in inputs.items()}


def export_onnx(export_dir: str | Path, *, check: bool = True, tolerance: float = TOLERANCE,
                opset: Optional[int] = None) -> dict:
    """Write OUT/onnx/{denoiser,vae_decoder}.onnx (a stage-two export) or OUT/onnx/vae_decoder.onnx (an
    autoencoder export) from the native files already in OUT, check them in onnxruntime at batch sizes
    other than the traced one, and write OUT/onnx/onnx.json. Raises when a check exceeds `tolerance`."""
    from launch.runtime.exportdir import CONFIG_FILE, ExportError, load_autoencoder, load_pipeline

    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    onnx_dir = export_dir / ONNX_DIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"tolerance": tolerance, "graphs": {}}
    decoder = None
    if config["kind"] == "diffusion":
        stage, config = load_pipeline(export_dir)
        module = GuidedDenoiser.from_stage(stage).eval()
        example = denoiser_inputs(stage, TRACE_BATCH)
        path = onnx_dir / "denoiser.onnx"
        _export(module, example, path, "prediction", opset)
        entry = {"file": f"{ONNX_DIR}/denoiser.onnx", "inputs": _spec(example),
                 "outputs": {"prediction": {"dtype": "float32", "shape": ["B", *list(stage.latent_shape)]}},
                 "time": "network time objective.net_time(t)", "objective": config["objective"]["kind"],
                 "null_embedding": stage.conditioning.null_embedding,
                 "guidance_rescale": stage.sampling.guidance_rescale}
        if check:
            session = ort_session(path)
            entry["max_abs_diff"] = {str(b): _max_diff(session, module, denoiser_inputs(stage, b, seed=b))
                                     for b in CHECK_BATCHES}
        summary["graphs"]["denoiser"] = entry
        latent_shape = tuple(stage.latent_shape)
        if stage.autoencoder is not None:
            decoder = LatentDecoder(stage.autoencoder, stage.latents.scaling_factor, stage.latents.shift_factor)
    else:
        ae, _ = load_autoencoder(export_dir)
        scale, shift = config.get("scaling_factor"), config.get("shift_factor")
        decoder = LatentDecoder(ae, 1.0 if scale is None else scale, 0.0 if shift is None else shift)
        side = ae.config.resolution // ae.downsample_factor
        latent_shape = (ae.latent_channels, side, side)
    if decoder is not None:
        decoder.eval()
        g = torch.Generator().manual_seed(0)
        path = onnx_dir / "vae_decoder.onnx"
        _export(decoder, {"latent": torch.randn((TRACE_BATCH,) + latent_shape, generator=g)}, path, "image", opset)
        entry = {"file": f"{ONNX_DIR}/vae_decoder.onnx",
                 "inputs": {"latent": {"dtype": "float32", "shape": ["B", *latent_shape]}},
                 "outputs": {"image": {"dtype": "float32", "shape": ["B", 3, "H", "W"], "range": [-1, 1]}},
                 "scaling_factor": decoder.scaling_factor, "shift_factor": decoder.shift_factor,
                 "note": "z = latent / scaling_factor + shift_factor, then the decoder, clamped to [-1, 1]"}
        if check:
            session = ort_session(path)
            entry["max_abs_diff"] = {str(b): _max_diff(session, decoder, {"latent": torch.randn(
                (b,) + latent_shape, generator=torch.Generator().manual_seed(b))}) for b in CHECK_BATCHES}
        summary["graphs"]["vae_decoder"] = entry
    (onnx_dir / "onnx.json").write_text(json.dumps(summary, indent=1))
    worst = {name: max(e.get("max_abs_diff", {"-": 0.0}).values()) for name, e in summary["graphs"].items()}
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        raise ExportError(f"onnxruntime disagrees with PyTorch beyond {tolerance}: "
                          + ", ".join(f"{k} max |diff| {v:.3g}" for k, v in bad.items()))
    return {name: {"file": e["file"], "max_abs_diff": e.get("max_abs_diff")} for name, e in summary["graphs"].items()}
