"""The study: a shrunken run through the real stages on the tiny world, and the seed statistics."""

import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from react_vl.concepts import CONTROL_TASKS, MINI_TASKS, TARGET_TASKS
from react_vl.experiment import cache_key
from react_vl.study import (
    ABLATIONS,
    Run,
    StudyConfig,
    base_row,
    choose_schedule,
    chosen_strategy_rows,
    default_ablations,
    fair_strategy_choice,
    gain_in_seed_std,
    gates_table,
    mean_std,
    plan_study,
    run_study,
    study_figure,
    table_row,
)



def _result(seed, scores, trainable=10):
    return {"key": f"x_seed{seed}", "seed": seed, "scores": scores, "trainable_params": trainable,
            "train_pairs": 100, "gates": {}}


def test_mean_std_and_rows_on_known_numbers():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0, 8.0]) == (6.0, pytest.approx(2 ** 1.5))
    assert mean_std([5.0]) == (5.0, None)

    base = {t: 50.0 for t in TARGET_TASKS + CONTROL_TASKS}
    runs = [_result(s, {**{t: 60.0 + 2 * s for t in TARGET_TASKS}, **{t: 49.0 - s for t in CONTROL_TASKS}})
            for s in range(3)]
    row = table_row("gated-image", runs, base)
    assert row["scores"][TARGET_TASKS[0]] == {"mean": 62.0, "std": 2.0, "n": 3}
    assert row["target_change"] == {"mean": 12.0, "std": 2.0, "n": 3}
    assert row["control_change"] == {"mean": -2.0, "std": 1.0, "n": 3}

    random_runs = [_result(s, {t: 54.0 + 2 * s for t in TARGET_TASKS + CONTROL_TASKS}) for s in range(3)]
    gain = gain_in_seed_std(row, table_row("random", random_runs, base))
    assert gain[TARGET_TASKS[0]] == {"difference": 6.0, "pooled_std": 2.0, "in_std": 3.0}


def test_gate_table_averages_gate_sizes_not_signs():
    # two seeds whose gates opened as far in opposite directions: open by 0.1, not closed
    runs = [{"key": f"g_seed{seed}", "gates": {"1": {"attn": sign * 0.1, "dense": sign * 0.3}}}
            for seed, sign in enumerate((1, -1))]
    assert gates_table(runs, depth=2)[-1] == "| g |  | 0.100 / 0.300 |"


def test_study_figure_draws_one_panel_per_finished_curve():
    base = {t: 50.0 for t in TARGET_TASKS + CONTROL_TASKS}
    gated = [{**_result(s, {t: 52.0 + s for t in base}), "gates": {"5": {"attn": 0.1, "dense": -0.3}}} for s in (0, 1)]
    rows = [base_row(base), table_row("2 of 6", gated, base), table_row("6 of 6", gated, base)]
    summary = {"tables": {"layers": rows, "subset": [base_row(base)]}, "runs": gated}
    axes = study_figure(summary).axes
    assert [ax.get_title() for ax in axes][1:] == ["gated layers", "gate openings (2 runs)"]
    first_target = axes[1].lines[0]  # the first target's change over base, per layer count
    assert list(first_target.get_xdata()) == [2, 6] and list(first_target.get_ydata()) == [2.5, 2.5]
    assert list(axes[2].lines[1].get_ydata()) == [0.3]  # dense gate: its size, not its sign
    assert study_figure({"tables": {"subset": [base_row(base)]}, "runs": []}) is None  # nothing finished yet


def test_quick_leaves_out_the_second_base_and_neither_runs_methods_unless_named():
    full, quick = default_ablations(quick=False), default_ablations(quick=True)
    assert "concept" in full and "concept" not in quick and "methods" not in full + quick
    assert set(full) - set(quick) == {"concept"} and "strategy" in quick and "fair-strategy" in quick


def test_plan_shares_runs_and_refuses_unknown_ablations():
    plan = plan_study(StudyConfig(), quick=False)
    keys = {label: run.key for label, run in plan["strategy"]}
    assert keys["gated-image"] == dict(plan["subset"])["retrieved"].key == dict(plan["mode"])["both"].key
    assert [label for label, _ in plan["layers"]] == [f"{n} of 6" for n in range(1, 7)]
    assert [label for label, _ in plan["size"]] == ["62 per class", "188 per class", "400 per class", "625 per class"]
    assert len(plan_study(StudyConfig(), quick=True)["size"]) == 2
    assert [label for label, _ in plan["forgetting"]] == ["150 steps", "150 steps, 25% general pairs",
                                                          "150 steps, 50% general pairs", "50 steps", "600 steps",
                                                          "600 steps, 50% general pairs",
                                                          "600 steps, 50% general pairs, random subset"]
    assert [label for label, _ in plan["schedule"]] == ["150 steps", "150 steps, 50% general pairs", "300 steps",
                                                        "300 steps, 50% general pairs", "600 steps",
                                                        "600 steps, 50% general pairs"]
    forgetting = dict(plan["forgetting"])
    assert {run.key for _, run in plan["schedule"]} >= {forgetting["600 steps, 50% general pairs"].key,
                                                        forgetting["150 steps"].key}  # shared runs train once
    assert len(plan_study(StudyConfig(), quick=True)["schedule"]) == 4
    with pytest.raises(ValueError, match="unknown ablation"):
        plan_study(StudyConfig(), ablations=["strategy", "colour"])


def test_schedule_is_chosen_on_validation_scores_by_the_fixed_rule():
    base_val = {t: 50.0 for t in TARGET_TASKS + CONTROL_TASKS}
    points = [(f"{steps} steps", Run(steps=steps)) for steps in (100, 200, 400)]

    def record(steps, seed, target, worst_control):  # test scores the opposite way: they must not count
        val = {**{t: 50.0 + target for t in TARGET_TASKS}, **{t: 50.0 for t in CONTROL_TASKS}}
        val[CONTROL_TASKS[-1]] = 50.0 + worst_control
        key = Run(steps=steps, seed=seed).key
        return key, {"key": key, "val_scores": val, "scores": {t: 100 - v for t, v in val.items()}}

    # 400 steps gains most but loses 3 points on a control (mean over its 2 seeds); 200 keeps them within 2
    records = dict([record(100, 0, 1.0, 0.0), record(200, 0, 4.0, -1.0), record(200, 1, 6.0, -2.5),
                    record(400, 0, 9.0, -2.0), record(400, 1, 9.0, -4.0)])
    choice = choose_schedule(points, records, base_val)
    assert choice["chosen"] == "200 steps" and choice["complete"]
    assert {c["label"]: (c["seeds"], c["val_target_change"], c["val_worst_control_change"])
            for c in choice["candidates"]} == {"100 steps": (1, 1.0, 0.0), "200 steps": (2, 5.0, -1.75),
                                               "400 steps": (2, 9.0, -3.0)}
    del records[Run(steps=100, seed=0).key]
    assert choose_schedule(points, records, base_val)["chosen"] is None  # not every candidate has run
    strict = dict(records, **dict([record(100, 0, 1.0, -2.1)]))
    strict.pop(Run(steps=200, seed=0).key)  # 200 steps now -2.5, 100 steps -2.1: none keeps the controls
    assert choose_schedule(points, strict, base_val)["chosen"] is None


def test_fair_strategy_grid_gives_every_strategy_the_same_candidates_and_chooses_each_on_validation():
    plan = plan_study(StudyConfig(), ablations=["fair-strategy"])["fair-strategy"]
    by_strategy = {}
    for label, run in plan:
        by_strategy.setdefault(run.strategy, []).append((run.lr, run.steps, run.mix_ratio))
    grids = list(by_strategy.values())
    assert len(by_strategy) == 5 and all(g == grids[0] for g in grids) and len(grids[0]) == 4
    assert len({run.key for _, run in plan}) == len(plan)  # the learning rate is part of a run's key
    assert Run(lr=5e-5).key != Run().key == Run(lr=None).key

    base = {"scores": {t: 50.0 for t in TARGET_TASKS + CONTROL_TASKS}, "val_scores": {t: 50.0 for t in TARGET_TASKS +
                                                                                       CONTROL_TASKS}}
    records = {}
    for i, (label, run) in enumerate(plan):  # the last grid point of each strategy gains most on validation
        gain = 1.0 + (i % 4)
        val = {**{t: 50.0 + gain for t in TARGET_TASKS}, **{t: 50.0 for t in CONTROL_TASKS}}
        records[run.key] = {"key": run.key, "seed": 0, "val_scores": val, "trainable_params": i, "train_pairs": 100,
                            "scores": {t: 100 - v for t, v in val.items()}, "gates": {}}
    choice = fair_strategy_choice(plan, records, base)
    assert all(choice[s]["chosen"] == [label for label, run in plan if run.strategy == s][-1] for s in by_strategy)
    rows = chosen_strategy_rows(plan, choice, records, base["scores"])
    assert [r["label"] for r in rows] == ["base", *by_strategy]
    assert all(r["schedule"] == choice[r["label"]]["chosen"] for r in rows[1:])
    assert rows[1]["scores"][TARGET_TASKS[0]]["mean"] == 100 - 54.0  # its test score, not the validation one


@pytest.mark.slow
def test_shrunken_study_end_to_end_and_resumes(tiny_world, tiny_world_config, tiny_trained_model, tmp_path):
    # base_* as conftest's tiny_trained_model was trained, which the study then finds in its base cache
    tiny = StudyConfig(world=tiny_world_config, model="mini-vit-test", base_steps=40, base_batch=64, base_lr=1e-3,
                       per_class=8, steps=4, batch=32, precision="fp32", workers=0)
    out, cache = tmp_path / "study", tmp_path / "cache"
    shutil.copytree(tiny_world, out / "world")  # the same world config: generate_world keeps it
    # the session's pretrained tiny base (same model, steps, batch, lr, seed) is the cached base the study reuses
    base = shutil.copytree(tiny_trained_model.parent, cache / f"base-{cache_key(tiny)}")
    (base / "summary.json").write_text(json.dumps({**json.loads((base / "summary.json").read_text()),
                                                   "cache_key": cache_key(tiny)}))
    summary = run_study(out, quick=True, config=tiny, seeds=1, ablations=["subset", "schedule"], cache_dir=cache)

    saved = json.loads((out / "study.json").read_text())
    assert saved["runs_done"] == saved["runs_planned"] == 6  # the schedule's 4-step run is subset's retrieved one
    subset = {row["label"]: row for row in saved["tables"]["subset"]}
    assert list(subset) == ["base", "retrieved", "random", "oracle"]
    assert subset["base"]["scores"] == {t: {"mean": v, "std": None, "n": 1} for t, v in saved["base"]["scores"].items()}
    assert subset["random"]["train_pairs"] == subset["retrieved"]["train_pairs"] > 0
    assert subset["oracle"]["train_pairs"] == subset["retrieved"]["train_pairs"]
    oracle = pq.read_table(out / "data" / "oracle-seed0" / "selected" / "retrieved.parquet").column("json").to_pylist()
    target_styles = {MINI_TASKS[t]["style"] for t in TARGET_TASKS}
    assert all(json.loads(j)["style"] in target_styles and not json.loads(j)["noisy"] for j in oracle)
    for row in list(subset.values())[1:]:
        assert set(row["scores"]) == set(TARGET_TASKS + CONTROL_TASKS)
        assert all(0 <= s["mean"] <= 100 for s in row["scores"].values())
    for run in saved["runs"]:  # the default for a 2-layer tower: a gated block on the last layer
        assert set(run["gates"]) == {"1"} and run["config"]["lr"] == 5e-4 and run["seconds"]["train"] > 0
        # only the schedule candidates are scored on the validation sets (all retrieved; random/oracle are not)
        assert ("val_scores" in run) == (run["config"]["data"] == "retrieved"), run["key"]
    choice = saved["schedule_choice"]
    assert choice["complete"] and [c["label"] for c in choice["candidates"]] == \
        ["4 steps", "4 steps, 25% general pairs", "8 steps", "8 steps, 25% general pairs"]  # quick: the 25% share
    eligible = [c for c in choice["candidates"] if c["val_worst_control_change"] >= -2]
    assert choice["chosen"] == (max(eligible, key=lambda c: c["val_target_change"])["label"] if eligible else None)
    assert set(saved["base"]["val_scores"]) == set(TARGET_TASKS + CONTROL_TASKS)
    assert saved["retrieved_vs_random"][TARGET_TASKS[0]]["in_std"] is None  # one seed: no spread

    markdown = (out / "study.md").read_text()
    for text in ("| training set | pairs |", "| oracle |", f"{CONTROL_TASKS[0]} (control)",
                 "Gate openings after training", "n/a (one seed)", "](study.png)", "Chosen on the validation sets",
                 "| 8 steps, 25% general pairs | 1 |"):
        assert text in markdown
    assert Image.open(out / "study.png").size[0] > 400  # a real picture: trade-off and gate panels

    results = sorted((out / "runs").glob("*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_study(out, quick=True, config=tiny, seeds=1, ablations=["subset", "schedule"], cache_dir=cache)
    assert [p.stat().st_mtime_ns for p in results] == stamps  # no run was redone
    assert again["tables"] == summary["tables"]
    with pytest.raises(ValueError, match="steps"):
        run_study(out, quick=True, config=dataclasses.replace(tiny, steps=5), seeds=1, cache_dir=cache)


@pytest.mark.slow
def test_concept_ablation_runs_the_same_run_on_the_colour_cue_world(tiny_world, tiny_world_config, tiny_trained_model,
                                                                     tmp_path):
    tiny = StudyConfig(world=tiny_world_config, model="mini-vit-test", base_steps=40, base_batch=64, base_lr=1e-3,
                       per_class=8, steps=4, batch=32, precision="fp32", workers=0)
    out, cache = tmp_path / "study", tmp_path / "cache"
    shutil.copytree(tiny_world, out / "world")
    shutil.copytree(tiny_trained_model.parent, cache / f"base-{cache_key(tiny)}")
    (cache / f"base-{cache_key(tiny)}" / "summary.json").write_text(json.dumps(
        {**json.loads((tiny_trained_model.parent / "summary.json").read_text()), "cache_key": cache_key(tiny)}))
    summary = run_study(out, quick=True, config=tiny, seeds=1, ablations=["concept"], cache_dir=cache)

    assert json.loads((out / "colour-cue" / "world" / "world.json").read_text())["config"]["variant"] == "colour-cue"
    assert (out / "colour-cue" / "base" / "model.pt").is_file()  # its own base, trained on its own world
    rows = summary["tables"]["concept"]
    assert [r["label"] for r in rows] == ["base", "gated-image, web world", "base, colour-cue world",
                                          "gated-image, colour-cue world"]
    cue_base = json.loads((out / "colour-cue" / "base_scores.json").read_text())
    assert rows[2]["scores"] == {t: {"mean": v, "std": None, "n": 1} for t, v in cue_base.items()}
    cue_run = json.loads(next((out / "colour-cue" / "runs").glob("*/result.json")).read_text())
    assert rows[3]["scores"][TARGET_TASKS[0]]["mean"] == cue_run["scores"][TARGET_TASKS[0]]
    assert set(summary["concept"]["precondition"]) == {"web", "colour-cue"}
    assert all(len(r["criteria"]) > 5 for r in summary["concept"]["precondition"].values())
    assert summary["seconds"] >= summary["stages"]["concept"] > 0  # the invocation's time counts the concept stage
    # the colour-cue world's stages are kept apart, not written over the web world's
    assert set(summary["concept"]["stages"]) == {"world", "pretrain", "embed", "index"}
    assert summary["stages"]["concept"] >= sum(summary["concept"]["stages"].values())
    markdown = (out / "study.md").read_text()
    assert "The base lacks the concept" in markdown and "colour-cue world's base, precondition" in markdown


def test_cli_refuses_bad_options(tmp_path):
    from click.testing import CliRunner

    from react_vl.cli import main

    runner = CliRunner()
    assert "--quick" in runner.invoke(main, ["study", "--help"]).output
    # the CLI spells the ablation names out (importing study would load torch for --help): same list
    ablation_option = next(p for p in main.commands["study"].params if p.name == "ablations")
    assert tuple(ablation_option.type.choices) == ABLATIONS
    for bad, option in ((["--seeds", "0"], "--seeds"), (["--ablation", "colour"], "--ablation")):
        result = runner.invoke(main, ["study", "--out", str(tmp_path / "s"), *bad])
        assert result.exit_code == 2 and option in result.output
    assert not (tmp_path / "s").exists()
