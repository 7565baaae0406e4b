"""`ldm bench quality --quick`: the recipe table end to end at toy size. The compositional demo's phases run
once, each row trains its own stage two through the real runtime with steps set for equal training FLOPs,
samples the same captions and is judged; the table lands in the result files and the README block."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import quality
from bench.report import render
from launch.runtime.config import load_config


@pytest.fixture()
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_BENCH_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def test_equal_flops_per_row_and_every_row_judged(tmp_path, results):
    rc = quality.main(["--quick", "--demo", str(tmp_path / "demo"), "--rows", "unet-flow-ln,unet-eps,mmdit-flow-ln",
                       "--steps", "6", "--seen", "8", "--held-out", "4"])
    assert rc == 0
    result = json.loads((results / "quality_quick.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["unet-flow-ln", "unet-eps", "mmdit-flow-ln"]
    ref = rows["unet-flow-ln"]
    assert ref["steps"] == 6 and ref["final_step"] == 6
    # every row at the table's batch, not the demo config's (64 for the compositional demo)
    assert result["batch"] == quality.TABLE_BATCH == 128
    assert ref["train_gflop"] == pytest.approx(ref["gflop_per_sample"] * 6 * 128, rel=1e-9)
    # the objective does not change the network: same FLOPs, same steps; another network gets its own count
    assert rows["unet-eps"]["gflop_per_sample"] == pytest.approx(ref["gflop_per_sample"], rel=1e-9)
    assert rows["unet-eps"]["steps"] == 6
    mm = rows["mmdit-flow-ln"]
    assert mm["gflop_per_sample"] != pytest.approx(ref["gflop_per_sample"], rel=0.05)
    assert mm["train_gflop"] == pytest.approx(ref["train_gflop"], rel=0.5 / min(mm["steps"], 6) + 1e-6)
    assert mm["final_step"] == mm["steps"]
    for r in rows.values():
        assert 0.0 <= r["overall"] <= 1.0 and 0.0 <= r["held_out"] <= 1.0 and r["params"] > 0
        assert set(r["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    table = (results / "quality_quick.md").read_text()
    assert "mmdit-flow-ln" in table and "held-out" in table


def test_unknown_row_is_refused_before_any_compute(tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--demo", str(tmp_path / "demo"), "--rows", "unet-flow-ln,gan"])
    err = capsys.readouterr().err
    assert "gan" in err and "mmdit-flow-ln" in err
    assert not (tmp_path / "demo").exists()


def test_readme_block_shows_the_full_table_only(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    assert "Not measured yet: run `ldm bench quality`" in render(folder)
    (folder / "quality.json").write_text(json.dumps({"rows": [], "host": {"threads": 2}}))
    (folder / "quality.md").write_text("| row |\n| --- |\n| unet-flow-ln |\n")
    assert "| unet-flow-ln |" in render(folder) and "equal compute per row" in render(folder)


def test_shapes_tier_rows_are_judged_by_colour_shape_and_background(tmp_path, results):
    """`--tier shapes`: the same machinery on the one-shape demo (its 8x8 latents, its judge): the MMDiT row
    gets the FLOP-matched steps over the UNet reference, a row with its own batch gets the steps that keep its
    FLOPs equal, and the table lands apart from the compositional one."""
    rc = quality.main(["--tier", "shapes", "--quick", "--demo", str(tmp_path / "demo"),
                       "--rows", "unet-flow-ln,mmdit-flow-ln,mmdit-p2-pooled-b32-flow-ln", "--steps", "6"])
    assert rc == 0
    result = json.loads((results / "quality_shapes_quick.json").read_text())
    assert result["tier"] == "shapes" and not (results / "quality_quick.json").exists()
    rows = {r["row"]: r for r in result["rows"]}
    ref, mm, small = rows["unet-flow-ln"], rows["mmdit-flow-ln"], rows["mmdit-p2-pooled-b32-flow-ln"]
    assert ref["steps"] == 6 and mm["final_step"] == mm["steps"] == round(
        6 * ref["gflop_per_sample"] / mm["gflop_per_sample"])
    assert (ref["batch"], mm["batch"], small["batch"]) == (128, 128, 32)
    assert small["final_step"] == small["steps"] == round(6 * 128 * ref["gflop_per_sample"] /
                                                          (32 * small["gflop_per_sample"]))
    assert small["train_gflop"] == pytest.approx(ref["train_gflop"], rel=0.5 / small["steps"] + 1e-6)
    for r in rows.values():
        assert set(r["tasks"]) == {"color", "shape", "background"}
        assert 0.0 <= r["overall"] <= 1.0 and 0.0 <= r["held_out"] <= 1.0 and 0.0 <= r["seen"] <= 1.0
    assert "background" in (results / "quality_shapes_quick.md").read_text()


def _table(rows, steps=1800, cpu="A"):
    h = {"cpu": cpu, "time": "2026-12-07T00:00:00"}
    return {"benchmark": "quality", "tier": "compositional", "quick": False, "reference": "unet-flow-ln",
            "reference_steps": steps, "seen_prompts": 240, "held_out_prompts": 120, "host": h,
            "rows": [{"row": n, "overall": v} for n, v in rows]}


def test_a_run_of_some_rows_adds_them_to_the_saved_table():
    """`--rows X` on a table of the same settings: X is added (or replaced), the other rows keep their figures
    and the host they were measured on; rows come in the table's row order. Other settings replace the table."""
    saved = _table([("unet-flow-ln", 0.49), ("mmdit-flow-ln", 0.15)], cpu="Xeon")
    new = _table([("mmdit-rope-flow-ln", 0.3), ("mmdit-flow-ln", 0.2)], cpu="EPYC")
    merged = quality.merge_rows(saved, new)
    assert [r["row"] for r in merged["rows"]] == ["unet-flow-ln", "mmdit-flow-ln", "mmdit-rope-flow-ln"]
    by = {r["row"]: r for r in merged["rows"]}
    assert by["unet-flow-ln"]["overall"] == 0.49 and by["unet-flow-ln"]["host"]["cpu"] == "Xeon"
    assert by["mmdit-flow-ln"]["overall"] == 0.2 and by["mmdit-flow-ln"]["host"]["cpu"] == "EPYC"
    assert "| Xeon, 2026-12-07 |" in quality.to_markdown({**merged, "rows": [
        {**by["unet-flow-ln"], "what": "w", "params": 1, "steps": 1, "train_gflop": 1, "train_seconds": 1,
         "tasks": {t: 0.5 for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr")},
         "seen": 0.5, "held_out": 0.5}]})
    other = _table([("mmdit-rope-flow-ln", 0.3)], steps=900)
    assert [r["row"] for r in quality.merge_rows(saved, other)["rows"]] == ["mmdit-rope-flow-ln"]
    # a table saved before the batch was recorded ran at TABLE_BATCH; another batch is another table
    assert len(quality.merge_rows(saved, {**new, "batch": quality.TABLE_BATCH})["rows"]) == 3
    assert [r["row"] for r in quality.merge_rows(saved, {**new, "batch": 64})["rows"]] == \
        ["mmdit-rope-flow-ln", "mmdit-flow-ln"]


def test_another_step_count_is_a_table_of_its_own(tmp_path, results, monkeypatch):
    """`--steps N` other than the demo config's saves `quality_shapes_stepsN` beside the equal-compute table
    (which stays as it was), and the README block shows it right after that table, naming N and the command."""
    results.mkdir()
    kept = _table([("unet-flow-ln", 0.9)], steps=1100)
    (results / "quality_shapes.json").write_text(json.dumps(kept))
    (results / "quality_shapes.md").write_text("| row |\n| --- |\n| unet-flow-ln |\n")
    asked = {}

    def fake_run(demo, rows, steps, *args):
        asked["steps"] = steps
        return {**_table([(r, 0.5) for r in rows], steps=steps), "tier": "shapes",
                "rows": [{"row": r, "what": r, "params": 1e6, "steps": steps, "train_gflop": 1.0, "train_seconds": 1.0,
                          "tasks": {t: 0.5 for t in quality.SHAPE_TASKS}, "seen": 0.5, "held_out": 0.5,
                          "overall": 0.5} for r in rows]}
    monkeypatch.setattr(quality, "run", fake_run)
    assert quality.main(["--tier", "shapes", "--demo", str(tmp_path / "demo"), "--rows", "mmdit-flow-ln",
                         "--steps", "3300"]) == 0
    assert asked["steps"] == 3300
    assert json.loads((results / "quality_shapes.json").read_text()) == kept
    assert [r["row"] for r in json.loads((results / "quality_shapes_steps3300.json").read_text())["rows"]] == \
        ["mmdit-flow-ln"]
    block = render(results)
    shapes_at = block.index("Denoisers on the shapes demo's data")
    longer_at = block.index("at 3,300 reference steps")
    assert shapes_at < longer_at < block.index("ZeRO memory per rank")
    assert "`ldm bench quality --tier shapes --steps 3300` -> `bench/results/quality_shapes_steps3300.json`" in block


def test_every_row_builds_and_patch_two_rows_cost_less_per_sample():
    """Each row's overrides load over the demo's diffusion config and build a network whose training FLOPs
    are counted; the patch-2 rows see 4x fewer image tokens, so at equal FLOPs they train for more steps."""
    config = Path(quality.__file__).resolve().parents[1] / "configs" / "demo" / "diffusion.yaml"
    side = 8   # the shapes tier's latent grid
    for _, overrides in quality.ROWS.values():
        load_config(config, overrides(side))          # validated on load: a bad key or value raises
    counted = {name: quality.flops_per_sample(config, quality.ROWS[name][1](side))
               for name in ("dit-flow-ln", "dit-p2-flow-ln", "mmdit-flow-ln", "mmdit-p2-flow-ln")}
    for kind in ("dit", "mmdit"):
        (p1, params1), (p2, params2) = counted[f"{kind}-flow-ln"], counted[f"{kind}-p2-flow-ln"]
        # only the patch embedding and the final projection grow with the patch (4x the channels per token)
        assert params2 > params1 and params2 < 1.05 * params1
        assert p2 < 0.7 * p1


def test_flops_of_a_row_with_pooled_text_count_its_embedder():
    """A row that feeds pooled text into the modulation (SD3's design) is counted with a pooled input: its
    FLOPs are the same network's plus the pooled MLP's (two Linears, forward and backward)."""
    config = Path(quality.__file__).resolve().parents[1] / "configs" / "demo" / "diffusion.yaml"
    base = quality.ROWS["mmdit-p2-flow-ln"][1](8)
    plain, params = quality.flops_per_sample(config, base)
    pooled, params_pooled = quality.flops_per_sample(config, [*base, "denoiser.pooled_dim=64"])
    width = 128                                    # the rows' hidden size
    assert params_pooled - params == 64 * width + width * width + 2 * width     # pooled -> width -> width
    # 2 forward + 2 weight-gradient FLOPs per weight, + 2 input-gradient ones past the first Linear (the
    # pooled input itself needs no gradient)
    assert pooled - plain == pytest.approx(4 * 64 * width + 6 * width * width, rel=1e-6)
