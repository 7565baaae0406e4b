"""The README's "Performance" section, generated from `bench/results/*.json` (never typed by hand).

Each benchmark saves `<name>.json` (the figures) and `<name>.md` (their table). This module writes, for
each full (non-quick) result present, its table under a heading that says what was compared, on which
host, with which load, and the command that regenerates it; then replaces the README text between
`<!-- bench:start -->` and `<!-- bench:end -->`. A benchmark without a full result is listed as not yet
measured, so the README never shows a quick (tiny-model) figure as if it were the real one.

    python -m bench.report [--readme README.md] [--results DIR] [--print]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .common import RESULTS, RESULTS_ENV, steps_table

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# result name -> (heading, what it shows, the command that makes it)
SECTIONS = {
    "train": ("Training step: ours vs diffusers (CPU)",
              "Same architecture, batch, dtype (fp32; bf16 = autocast over fp32 weights), AdamW and threads, one "
              "process, steps alternating A B A B, medians. MFU = the peer's nominal FLOPs per step x steps/s / the "
              "matmul peak measured in the same run (the best of one measurement before the timings and one after); "
              "oneDNN's Winograd convolutions can push conv models past 100 %.",
              "ldm bench train"),
    "gpu": ("On a GPU: SD-UNet and DiT-XL/2 training steps, ZeRO-2 memory vs `ldm plan`",
            "256 px, bf16 autocast, torch SDPA, torch.compile off and on, ours vs diffusers with the same weights; "
            "MFU against the GPU's bf16 GEMM peak measured in the same run; then a live DeepSpeed ZeRO-2 engine's "
            "allocator peak beside the planner's prediction.", "bench/gpu.sh"),
    "precomputed": ("Stage two: precomputed latents vs online encoding",
                    "The runtime's loader and training step, alternating, one process.", "ldm bench precomputed"),
    "loader": ("Loader vs the JPEG decode bound", "One process decoding the same bytes in a tight loop is the bound.",
               "ldm bench loader"),
    "sampler": ("Sampler cost at equal quality (2-D mixture)",
                "Fewest steps reaching 1.25 x the sliced W2 of an accurate ODE solve of the same model.",
                "ldm bench sampler"),
    "quality": ("Recipe table: GenEval-style scores on the compositional tier, equal compute per row",
                "Stage two trained from the same latents of `ldm demo --tier compositional`, equal training FLOPs "
                "per row (the reference: the demo's recipe), the same sampler and captions; scores judged from the "
                "pixels (percent), held-out compositions apart. A CPU-sized version of the SD3 paper's comparison.",
                "ldm bench quality"),
    "quality_shapes": ("Denoisers on the shapes demo's data: UNet vs DiT vs MMDiT, equal compute per row",
                       "Stage two trained from the same latents of `ldm demo` (one shape, colour and background per "
                       "image), equal training FLOPs per row (the reference: the demo's UNet recipe at its step count), "
                       "the same sampler and prompts (every triple, the held-out ones more often); accuracy judged "
                       "from the pixels (percent), held-out triples apart.", "ldm bench quality --tier shapes"),
    "zero": ("ZeRO memory per rank (2 ranks)", "Measured from live DeepSpeed engines after one step, beside "
             "DeepSpeed's own estimator.", "ldm bench zero"),
}


def _host_line(result: dict) -> str:
    h = result.get("host") or {}
    parts = [h.get("cpu") or h.get("gpu"), f"{h['threads']} threads" if h.get("threads") else None,
             f"torch {h['torch']}" if h.get("torch") else None,
             f"diffusers {h['diffusers']}" if h.get("diffusers") else None,
             f"load before {h['loadavg'][0]}" if h.get("loadavg") else None, h.get("time")]
    return ", ".join(str(p) for p in parts if p)


def drift_warnings(result: dict) -> list[str]:
    """The lock check for one result: its recorded torch / diffusers against requirements/cpu.lock."""
    from launch.runtime.lockfile import warn_if_drifted

    h = result.get("host") or {}
    return warn_if_drifted({k: h[k] for k in ("torch", "diffusers") if h.get(k)})


def _steps_variants(base: str, results: Path) -> list[int]:
    """The reference step counts at which `base` was also trained (`ldm bench quality --steps N` saves those
    tables apart, e.g. `quality_shapes_steps3300`), ascending: shown right after `base`'s equal-compute table."""
    prefix = steps_table(base, "")
    return sorted(int(p.stem[len(prefix):]) for p in results.glob(f"{prefix}*.json") if p.stem[len(prefix):].isdigit())


def _steps_text(text: tuple[str, str, str], steps: int) -> tuple[str, str, str]:
    heading, what, command = text
    return (f"{heading}, at {steps:,} reference steps",
            f"{what} The reference here trains {steps:,} steps instead of the demo config's count, so every row "
            f"gets that much more compute; compare with the table above.", f"{command} --steps {steps}")


def section(name: str, results: Path, text: tuple[str, str, str] | None = None) -> str:
    heading, what, command = text or SECTIONS[name]
    js, md = results / f"{name}.json", results / f"{name}.md"
    if not js.is_file() or not md.is_file():
        return f"#### {heading}\n\nNot measured yet: run `{command}`.\n"
    result = json.loads(js.read_text())
    if result.get("skipped"):
        return f"#### {heading}\n\nSkipped: {result['skipped']}.\n"
    host = _host_line(result)
    drifted = "".join(f"\n> **Not the locked versions:** {w}\n" for w in drift_warnings(result))
    return (f"#### {heading}\n\n{what}\n{drifted}\n{md.read_text().rstrip()}\n\n"
            f"<sub>`{command}` -> `bench/results/{name}.json`" + (f"; {host}" if host else "") + "</sub>\n")


def render(results: Path = RESULTS) -> str:
    parts = []
    for base, text in SECTIONS.items():
        parts.append(section(base, results))
        parts += [section(steps_table(base, n), results, _steps_text(text, n)) for n in _steps_variants(base, results)]
    body = "\n".join(parts)
    return (f"{START}\n<!-- generated by `ldm bench report` from bench/results/*.json: edit bench/report.py, "
            f"not this block -->\n{body}{END}")


def update_readme(readme: Path, results: Path = RESULTS) -> bool:
    """Replace the block between the markers; returns whether the file changed."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} block to replace")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: render(results), text, flags=re.S)
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--results", default=os.environ.get(RESULTS_ENV) or str(RESULTS))
    p.add_argument("--print", action="store_true", help="print the block instead of writing the README")
    args = p.parse_args(argv)
    if args.print:
        print(render(Path(args.results)))
        return 0
    for name in SECTIONS:
        js = Path(args.results) / f"{name}.json"
        if js.is_file():
            for w in drift_warnings(json.loads(js.read_text())):
                print(f"warning: bench/results/{name}.json: {w}", file=sys.stderr)
    changed = update_readme(Path(args.readme), Path(args.results))
    print(f"{args.readme}: Performance block {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
