"""`ldm export RUN_DIR OUT`: a run's weights as a self-contained export (safetensors, diffusers, ONNX)."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "export"
HELP = "export a run (any stage, world size, ZeRO stage) to safetensors / diffusers / ONNX; import an SD VAE"
DESCRIPTION = """Export the newest complete checkpoint of a run (or --tag) to OUT:

  OUT/model.safetensors   EMA weights by default (--no-ema: DeepSpeed's consolidation of the live weights),
                          metadata: step, config hash, dtype
  OUT/config.json         architecture, objective, latent scaling_factor / shift_factor, text encoder spec
  OUT/autoencoder/        stage two: copy of the autoencoder export (--reference-autoencoder: path only)
  OUT/text_encoder/       stage two: the text tower's weights when they have no open_clip tag (random init,
                          local file) and its model-config JSON
  --format diffusers      + OUT/vae/, OUT/unet/ (or OUT/transformer/ for the PixArt-form DiT), OUT/scheduler/;
                          a UNet also OUT/text_encoder/ (CLIPTextModel), OUT/tokenizer/, OUT/model_index.json
                          (DiffusionPipeline.from_pretrained(OUT) -> StableDiffusionPipeline)
  --format onnx           + OUT/onnx/denoiser.onnx (guided, CFG batch inside), OUT/onnx/vae_decoder.onnx,
                          checked in onnxruntime against PyTorch (OUT/onnx/onnx.json)

Import an existing VAE as an autoencoder export (then train stage two on it, or re-export it):
  ldm export --from-ldm-vae FILE.{safetensors,ckpt} OUT [--ldm-config MODEL.yaml] [--scaling-factor S]
  ldm export --from-diffusers-vae DIR OUT

Exit status: 0 written, 2 the export cannot be made as asked (the message says why).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("%(prog)s [options] RUN_DIR OUT\n"
               "       %(prog)s (--from-ldm-vae FILE | --from-diffusers-vae DIR) [options] OUT")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="RUN_DIR OUT: the run directory and the output folder (only OUT with --from-*-vae)")
    p.add_argument("--format", choices=("safetensors", "diffusers", "onnx"), default="safetensors", dest="fmt")
    p.add_argument("--no-ema", action="store_true", help="export the live weights instead of the EMA")
    p.add_argument("--ema-sigma-rel", type=float, default=None, metavar="X",
                   help="export the post-hoc EMA of this sigma_rel, reconstructed from RUN_DIR/phema/ (ldm ema; "
                        "safetensors format)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the safetensors files (ONNX graphs are fp32)")
    p.add_argument("--tag", default=None, help="checkpoint tag (step_XXXXXXXX); default: newest complete one")
    p.add_argument("--autoencoder", default=None,
                   help="stage two: the autoencoder export to pack (default: the run's latents.autoencoder)")
    p.add_argument("--reference-autoencoder", action="store_true",
                   help="stage two: reference the autoencoder by absolute path instead of copying it")
    p.add_argument("--text-encoder", choices=("auto", "copy", "reference"), default="auto",
                   help="stage two: write the text tower's weights into the export (auto: unless it is an "
                        "open_clip pretrained tag)")
    p.add_argument("--no-onnx-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run: write the merged weights (default: base weights + OUT/pytorch_lora_weights."
                        "safetensors for diffusers' load_lora_weights)")
    g = p.add_argument_group("importing a VAE")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--from-ldm-vae", metavar="FILE", default=None,
                     help="an LDM/SD VAE or full SD checkpoint (.safetensors, or .ckpt/.pt read weights_only)")
    src.add_argument("--from-diffusers-vae", metavar="DIR", default=None,
                     help="a diffusers AutoencoderKL folder (or a pipeline folder with vae/)")
    g.add_argument("--ldm-config", default=None, help="LDM/SD yaml giving the VAE architecture and scale_factor")
    g.add_argument("--resolution", type=int, default=256,
                   help="without --ldm-config: the resolution attn_resolutions refer to (default 256)")
    g.add_argument("--scaling-factor", type=float, default=None)
    g.add_argument("--shift-factor", type=float, default=None)
    g.add_argument("--stats-urls", nargs="*", default=[], metavar="URL",
                   help="measure scaling/shift factors on these shards when the source gives none")
    g.add_argument("--stats-batches", type=int, default=32)


def _posthoc_weights(out, args):
    from launch.runtime.exportdir import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE, write_safetensors
    from launch.runtime.posthoc import reconstruct

    if args.fmt != "safetensors" or args.merge_lora:
        raise ValueError("--ema-sigma-rel exports the safetensors format only (without --merge-lora)")
    weights, info = reconstruct(args.paths[0], [args.ema_sigma_rel])
    config = json.loads((out / CONFIG_FILE).read_text())
    config["weights"] = f"posthoc_ema sigma_rel={args.ema_sigma_rel:g} step={info['step']}"
    write_safetensors(weights[args.ema_sigma_rel], out / WEIGHTS_FILE, args.dtype,
                      {"format": EXPORT_FORMAT, "step": info["step"], "weights": config["weights"],
                       "dtype": args.dtype})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


def run(args) -> int:
    import warnings

    from launch.interop.export import export_run
    from launch.runtime.exportdir import ExportError

    importing = args.from_ldm_vae or args.from_diffusers_vae
    want = 1 if importing else 2
    if len(args.paths) != want:
        usage = "ldm export --from-*-vae SRC OUT" if importing else "ldm export RUN_DIR OUT"
        print(f"ldm export: expected {want} path(s): {usage}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, *a, **k: print(f"ldm export: warning: {m}", file=sys.stderr)
            if importing:
                from launch.interop.vae_import import import_diffusers_vae, import_ldm_vae

                common = dict(scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
                              stats_urls=args.stats_urls, stats_batches=args.stats_batches, dtype=args.dtype,
                              fmt=args.fmt, onnx_check=not args.no_onnx_check)
                if args.from_ldm_vae:
                    out = import_ldm_vae(args.from_ldm_vae, args.paths[0], ldm_config=args.ldm_config,
                                         resolution=args.resolution, **common)
                else:
                    out = import_diffusers_vae(args.from_diffusers_vae, args.paths[0], **common)
            else:
                out = export_run(args.paths[0], args.paths[1], use_ema=not args.no_ema, dtype=args.dtype,
                                 tag=args.tag, autoencoder=args.autoencoder,
                                 copy_autoencoder=not args.reference_autoencoder, fmt=args.fmt,
                                 text_encoder=args.text_encoder, onnx_check=not args.no_onnx_check,
                                 merge_lora=args.merge_lora)
                if args.ema_sigma_rel is not None:      # launch/runtime/posthoc.py: EDM2 reconstruction
                    out = _posthoc_weights(out, args)
    except (ExportError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ldm export: error: {msg}", file=sys.stderr)
        return 2
    config = json.loads((out / "config.json").read_text())
    print(json.dumps({"out": str(out), "kind": config["kind"], "step": config["step"],
                      "weights": config["weights"], "dtype": config.get("dtype"),
                      "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}))
    return 0
