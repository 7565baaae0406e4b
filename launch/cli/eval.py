"""`ldm eval recon | fid | clip-score | adherence`: metrics for exports and sample folders."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "eval"
HELP = "evaluate: reconstruction (PSNR/SSIM/LPIPS), FID/KID, CLIP score, prompt adherence on synthetic data"
DESCRIPTION = """Metrics; every weights file is local (nothing is downloaded).

  ldm eval recon AE_EXPORT URLS... [--max-samples N] [--vgg FILE]     PSNR, SSIM, LPIPS (when VGG16 is found)
  ldm eval fid SAMPLES_DIR REF... [--inception FILE]                  FID and KID against shards or a folder
  ldm eval clip-score SAMPLES_DIR [--clip-arch A --clip-weights FILE]  CLIP score against prompts.json
  ldm eval adherence SAMPLES_DIR [--holdout C:S:B ...] [--json]        color / shape / background accuracy
  ldm eval compositional SAMPLES_DIR [--holdout ITEM ...] [--json]     GenEval-style tasks on the compositional tier

Weights: Inception from --inception, $LDM_INCEPTION_WEIGHTS, or $LDM_EVAL_WEIGHTS_DIR (default: torch hub's
checkpoints/ folder) holding pt_inception-2015-12-05-6726825d.pth (FID Inception) or
inception_v3_google-0cc3c7bd.pth; CLIP from --clip-weights, $LDM_CLIP_WEIGHTS, or
$LDM_EVAL_WEIGHTS_DIR/open_clip_<arch>.safetensors; VGG16 for LPIPS as in training (loss.vgg_path or the
torch hub cache). Results go to stdout as JSON (--json) or as a short text, and to --out FILE as JSON.
Exit status: 0, or 2 when an input or a weights file is missing (the message names it).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="METRIC", required=True)

    def common(q):
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result to FILE")
        q.add_argument("--device", default="cpu")

    q = sub.add_parser("recon", help="reconstruction metrics of an autoencoder export on shards")
    q.add_argument("export_dir", metavar="AE_EXPORT")
    q.add_argument("urls", nargs="+", metavar="URLS")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--max-samples", type=int, default=None)
    q.add_argument("--size", type=int, default=None, help="image side (default: the autoencoder's resolution)")
    q.add_argument("--vgg", default=None, help="VGG16 weights for LPIPS (torchvision vgg16-397923af.pth)")
    q.add_argument("--lpips", choices=("auto", "on", "off"), default="auto",
                   help="auto: LPIPS when the VGG16 file is found (default)")
    common(q)

    q = sub.add_parser("fid", help="FID and KID of a sample folder against reference shards (or a folder)")
    q.add_argument("samples_dir", metavar="SAMPLES_DIR")
    q.add_argument("ref", nargs="+", metavar="REF", help="reference shard URLs, or one folder of images")
    q.add_argument("--inception", default=None, metavar="FILE", help="Inception-v3 weights file")
    q.add_argument("--max-ref", type=int, default=None, help="use at most this many reference images")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--kid-subsets", type=int, default=100)
    q.add_argument("--kid-subset-size", type=int, default=1000)
    q.add_argument("--inception-size", type=int, default=299,
                   help="Inception input side (299; smaller only for quick checks, min 75)")
    common(q)

    q = sub.add_parser("clip-score", help="CLIP score of a sample folder against its prompts.json")
    q.add_argument("samples_dir", metavar="SAMPLES_DIR")
    q.add_argument("--clip-arch", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    q.add_argument("--clip-weights", default=None, metavar="FILE", help="its weights file")
    q.add_argument("--clip-model-config", default=None, metavar="JSON",
                   help="open_clip model-config JSON for an arch open_clip does not ship")
    q.add_argument("--batch-size", type=int, default=32)
    common(q)

    q = sub.add_parser("adherence", help="prompt adherence of samples from synthetic captions",
                       description="Judges color, background and shape from the pixels of each image named in "
                                   "SAMPLES_DIR/prompts.json and compares them with its caption.")
    q.add_argument("samples_dir", metavar="SAMPLES_DIR")
    q.add_argument("--holdout", action="append", default=[], metavar="COLOR:SHAPE:BACKGROUND",
                   help="a held-out triple, reported separately (repeatable; 'default' = the demo's set)")
    q.add_argument("--details", action="store_true", help="include the judgement of every image")
    common(q)

    q = sub.add_parser("compositional", help="GenEval-style scores of samples from compositional captions",
                       description="Reads every object (colour, shape, centroid) from the pixels of each image "
                                   "named in SAMPLES_DIR/prompts.json and scores single object, two objects, "
                                   "counting, colours, position and colour attribution; seen and held-out apart.")
    q.add_argument("samples_dir", metavar="SAMPLES_DIR")
    q.add_argument("--holdout", action="append", default=[], metavar="ITEM",
                   help="held-out compositions, as `ldm data synth --tier compositional --exclude` takes them "
                        "(default: the tier's default held-out set)")
    q.add_argument("--details", action="store_true", help="include the judgement of every image")
    common(q)


def _emit(args, result: dict, text: str | None = None) -> None:
    blob = json.dumps(result, indent=1)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(blob)
    print(blob if args.json or text is None else text)


def _fmt(v, spec=".4f"):
    return "n/a" if v is None else format(v, spec)


def run(args) -> int:
    from launch.evaluate.inception import EvalWeightsError

    try:
        if args.eval_command == "recon":
            from launch.evaluate.scores import recon_metrics

            r = recon_metrics(args.export_dir, args.urls, batch_size=args.batch_size, max_samples=args.max_samples,
                              image_size=args.size, vgg=args.vgg, lpips=args.lpips, device=args.device,
                              progress=not args.json)
            _emit(args, r, f"{r['samples']} images at {r['image_size']} px: PSNR {_fmt(r['psnr'], '.2f')} dB  "
                           f"SSIM {_fmt(r['ssim'])}  LPIPS {_fmt(r['lpips'])} ({r['lpips_backbone']})")
        elif args.eval_command == "fid":
            from launch.evaluate.scores import fid_kid

            r = fid_kid(args.samples_dir, args.ref, inception=args.inception, size=args.inception_size,
                        batch_size=args.batch_size, max_ref=args.max_ref, kid_subsets=args.kid_subsets,
                        kid_subset_size=args.kid_subset_size, device=args.device)
            _emit(args, r, f"FID {r['fid']:.3f}  KID {r['kid']:.5f} +- {r['kid_std']:.5f}  "
                           f"({r['n_samples']} samples vs {r['n_ref']} reference, Inception {r['inception']['variant']})")
        elif args.eval_command == "clip-score":
            from launch.evaluate.scores import clip_score

            r = clip_score(args.samples_dir, arch=args.clip_arch, weights=args.clip_weights,
                           model_config=args.clip_model_config, batch_size=args.batch_size, device=args.device)
            _emit(args, r, f"CLIP score {r['clip_score']:.2f} +- {r['clip_score_std']:.2f} over {r['n']} images "
                           f"({r['clip']['arch']})")
        elif args.eval_command == "compositional":
            from data_pipeline.compositional import HoldOut
            from launch.evaluate.compositional import evaluate_dir as judge_dir
            from launch.evaluate.compositional import format_report as format_compositional

            holdout = HoldOut.parse(args.holdout or ["default"])
            rep = judge_dir(args.samples_dir, holdout=holdout, details=args.details)
            _emit(args, rep.to_dict(), format_compositional(rep))
        else:
            from data_pipeline.synthetic import DEFAULT_HOLDOUT
            from launch.evaluate.adherence import evaluate_dir, format_report

            holdout = []
            for h in args.holdout:
                holdout.extend(DEFAULT_HOLDOUT if h == "default" else [h])
            r = evaluate_dir(args.samples_dir, holdout=holdout, details=args.details)
            _emit(args, r, format_report(r))
    except (EvalWeightsError, FileNotFoundError, ValueError) as e:
        print(f"ldm eval {args.eval_command}: error: {e}", file=sys.stderr)
        return 2
    return 0
