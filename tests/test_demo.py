"""A shrunken demo, end to end through the real stages (tiny world, tiny model, few steps)."""

import json
import shutil

import pytest

from react_vl.demo import RANDOM_CONTROL, DemoConfig, run_demo
from react_vl.experiment import cache_key, pretrain_base


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
    assert set(written["stages"]) == {"world", "pretrain", "embed", "index", "retrieve", "materialize",
                                      "customize", "evaluate", "report"}
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
    # the text-tower check: printed for the targets before customizing, recorded for every model
    printed = capsys.readouterr().out
    assert all(f"{task}: mean cosine between class prompts" in printed for task in ("mini-shape-sketch", "mini-color-night"))
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
