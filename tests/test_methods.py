"""The retrieval-augmented methods (react_vl.methods): known answers on a real small model and the
tiny world (gate scale 0 = the base is tests/test_gate_scale.py's)."""

import dataclasses
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from webdataset.tariterators import tarfile_samples

from helpers import make_kb
from react_vl.concepts import CONTROL_TASKS, TARGET_TASKS
from react_vl.evaluate import cached_features, task_data_path, text_classifier, weights_fingerprint, zero_shot
from react_vl.experiment import cache_key
from react_vl.methods import (Pool, draw_methods, draw_shots, methods_table, most_frequent_names, neural_priming,
                              neural_priming_transductive, real_linear, real_prompt, score, shots_of, text_head,
                              wise_ft, wise_ft_model, write_shot_shard)
from react_vl.models import load_model
from react_vl.study import StudyConfig, run_study
from react_vl.tasks import Task, get_task
from react_vl.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny(tiny_world, tiny_trained_model, tmp_path_factory):
    """The tiny base, a colour task (the tiny base knows colours), its test and validation features."""
    model, preprocess, tokenizer = load_model(None, str(tiny_trained_model))
    task = get_task("mini-color-photo")
    cache, key = tmp_path_factory.mktemp("features"), weights_fingerprint(model)
    test, val = (cached_features(model, preprocess, task_data_path(str(tiny_world), task.name, split), cache, key,
                                 list(task.classnames), workers=0)[0] for split in ("eval", "val"))
    return SimpleNamespace(model=model, tokenizer=tokenizer, task=task, test=test, val=val,
                           text=text_classifier(model, tokenizer, task, "cpu"))


def test_neural_priming_with_blend_zero_is_zero_shot(tiny):
    pool = shots_of(tiny.val, draw_shots(tiny.val, 4, seed=0))  # labelled images stand in for the retrieved pool
    head = neural_priming(tiny.text, pool, 0.0)
    assert torch.equal(head.weight, text_head(tiny.text).weight)
    assert score(head, tiny.task, tiny.test) == round(100 * zero_shot(tiny.model, tiny.text, tiny.task,
                                                                      tiny.test)["score"], 2)
    primed = neural_priming(tiny.text, pool, 0.5)
    assert not torch.allclose(primed.weight, head.weight)
    # transductive with every pool image among the neighbours keeps the whole pool: the same head
    everything = neural_priming_transductive(tiny.text, pool, tiny.test.image, 0.5, neighbours=len(pool.labels))
    assert torch.equal(everything.weight, primed.weight)
    with pytest.raises(ValueError, match=r"blend must be in \[0, 1\]"):
        neural_priming(tiny.text, pool, 1.5)


def test_real_prompt_without_synonyms_is_zero_shot(tiny, tmp_path):
    head, names = real_prompt(tiny.model, tiny.tokenizer, tiny.task, tmp_path / "no-kb-needed")
    assert names == list(tiny.task.classnames)
    assert torch.equal(head.weight, text_head(tiny.text).weight)


def test_real_prompt_names_each_class_by_its_most_frequent_synonym(tiny, tmp_path):
    captions = ["a red disc", "a disc on white", "a circle", "A DISC", "a box", "a square", "one square",
                "a rounded square"]
    rng = np.random.default_rng(0)
    kb = make_kb(tmp_path / "kb", rng.standard_normal((8, 4)).astype(np.float32),
                 rng.standard_normal((8, 4)).astype(np.float32), parts=[0, 1], captions=captions)
    task = Task("shapes", ["circle", "square"], ["a photo of a {}."],
                synonyms={"circle": ["round", "disc"], "square": ["box"]})
    expected = []
    for cls in task.classnames:  # the count, done here with Python's re over the captions
        counts = {n: sum(bool(re.search(rf"\b{n}\b", c, re.I)) for c in captions) for n in task.names_of(cls)}
        expected.append(max(counts, key=counts.get))
    assert expected == ["disc", "square"]  # "rounded" is not the word "round"
    assert most_frequent_names(kb, task) == expected
    head, names = real_prompt(tiny.model, tiny.tokenizer, task, kb.path)
    renamed = text_classifier(tiny.model, tiny.tokenizer, dataclasses.replace(task, classnames=expected,
                                                                              synonyms=None), "cpu")
    assert names == expected and torch.equal(head.weight, text_head(renamed).weight)
    with pytest.raises(ValueError, match="not among its class names"):
        Task("shapes", ["circle"], ["{}"], synonyms={"oval": ["ellipse"]})
    (tmp_path / "shapes.json").write_text(json.dumps(task.to_dict()))  # a task file lists synonyms as a mapping
    assert get_task(str(tmp_path / "shapes.json")) == task


def oracle_features(labels: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Features that name the true class: its one-hot direction plus a little noise (separable)."""
    noise = 0.05 * torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(torch.nn.functional.one_hot(labels, dim).float() + noise, dim=1)


def test_real_linear_reaches_100_percent_on_an_oracle_feature_set(tiny):
    dim = tiny.text.shape[0]
    # the true colours of the world's validation and test images, as the oracle labels its features
    pool = Pool(oracle_features(tiny.val.labels, dim, seed=0), tiny.val.labels)
    test = dataclasses.replace(tiny.test, image=oracle_features(tiny.test.labels, dim, seed=1))
    head = real_linear(tiny.text, pool)
    assert score(head, tiny.task, test) == 100.0
    assert score(text_head(tiny.text), tiny.task, test) < 100.0  # the zero-shot head alone does not get there


@pytest.fixture(scope="module")
def tuned(tiny_world, tiny_trained_model, tmp_path_factory):
    """The tiny base fully fine-tuned for 3 real steps."""
    run = tmp_path_factory.mktemp("tuned")
    train(TrainConfig(tiny_world / "pretrain", run, pretrained=str(tiny_trained_model), strategy="full", steps=3,
                      batch_size=32, lr=1e-3, warmup=1, seed=1, workers=1, checkpoint_every=3))
    return run / "model.pt"


def test_wise_ft_alpha_zero_is_the_base_and_one_the_tuned_model(tiny, tiny_trained_model, tuned):
    base, tuned_model = load_model(None, str(tiny_trained_model))[0], load_model(None, str(tuned))[0]
    task = tiny.task
    for alpha, expected in ((0.0, base), (1.0, tuned_model)):
        model, _, tokenizer = wise_ft_model(tiny_trained_model, tuned, alpha)
        state, want = model.state_dict(), expected.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want)
        images = torch.randn(2, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(2))
        assert torch.equal(model.encode_image(images), expected.encode_image(images))
        text = text_classifier(model, tokenizer, task, "cpu")
        assert torch.equal(text, text_classifier(expected, tokenizer, task, "cpu"))
    halfway = wise_ft(base.state_dict(), tuned_model.state_dict(), 0.5)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, tuned_model.state_dict()[k])]
    assert changed and all(not torch.equal(halfway[k], base.state_dict()[k]) for k in changed)
    gated = {**tuned_model.state_dict(), "visual.transformer.resblocks.1.gated_attn_block.alpha_attn": torch.zeros(())}
    with pytest.raises(ValueError, match="use gate scaling"):
        wise_ft(base.state_dict(), gated, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        wise_ft(base.state_dict(), tuned_model.state_dict(), -0.1)


def test_few_shot_shard_holds_the_drawn_images_captioned_with_their_class(tiny, tmp_path):
    keys = draw_shots(tiny.val, 2, seed=3)
    assert keys == draw_shots(tiny.val, 2, seed=3) and keys != draw_shots(tiny.val, 2, seed=4)
    assert sorted(torch.bincount(shots_of(tiny.val, keys).labels).tolist()) == [2] * len(tiny.task.classnames)
    shard = write_shot_shard(tiny.val, keys, tiny.task, tmp_path / "shots.tar")
    written = list(tarfile_samples([{"url": str(shard)}]))
    assert len(written) == len(keys)
    originals = {}
    for key in keys:
        path, _, sample_key = key.rpartition(":")
        originals.update({s["__key__"]: s for s in tarfile_samples([{"url": path}]) if s["__key__"] == sample_key})
    labels = shots_of(tiny.val, keys).labels.tolist()
    for sample, key, label in zip(written, keys, labels):
        original = originals[key.rpartition(":")[2]]
        assert json.loads(original["json"])["label"] == label
        image_ext = next(e for e in sample if e not in ("__key__", "__url__", "txt"))
        assert sample[image_ext] == original[image_ext]
        assert tiny.task.classnames[label] in sample["txt"].decode()


def test_methods_table_means_and_deltas_over_seeds():
    def row(method, scores, shots=0, knob=None, chosen=False):
        return {"method": method, "shots": shots, "knob": knob, "chosen": chosen, "scores": scores,
                "trainable": 1032, "train_s": 2.0, "storage_bytes": 4128, "inference": "none"}

    tasks = TARGET_TASKS + CONTROL_TASKS
    records = [{"rows": [row("zero-shot", dict.fromkeys(tasks, 50.0)),
                         row("Neural Priming", {**dict.fromkeys(tasks, 50.0), TARGET_TASKS[0]: 50.0 + gain},
                             knob=0.3, chosen=chosen)]} for gain, chosen in ((4.0, True), (8.0, False))]
    lines = methods_table(records, TARGET_TASKS, CONTROL_TASKS)
    primed = next(line for line in lines if line.startswith("| Neural Priming"))
    cells = [c.strip() for c in primed.strip("|").split("|")]
    assert cells[:4] == ["Neural Priming", "0", "0.3 (chosen on val: 1/2 seeds)", "56.0 ± 2.8"]
    assert cells[3 + len(tasks):] == ["+3.0 ± 1.4", "+0.0 ± 0.0", "1,032", "2.0", "4.1 kB", "none"]



def test_methods_picture_shows_each_method_once_at_its_chosen_setting():
    from matplotlib.figure import Figure

    def row(method, gain, knob=None, chosen=False, shots=0):
        scores = {**dict.fromkeys(TARGET_TASKS + CONTROL_TASKS, 50.0), TARGET_TASKS[0]: 50.0 + gain}
        return {"method": method, "shots": shots, "knob": knob, "chosen": chosen, "scores": scores}

    records = [{"rows": [row("zero-shot", 0.0), row("Neural Priming", 2.0, 0.1), row("Neural Priming", 6.0, 0.3, True),
                         row("REAL-Linear", 4.0), row("linear probe (base)", 9.0, shots=16)]}]
    ax = Figure().subplots()
    draw_methods(ax, records, TARGET_TASKS, CONTROL_TASKS)
    labels = {text.get_text(): text.xy for text in ax.texts}
    assert labels == {"Neural Priming 0.3": (0.0, 6.0 / len(TARGET_TASKS)),
                      "REAL-Linear": (0.0, 4.0 / len(TARGET_TASKS))}  # not zero-shot, the unchosen blend, 16 shots

@pytest.mark.slow
def test_methods_ablation_end_to_end_and_resumes(tiny_world, tiny_world_config, tiny_trained_model, tmp_path):
    tiny = StudyConfig(world=tiny_world_config, model="mini-vit-test", base_steps=40, base_batch=64, base_lr=1e-3,
                       per_class=8, steps=2, batch=32, precision="fp32", workers=0)
    out, cache = tmp_path / "study", tmp_path / "cache"
    shutil.copytree(tiny_world, out / "world")
    base = shutil.copytree(tiny_trained_model.parent, cache / f"base-{cache_key(tiny)}")
    (base / "summary.json").write_text(json.dumps({**json.loads((base / "summary.json").read_text()),
                                                   "cache_key": cache_key(tiny)}))
    summary = run_study(out, quick=True, config=tiny, seeds=1, ablations=["methods"], cache_dir=cache)
    record = summary["methods"]["records"][0]
    methods = {(r["method"], r["shots"]) for r in record["rows"]}
    # the tiny world's validation sets hold 10 images a class: 16 shots are left out, and said so
    assert record["shots_skipped"] == [16]
    for name in ("zero-shot", "REAL-Prompt", "REAL-Linear", "Neural Priming", "Neural Priming, transductive",
                 "REACT gated-image", "REACT locked-text", "full fine-tuning", "gate scale (gated-image)",
                 "WiSE-FT (locked-text)", "WiSE-FT (full)"):
        assert (name, 0) in methods, name
    for k in (1, 4):
        for name in ("linear probe (base)", "linear probe (gated-image)", "REAL-Linear", "Neural Priming", "SWAT"):
            assert (name, k) in methods, (name, k)
    zero = next(r for r in record["rows"] if r["method"] == "zero-shot")
    assert zero["scores"] == summary["base"]["scores"]  # the methods' zero-shot is the study's base row
    gated = next(r for r in record["rows"] if r["method"] == "REACT gated-image")
    assert gated["trainable"] > 0 and gated["inference"].startswith("+")
    markdown = (out / "study.md").read_text()
    assert "### Retrieval-augmented methods side by side" in markdown and "| SWAT | 4 |" in markdown
    stamp = (out / "methods" / "seed0" / "result.json").stat().st_mtime_ns
    again = run_study(out, quick=True, config=tiny, seeds=1, ablations=["methods"], cache_dir=cache)
    assert (out / "methods" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    assert again["methods"]["records"] == summary["methods"]["records"]
