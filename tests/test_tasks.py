import json

import pytest
import yaml
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from react_vl.tasks import METRICS, Task, get_task, list_tasks
from react_vl.concepts import MINI_TASKS

ELEVATER_METRICS = {  # each dataset's metric in the ELEVATER benchmark (Li et al., NeurIPS 2022)
    "cifar-10": "accuracy", "cifar-100": "accuracy", "country211": "accuracy", "dtd": "accuracy",
    "eurosat": "accuracy", "fer-2013": "accuracy", "food-101": "accuracy", "gtsrb": "accuracy",
    "kitti-distance": "accuracy", "mnist": "accuracy", "patch-camelyon": "accuracy", "rendered-sst2": "accuracy",
    "resisc45": "accuracy", "stanford-cars": "accuracy", "caltech-101": "mean-per-class",
    "fgvc-aircraft": "mean-per-class", "oxford-flowers": "mean-per-class", "oxford-pets": "mean-per-class",
    "voc-2007": "11-point-mAP", "hateful-memes": "roc-auc",
}
CLASS_COUNTS = {"cifar-10": 10, "cifar-100": 100, "caltech-101": 102, "oxford-flowers": 102, "oxford-pets": 37,
                "food-101": 101, "stanford-cars": 196, "fgvc-aircraft": 100, "dtd": 47, "resisc45": 45,
                "country211": 211, "gtsrb": 43, "voc-2007": 20, "mnist": 10, "eurosat": 10, "fer-2013": 7}


def test_every_builtin_loads_and_is_valid():
    names = list_tasks()
    assert set(ELEVATER_METRICS) | set(MINI_TASKS) | {"imagenet-1k"} == set(names)
    for name in names:
        task = get_task(name)
        assert task.name == name and task.metric in METRICS
        assert all(isinstance(prompt, str) and "{}" not in prompt for prompt in task.prompts(task.classnames[0]))


def test_elevater_metrics_and_class_counts():
    for name, metric in ELEVATER_METRICS.items():
        assert get_task(name).metric == metric, name
    for name, count in CLASS_COUNTS.items():
        assert len(get_task(name).classnames) == count, name


def test_imagenet_reuses_open_clip_lists():
    task = get_task("imagenet-1k")
    assert len(task.classnames) == 1000 and len(set(task.classnames)) == 1000
    differing = [i for i, (a, b) in enumerate(zip(task.classnames, IMAGENET_CLASSNAMES)) if a != b]
    assert differing == [744, 836]  # only the two names the OpenAI list repeats
    assert task.prompts("tench") == [template("tench") for template in OPENAI_IMAGENET_TEMPLATES]


def test_mini_tasks_carry_role_attribute_and_style():
    roles = {name: get_task(name).role for name in MINI_TASKS}
    assert roles == {"mini-shape-sketch": "target", "mini-color-night": "target", "mini-shape-photo": "control",
                     "mini-color-photo": "control", "mini-shape-pixel": "control"}
    sketch = get_task("mini-shape-sketch")
    assert (sketch.attribute, sketch.style) == ("shape", "sketch")
    assert all("sketch" in t or "drawing" in t for t in sketch.templates)
    assert get_task("mini-color-night").classnames == get_task("mini-color-photo").classnames


def test_world_writes_loadable_task_files(tiny_world):
    for name in MINI_TASKS:
        path = tiny_world / "tasks" / f"{name}.json"
        assert get_task(path) == get_task(name)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_task_file_round_trip(tmp_path, suffix):
    path = tmp_path / f"birds{suffix}"
    fields = {"classnames": ["robin", "crow"], "templates": ["a photo of a {}.", "a {} in flight."],
              "metric": "mean-per-class"}
    path.write_text(yaml.safe_dump(fields) if suffix == ".yaml" else json.dumps(fields))
    task = get_task(path)
    assert task.name == "birds" and task.classnames == ("robin", "crow") and task.metric == "mean-per-class"
    assert task.prompts("crow") == ["a photo of a crow.", "a crow in flight."]


@pytest.mark.parametrize("fields, problem", [
    ({"classnames": [], "templates": ["a {}."]}, "class list is empty"),
    ({"classnames": ["cat", "dog", "cat"], "templates": ["a {}."]}, r"duplicate class names \['cat'\]"),
    ({"classnames": ["cat"], "templates": ["a photo of a cat."]}, "has no '{}'"),
    ({"classnames": ["cat"], "templates": ["a {}."], "metric": "top-5"}, "unknown metric 'top-5'"),
    ({"templates": ["a {}."]}, r"missing field\(s\) \['classnames'\]"),
])
def test_invalid_task_files_name_the_problem_and_the_file(tmp_path, fields, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=problem) as error:
        get_task(path)
    assert "bad.yaml" in str(error.value)


def test_unknown_names_suggest_close_matches(tmp_path):
    with pytest.raises(ValueError, match="did you mean cifar-10"):
        get_task("cifar10")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_task(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="template"):
        Task("x", ["a"], [])


def test_cli_lists_and_shows_tasks():
    from click.testing import CliRunner

    from react_vl.cli import main

    listing = CliRunner().invoke(main, ["tasks"])
    assert listing.exit_code == 0 and len(listing.output.splitlines()) == len(list_tasks())
    shown = CliRunner().invoke(main, ["tasks", "mini-color-night"])
    assert shown.exit_code == 0 and json.loads(shown.output) == get_task("mini-color-night").to_dict()
    unknown = CliRunner().invoke(main, ["tasks", "imagenet"])
    assert unknown.exit_code == 1 and "did you mean imagenet-1k" in unknown.output
