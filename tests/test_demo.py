"""A shrunken demo, end to end through the real stages (tiny world, tiny model, few steps)."""

import json
import shutil

import pytest

from react_vl.demo import RANDOM_CONTROL, DemoConfig, check_bars, run_demo
from react_vl.experiment import cache_key, check_precondition, pretrain_base


@pytest.mark.slow
def test_shrunken_demo_runs_every_stage(tiny_world, tiny_world_config, tmp_path, capsys):
    shutil.copytree(tiny_world, tmp_path / "world")  # same config: the demo reuses its shards
    config = DemoConfig(world=tiny_world_config, model="mini-vit-test", base_steps=8, base_batch=32, per_class=10,
                        steps=4, batch=32, mix_ratio=0.5, workers=1)
    summary = run_demo(tmp_path, config, cache_dir=tmp_path / "cache")

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["tasks"] == summary["tasks"]
    roles = {name: row["role"] for name, row in written["tasks"].items()}
    assert roles == {"mini-shape-sketch": "target", "mini-color-night": "target", "mini-shape-photo": "control",
                     "mini-color-photo": "control", "mini-shape-pixel": "control"}
    for row in written["tasks"].values():
        assert row["metric"] == "accuracy"
        for label in ("base", "gated-image", "locked-text", RANDOM_CONTROL):
            assert 0.0 <= row[label] <= 100.0
    assert set(written["stages"]) == {"world", "pretrain", "embed", "index", "precondition", "retrieve",
                                      "materialize", "customize", "evaluate", "report"}
    assert 0 < written["retrieved"] <= 2 * 8 * 10  # two target tasks, 8 classes, per_class 10
    assert (tmp_path / "report.html").stat().st_size > 10_000
    # what the training sets truly hold, from the world's ground truth: retrieval beats the random draw
    truth = written["ground_truth"]
    assert truth["retrieved"]["pairs"] == truth["random"]["pairs"] == written["retrieved"]
    for task in ("mini-shape-sketch", "mini-color-night"):
        assert truth["random"][task]["selected_for_task"] == 0  # random pairs are selected for no class
        assert 0 < truth["retrieved"][task]["selected_for_task"] <= written["retrieved"]
        assert 0 <= truth["retrieved"][task]["class_precision"] <= 1
    assert sum(truth["retrieved"][t]["style_share"] for t in ("mini-shape-sketch", "mini-color-night")) > \
        sum(truth["random"][t]["style_share"] for t in ("mini-shape-sketch", "mini-color-night"))
    # REACT's precondition, on the validation sets before customizing: printed, a warning per failed criterion
    printed = capsys.readouterr().out
    precondition = written["precondition"]
    assert "REACT's precondition (validation sets): " + ("met" if precondition["passed"] else "NOT met") in printed
    failed = [c for c in precondition["criteria"] if not c["passed"]]
    assert printed.count("WARNING: ") == len(failed) and precondition["passed"] == (not failed)
    assert written["bars"] == check_bars(written["tasks"])  # the bars, checked on these test scores and printed
    assert "The demo's bars (test sets, this seed): " + ("met" if written["bars"]["passed"] else "missed") in printed
    assert (tmp_path / "precondition" / "results.json").is_file()
    val_counts = [r["base"]["count"] for r in
                  json.loads((tmp_path / "precondition" / "results.json").read_text())["zero_shot"].values()]
    assert val_counts == [tiny_world_config.val_size] * 5
    cosines = written["class_prompt_cosine"]
    assert set(cosines) == set(roles)
    assert all(-1 <= value <= 1 for by_model in cosines.values() for value in by_model.values())
    for task in roles:  # gated-image leaves the text tower as it was: same class embeddings as the base
        assert cosines[task]["gated-image"] == cosines[task]["base"]
    for run in ("gated-image", "locked-text", "gated-image-random-subset"):
        assert (tmp_path / "runs" / run / "model.pt").is_file()
        args = json.loads((tmp_path / "runs" / run / "summary.json").read_text())["args"]
        assert (args["steps"], args["mix_ratio"], args["mix_shards"]) == (4, 0.5, str(tmp_path / "world" / "pretrain"))
    # another demo folder reuses the cached base model instead of training it again
    reused = pretrain_base(tmp_path / "second", config, tmp_path / "cache")
    assert reused.read_bytes() == (tmp_path / "base" / "model.pt").read_bytes()
    assert not (tmp_path / "second" / "base" / "checkpoints").exists()


def test_demo_and_study_commands_pass_the_base_model_options(monkeypatch):
    # the demo and the study must ask for the same base (one cache entry), so both take these options
    from click.testing import CliRunner

    import react_vl.cli as cli
    import react_vl.study as study
    from react_vl.study import StudyConfig

    seen = {}
    monkeypatch.setattr(cli, "run_demo", lambda out, config, cache_dir: seen.update(demo=config))
    monkeypatch.setattr(study, "run_study", lambda out, config, **kwargs: seen.update(study=config))
    for command in ("demo", "study"):
        result = CliRunner().invoke(cli.main, [command, "--base-batch", "512", "--base-steps", "7"])
        assert result.exit_code == 0, result.output
        assert (seen[command].base_batch, seen[command].base_steps) == (512, 7)
    assert seen["demo"].steps == DemoConfig().steps and seen["demo"].world.seed == DemoConfig().seed
    assert seen["demo"].mix_ratio == DemoConfig().mix_ratio > 0
    assert seen["study"] == StudyConfig(base_steps=7, base_batch=512)  # the study's own short schedule
    assert cache_key(seen["demo"]) == cache_key(seen["study"])  # one cached base model serves both
    web_key = cache_key(seen["demo"])
    for command in ("demo", "study"):  # the "base lacks the concept" world: another world, another base
        result = CliRunner().invoke(cli.main, [command, "--base-batch", "512", "--base-steps", "7",
                                               "--world-variant", "colour-cue"])
        assert result.exit_code == 0, result.output
        assert seen[command].world.variant == "colour-cue"
    assert cache_key(seen["demo"]) == cache_key(seen["study"]) != web_key


# a base that meets REACT's precondition on the validation sets (8 classes per task: chance 12.5%)
MET = {"scores": {"mini-shape-sketch": 60.0, "mini-color-night": 45.0, "mini-shape-photo": 95.0,
                  "mini-color-photo": 92.0, "mini-shape-pixel": 70.0},
       "cosines": {"mini-shape-sketch": 0.5, "mini-color-night": 0.6, "mini-shape-photo": 0.4,
                   "mini-color-photo": 0.3, "mini-shape-pixel": 0.7}}


def test_precondition_records_every_criterion_with_its_value_and_bar():
    record = check_precondition(MET["scores"], 420.0, MET["cosines"])
    assert record["passed"] and record["split"] == "val"
    by_key = {(c["task"], c["criterion"].split(" (")[0]): c for c in record["criteria"]}
    assert {task for task, _ in by_key} == set(MET["scores"]) | {"base"}
    assert by_key[("mini-shape-photo", "dominant-style control known")] == {
        "criterion": "dominant-style control known (val zero-shot %)", "task": "mini-shape-photo", "value": 95.0,
        "op": ">=", "bar": 90.0, "passed": True}
    rare = [c for c in record["criteria"] if c["criterion"].startswith("rare style")]
    assert sorted(c["task"] for c in rare) == ["mini-color-night", "mini-shape-pixel", "mini-shape-sketch"]
    assert {c["bar"] for c in rare} == {25.0}  # 2 x chance of 8 classes
    assert sorted(c["task"] for c in record["criteria"] if c["criterion"].startswith("target has headroom")) == \
        ["mini-color-night", "mini-shape-sketch"]
    assert by_key[("base", "pretraining time")]["value"] == 420.0


def test_precondition_fails_each_criterion_the_base_misses():
    scores = {**MET["scores"], "mini-shape-photo": 59.9, "mini-shape-pixel": 25.0, "mini-shape-sketch": 85.0}
    cosines = {**MET["cosines"], "mini-shape-sketch": 0.993}
    record = check_precondition(scores, 601.0, cosines)
    failed = {(c["task"], c["criterion"].split(" (")[0]) for c in record["criteria"] if not c["passed"]}
    assert not record["passed"]
    assert failed == {("mini-shape-photo", "dominant-style control known"),
                      ("mini-shape-pixel", "rare style above 2x chance"),  # 25.0 is not above 2 x 12.5
                      ("mini-shape-sketch", "target has headroom"), ("mini-shape-sketch", "class prompts apart"),
                      ("base", "pretraining time")}
    with pytest.raises(ValueError, match=r"missing: \['mini-color-night'\]"):
        check_precondition({k: v for k, v in scores.items() if k != "mini-color-night"}, 1.0, cosines)


def test_bars_need_gain_over_base_and_random_on_every_target_and_controls_within_tolerance():
    def row(role, base, gated, random):
        return {"role": role, "base": base, "gated-image": gated, RANDOM_CONTROL: random}

    tasks = {"mini-shape-sketch": row("target", 60.0, 66.0, 61.0), "mini-color-night": row("target", 50.0, 58.0, 54.0),
             "mini-shape-photo": row("control", 95.0, 93.5, 95.0), "mini-color-photo": row("control", 98.0, 99.0, 98.0)}
    met = check_bars(tasks)
    assert met["passed"] and len(met["bars"]) == 2 * 2 + 2
    missed = check_bars({**tasks, "mini-color-night": row("target", 50.0, 58.0, 56.0),  # only +2 over random
                         "mini-shape-photo": row("control", 95.0, 92.5, 95.0)})  # -2.5 on a control
    assert {(b["task"], b["bar"]) for b in missed["bars"] if not b["passed"]} == {
        ("mini-color-night", "gated-image over the random subset"), ("mini-shape-photo", "control change (gated-image)")}


def test_merged_retrieved_sets_keep_each_parts_rejections(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from react_vl.curation import record_decisions, rejected_ids
    from react_vl.experiment import merge_retrieved

    parts = []
    for name, ids in (("a", [1, 2, 3]), ("b", [3, 4])):
        part = tmp_path / name
        part.mkdir()
        pq.write_table(pa.table({"id": ids, "caption": [f"c{i}" for i in ids], "classes": [[name]] * len(ids),
                                 "score": [0.5] * len(ids)}), part / "retrieved.parquet")
        parts.append(part)
    record_decisions(parts[0], [2], "reject", who="ana")
    record_decisions(parts[1], [4], "reject", who="bo")
    merged = merge_retrieved(parts, tmp_path / "all")
    table = pq.read_table(merged / "retrieved.parquet")
    assert sorted(table.column("id").to_pylist()) == [1, 2, 3, 4]
    assert dict(zip(table.column("id").to_pylist(), table.column("classes").to_pylist()))[3] == ["a", "b"]
    assert rejected_ids(merged) == {2, 4}
