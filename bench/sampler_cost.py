"""Sampler cost at equal quality on the 2-D Gaussian mixture of the stage-two math test.

Setup reused from `tests/ldm/test_ldm_mixture.py` (its mixture, MLP denoiser, training loop and
objectives, imported from that file): for each objective (eps / v / flow) train the mixture model once,
then for each sampler find the fewest steps whose unconditional samples reach a fixed quality.

"Equal quality": the sliced 2-Wasserstein distance (64 random directions) between N samples and N fresh
draws of the true mixture is at most a threshold. The threshold is 1.25 x the distance the trained model
itself reaches when its probability-flow ODE is solved accurately (heun, 200 steps), but never below twice
the distance between two independent true draws of N points (the estimator's own noise). So every
sampler is judged against the same model, and "reached" means "as good as this model gets, within 25 %".
Steps are searched on a fixed grid, smallest first; a count passes only if the next grid count passes too
(one lucky seed does not count). Reported per sampler: steps, model evaluations per image (heun: two per
step except its Euler-only steps; counted by wrapping the model), wall time per image (median of 3), and
the distance reached.

    python -m bench.sampler_cost [--quick] [--json] [--threads N]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Optional

import torch

from .common import host, markdown_table, median, save, set_threads

REPO = Path(__file__).resolve().parents[1]
MIXTURE_TEST = REPO / "tests" / "ldm" / "test_ldm_mixture.py"
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")
GRID = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 100, 128, 160, 200, 256)
REFERENCE = ("heun", 200)
SLACK = 1.25


def mixture_module():
    """The mixture test's module (its setup is the benchmark's), loaded from its file."""
    spec = importlib.util.spec_from_file_location("ldm_mixture_setup", MIXTURE_TEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance between equal-size point clouds [N, 2] over unit `directions` [K, 2]."""
    pa, _ = torch.sort(a @ directions.T, dim=0)
    pb, _ = torch.sort(b @ directions.T, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


class Counted:
    """Wraps the model callable and counts evaluations (one call = one evaluation per image)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.fn(x, t, cond)


def _sample(mix, objective, fn, name: str, steps: int, n: int, seed: int):
    from ldm.conditioning import unconditional_like
    from ldm.samplers import sample

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    cond = unconditional_like({"labels": torch.zeros(n, dtype=torch.long)}, "learned")
    with torch.no_grad():
        return sample(name, fn, objective, noise, cond, steps, generator=g)


def evaluate_objective(mix, kind: str, n: int, train_steps: Optional[int], grid, samplers) -> dict:
    make, default_steps, _ = mix.CASES[kind]
    objective = make()
    t0 = time.perf_counter()
    net = mix.train(objective, steps=train_steps or default_steps)
    train_s = time.perf_counter() - t0
    fn = mix.model_fn(net, objective)
    g = torch.Generator().manual_seed(123)
    directions = torch.randn(64, 2, generator=g)
    directions = directions / directions.norm(dim=1, keepdim=True)
    truth = mix.draw(n, g)[0]
    noise_floor = sliced_w2(mix.draw(n, g)[0], truth, directions)
    ref = sliced_w2(_sample(mix, objective, fn, REFERENCE[0], REFERENCE[1], n, 1), truth, directions)
    threshold = max(SLACK * ref, 2 * noise_floor)

    results = {}
    for name in samplers:
        curve, found = {}, None
        for i, steps in enumerate(grid):
            d = sliced_w2(_sample(mix, objective, fn, name, steps, n, 1), truth, directions)
            curve[steps] = round(d, 4)
            if d <= threshold and found is None:
                nxt = grid[i + 1] if i + 1 < len(grid) else None
                if nxt is None:
                    found = steps
                    break
                d2 = sliced_w2(_sample(mix, objective, fn, name, nxt, n, 1), truth, directions)
                curve[nxt] = round(d2, 4)
                if d2 <= threshold:
                    found = steps
                    break
        entry = {"steps": found, "reached": found is not None, "sw2_curve": curve}
        if found is not None:
            counted = Counted(fn)
            _sample(mix, objective, counted, name, found, n, 1)
            walls = []
            for r in range(3):
                t0 = time.perf_counter()
                _sample(mix, objective, fn, name, found, n, 2 + r)
                walls.append(time.perf_counter() - t0)
            entry.update(model_evals_per_image=counted.calls, wall_us_per_image=round(1e6 * median(walls) / n, 3),
                         sw2=curve[found])
        results[name] = entry
    return {"objective": kind, "train_steps": train_steps or default_steps, "train_s": round(train_s, 1),
            "samples": n, "reference": {"sampler": REFERENCE[0], "steps": REFERENCE[1], "sw2": round(ref, 4)},
            "noise_floor_sw2": round(noise_floor, 4), "threshold_sw2": round(threshold, 4), "samplers": results}


def run(quick: bool = False, threads: Optional[int] = None, save_results: bool = True) -> dict:
    threads = set_threads(threads or 1)     # a 2-D MLP: one thread is fastest
    mix = mixture_module()
    torch.manual_seed(0)
    if quick:
        objectives = [evaluate_objective(mix, "flow", 1000, 300, (2, 4, 8, 16, 32, 64, 128, 200),
                                         ("euler", "heun", "dpmpp_2m"))]
    else:
        objectives = [evaluate_objective(mix, k, 4000, None, GRID, SAMPLERS) for k in ("eps", "v", "flow")]
    result = {"name": "sampler", "quick": quick, "host": host(threads),
              "quality": f"sliced W2 <= max({SLACK} x reference ODE solve, 2 x truth-vs-truth noise)",
              "objectives": objectives}
    if save_results:
        save("sampler" + ("_quick" if quick else ""), result, table(result))
    return result


def table(result: dict) -> str:
    rows = []
    for obj in result["objectives"]:
        for name, e in obj["samplers"].items():
            rows.append((obj["objective"], name, e["steps"] if e["reached"] else "not reached",
                         e.get("model_evals_per_image", ""), e.get("wall_us_per_image", ""),
                         e.get("sw2", ""), obj["threshold_sw2"]))
    return markdown_table(["objective", "sampler", "steps", "model evals / image", "wall us / image",
                           "sliced W2", "threshold"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    args = p.parse_args(argv)
    result = run(args.quick, args.threads)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
