"""Tasks: what a customized model is for. A task is class names + prompt templates + a metric.

REACT never looks at a task's images to retrieve: the class names filled into the templates are
the queries. Built-in tasks are ImageNet-1k (open_clip's class names and the 80 OpenAI
templates), the 20 ELEVATER datasets (task_data/benchmarks.json: clip-benchmark's lists; its
`_origin` note says where each comes from) and the mini-world tasks (react_vl.concepts.MINI_TASKS).
Any other task is a YAML or JSON file with the same fields.
"""

import difflib
import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from .concepts import ATTRIBUTE_CLASSES, MINI_TASKS

# The headline metrics a task can name; react_vl.metrics.task_metric computes each.
METRICS = ("accuracy", "mean-per-class", "11-point-mAP", "roc-auc")


@dataclass(frozen=True)
class Task:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    metric: str = "accuracy"
    role: str | None = None  # mini world: "target" or "control"
    attribute: str | None = None  # mini world: the attribute classified ("shape", "color")
    style: str | None = None  # mini world: the rendering style of its images
    # other names of a class, {class name: [synonym, ...]}; REAL-Prompt (react_vl.methods) names each
    # class by whichever of its names the corpus captions use most. Stored as ((class, (names...)), ...)
    synonyms: dict | tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(self.templates))
        where = f"task {self.name!r}"
        if self.synonyms is not None:
            object.__setattr__(self, "synonyms", _check_synonyms(self.synonyms, self.classnames, where))
        if not self.classnames:
            raise ValueError(f"{where}: the class list is empty")
        duplicates = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
        if duplicates:
            raise ValueError(f"{where}: duplicate class names {duplicates}")
        if not self.templates:
            raise ValueError(f"{where}: no prompt templates")
        for template in self.templates:
            if "{}" not in template:
                raise ValueError(f"{where}: template {template!r} has no '{{}}' for the class name")
        if self.metric not in METRICS:
            raise ValueError(f"{where}: unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.role not in (None, "target", "control"):
            raise ValueError(f"{where}: role must be 'target' or 'control', got {self.role!r}")

    def prompts(self, classname: str) -> list[str]:
        """The text queries for one class: every template filled with its name."""
        return [template.format(classname) for template in self.templates]

    def names_of(self, classname: str) -> tuple[str, ...]:
        """The class name and its synonyms (the task's `synonyms`), the class name first."""
        others = dict(self.synonyms or ()).get(classname, ())
        return (classname, *(name for name in others if name != classname))

    def to_dict(self) -> dict:
        record = {key: list(value) if isinstance(value, tuple) else value
                  for key, value in asdict(self).items() if value is not None}
        if self.synonyms is not None:
            record["synonyms"] = {name: list(others) for name, others in self.synonyms}
        return record


def _check_synonyms(synonyms, classnames: tuple[str, ...], where: str) -> tuple:
    """{class: [names]} (or its stored tuple form) -> ((class, (names...)), ...) in class order."""
    pairs = dict(synonyms.items() if isinstance(synonyms, dict) else synonyms)
    unknown = sorted(set(pairs) - set(classnames))
    if unknown:
        raise ValueError(f"{where}: synonyms given for {unknown}, which are not among its class names")
    stored = []
    for name in classnames:
        others = pairs.get(name, ())
        if isinstance(others, str) or not all(isinstance(o, str) and o.strip() for o in others):
            raise ValueError(f"{where}: the synonyms of class {name!r} must be a list of non-empty names, "
                             f"got {others!r}")
        if others:
            stored.append((name, tuple(o.strip() for o in others)))
    return tuple(stored)


@cache
def _benchmarks() -> dict:
    return json.loads(resources.files("react_vl").joinpath("task_data/benchmarks.json").read_text())["tasks"]


def _builtin(name: str) -> Task | None:
    if name in MINI_TASKS:
        spec = MINI_TASKS[name]
        return Task(name, ATTRIBUTE_CLASSES[spec["attribute"]], spec["templates"], "accuracy",
                    spec["role"], spec["attribute"], spec["style"])
    if name == "imagenet-1k":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
        classnames = list(IMAGENET_CLASSNAMES)
        # the OpenAI list names two pairs of synsets alike; the WordNet lemmas tell them apart
        classnames[744], classnames[836] = "projectile", "sunglass"
        return Task(name, classnames, [template("{}") for template in OPENAI_IMAGENET_TEMPLATES])
    if name in _benchmarks():
        spec = _benchmarks()[name]
        return Task(name, spec["classnames"], spec["templates"], spec["metric"])
    return None


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(["imagenet-1k", *_benchmarks(), *MINI_TASKS])


def load_task_file(path: str | Path) -> Task:
    """A task from a YAML or JSON file with fields name (default: the file stem), classnames,
    templates, metric, and optionally role, attribute, style and synonyms ({class: [names]})."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"task file {path}: cannot parse: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"task file {path}: expected a mapping of fields, got {type(data).__name__}")
    fields = {"name", "classnames", "templates", "metric", "role", "attribute", "style", "synonyms"}
    data.setdefault("name", path.stem)
    missing = {"classnames", "templates"} - data.keys()
    if missing:
        raise ValueError(f"task file {path}: missing field(s) {sorted(missing)}")
    try:
        return Task(**{key: value for key, value in data.items() if key in fields})
    except ValueError as error:
        raise ValueError(f"task file {path}: {error}") from error


def get_task(name_or_path: str | Path) -> Task:
    """A built-in task by name, or a task file (.yaml, .yml, .json) by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        return load_task_file(path)
    task = _builtin(str(name_or_path))
    if task is None:
        close = difflib.get_close_matches(str(name_or_path), list_tasks(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `react-vl tasks` lists them"
        raise ValueError(f"unknown task {str(name_or_path)!r}: not a built-in task or a .yaml/.json file{hint}")
    return task
