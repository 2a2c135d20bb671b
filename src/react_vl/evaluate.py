"""Evaluate models side by side: zero-shot classification, image-text retrieval, linear probes.

    results = evaluate(["base=mini-vit@runs/base.pt", "gated=@runs/gated/model.pt"],
                       ["mini-shape-sketch", "mini-shape-photo"], data="WORLD", out="EVAL")

A model spec is `LABEL=NAME@PRETRAINED`: NAME is an open_clip model name (empty for a react-vl
checkpoint, which records it), PRETRAINED an open_clip tag or a checkpoint path (empty: random
weights); `LABEL=` is optional and defaults to the rest of the spec. The first model is the
reference that the deltas in the table are measured against.

Evaluation data (`data`, per task) is one of
- a mini world `WORLD/` (the task's data is WORLD/eval/<task>/*.tar, its definition WORLD/tasks/<task>.json),
- webdataset shards (a .tar, a brace pattern or a folder of .tar): KEY.{png,jpg,...}, KEY.json
  with "label" (class index) or KEY.cls; KEY.txt captions (one per line) enable retrieval,
- a folder of class folders (ImageFolder layout) whose names match the task's class names,
- `clip_benchmark:DATASET[:ROOT]` when the clip-benchmark package and the data are installed.
Captioned retrieval sets (COCO/Flickr style) are a JSON list of {"image": path, "captions": [...]},
a CSV with `image` and `caption` columns (one row per caption), or captioned shards.

Image features are computed once per (model weights, gate scale, data, preprocess) and cached
under OUT/feature_cache, so adding a task or a model re-encodes only what is new.

`gate_scales=[0, 0.5, 1]` also evaluates every gated model with its gates scaled by each lambda
(`react_vl.gated.scale_gates`: 0 is the base model, 1 the trained one) as models LABEL@LAMBDA:
a curve of target gain against control loss from one trained model.
"""

import csv
import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from . import metrics
from .data import IMAGE_EXTS, decode_image, list_shards
from .gated import gated_layers, scale_gates
from .models import load_model
from .probe import few_shot_probe, stratified_split
from .utils import atomic_path, markdown_table, resolve_device, write_json

RECALL_KS = (1, 5, 10)


# --- models -------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    label: str
    name: str | None
    pretrained: str | None


def parse_model_spec(spec: str) -> ModelSpec:
    """'base=mini-vit@runs/base.pt' -> ModelSpec('base', 'mini-vit', 'runs/base.pt')."""
    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = spec, spec
    name, _, pretrained = rest.partition("@")
    if not (name or pretrained):
        raise ValueError(f"model spec {spec!r} names neither a model nor weights; expected LABEL=NAME@PRETRAINED")
    return ModelSpec(label=label, name=name or None, pretrained=pretrained or None)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, so a cache entry can never outlive the weights it came from."""
    digest = hashlib.sha1()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- evaluation data ----------------------------------------------------------------------------
def _record(key, image=None, label=-1, captions=(), error=None) -> dict:
    """One sample as the loader yields it; `error` marks a sample that is skipped and counted."""
    return {"key": key, "image": image, "label": label, "captions": list(captions), "error": error}


def _load_image(data_or_path, preprocess, key):
    try:
        data = data_or_path if isinstance(data_or_path, bytes) else Path(data_or_path).read_bytes()
        return preprocess(decode_image(data)), None
    except Exception as err:  # noqa: BLE001 - a corrupt image is skipped and counted, never fatal
        return None, f"unreadable image {key}: {type(err).__name__}: {err}"


class ShardSamples(IterableDataset):
    """Labelled / captioned samples from webdataset shards; each DataLoader worker reads its own shards."""

    def __init__(self, shards: list[str], preprocess):
        self.shards, self.preprocess = shards, preprocess

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        shards = self.shards[worker.id::worker.num_workers] if worker else self.shards
        for shard in shards:
            try:
                for sample in tarfile_samples([{"url": shard}]):
                    yield self._decode(sample, shard)
            except Exception as err:  # noqa: BLE001 - a corrupt shard is skipped and counted
                yield _record(shard, error=f"corrupt shard {shard}: {type(err).__name__}: {err}")

    def _decode(self, sample, shard):
        key = f"{shard}:{sample['__key__']}"
        image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
        if image_ext is None:
            return _record(key, error=f"no image in sample {key}")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            label = int(meta["label"]) if "label" in meta else int(sample["cls"]) if "cls" in sample else -1
        except (ValueError, TypeError, KeyError) as err:
            return _record(key, error=f"bad label in {key}: {err}")
        captions = [line.strip() for line in sample.get("txt", b"").decode("utf-8", "replace").splitlines()]
        captions = [c for c in captions + list(meta.get("captions", [])) if c]
        image, error = _load_image(sample[image_ext], self.preprocess, key)
        return _record(key, image, label, captions, error)


class FileSamples(Dataset):
    """Images on disk with a label and/or captions: class folders and captioned JSON/CSV sets."""

    def __init__(self, items: list[tuple[str, int, list[str]]], preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label, captions = self.items[index]
        image, error = _load_image(path, self.preprocess, path)
        return _record(path, image, label, captions, error)


class ClipBenchmarkSamples(Dataset):
    """A CLIP_benchmark dataset (already transformed images, integer labels) as records."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return _record(str(index), image, int(label))


def _normalise_name(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _class_folder_items(root: Path, classnames: list[str] | None):
    """ImageFolder layout: one folder per class, matched to the task's class names by name."""
    if classnames is None:
        raise ValueError(f"{root} is a folder of class folders, but no task class names were given to match them")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    index_of = {_normalise_name(name): i for i, name in enumerate(classnames)}
    unmatched = [f.name for f in folders if _normalise_name(f.name) not in index_of]
    if unmatched or len(folders) != len(classnames):
        missing = sorted(set(index_of) - {_normalise_name(f.name) for f in folders})
        raise ValueError(f"class folders in {root} do not match the task's {len(classnames)} classes: "
                         f"{len(folders)} folders; not a class: {unmatched or 'none'}; "
                         f"classes without a folder: {missing or 'none'}")
    return [(str(path), index_of[_normalise_name(folder.name)], [])
            for folder in folders for path in sorted(folder.iterdir())
            if path.suffix.lower().lstrip(".") in IMAGE_EXTS]


def _captioned_items(path: Path):
    """COCO/Flickr-style captions: JSON [{"image", "captions"}] or CSV rows (image, caption)."""
    if path.suffix == ".json":
        entries = json.loads(path.read_text())
        pairs = [(e["image"], list(e["captions"])) for e in entries]
    else:
        by_image: dict[str, list[str]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                by_image.setdefault(row["image"], []).append(row["caption"])
        pairs = list(by_image.items())
    return [(str(path.parent / image), -1, captions) for image, captions in pairs]


def open_eval_data(data: str, preprocess, classnames: list[str] | None = None) -> Dataset:
    """Open evaluation data of any supported layout as a dataset of sample records."""
    if data.startswith("clip_benchmark:"):
        return _clip_benchmark_data(data, preprocess)
    path = Path(data)
    if path.suffix in (".json", ".csv") and path.is_file():
        return FileSamples(_captioned_items(path), preprocess)
    if (path.is_dir() and any(path.glob("*.tar"))) or data.endswith(".tar") or "{" in data:
        return ShardSamples(list_shards(data), preprocess)  # a missing shard: FileNotFoundError naming it
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return FileSamples(_class_folder_items(path, classnames), preprocess)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data not found: {data}")
    raise ValueError(f"{data} holds no evaluation data: expected .tar shards, class folders, "
                     f"a captions .json/.csv, or clip_benchmark:DATASET[:ROOT]")


def _clip_benchmark_data(spec: str, preprocess) -> Dataset:
    _, name, *root = spec.split(":", 2)
    try:
        from clip_benchmark.datasets.builder import build_dataset
    except ImportError as err:
        raise ImportError(f"{spec} needs the clip-benchmark package: pip install clip-benchmark") from err
    root = root[0] if root else os.path.expanduser(f"~/.cache/clip_benchmark/{name}")
    try:
        dataset = build_dataset(name, root=root, transform=preprocess, split="test", download=False)
    except Exception as err:  # noqa: BLE001 - missing data is the common case offline; say where
        raise FileNotFoundError(f"could not open CLIP_benchmark dataset {name!r} under {root}: {err}. "
                                f"Download it where there is network, then pass clip_benchmark:{name}:ROOT") from err
    return ClipBenchmarkSamples(dataset)


# --- features -----------------------------------------------------------------------------------
@dataclass
class Features:
    image: torch.Tensor  # N x D, L2-normalised
    labels: torch.Tensor  # N, -1 where a sample has no label
    keys: list[str]
    captions: list[list[str]]
    skipped: list[str] = field(default_factory=list)


def _collate(records):
    kept = [r for r in records if r["error"] is None]
    return {
        "images": torch.stack([r["image"] for r in kept]) if kept else None,
        "labels": torch.tensor([r["label"] for r in kept], dtype=torch.long),
        "keys": [r["key"] for r in kept],
        "captions": [r["captions"] for r in kept],
        "skipped": [r["error"] for r in records if r["error"] is not None],
    }


def extract_features(model, dataset: Dataset, batch_size: int = 64, workers: int = 2,
                     device: str | torch.device = "cpu", desc: str = "features") -> Features:
    """Encode every image once: batched, DataLoader workers decoding, inference mode."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda")
    total = len(dataset) if hasattr(dataset, "__len__") else None
    parts, labels, keys, captions, skipped = [], [], [], [], []
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="img", leave=False) as progress:
        for batch in loader:
            if batch["images"] is not None:
                parts.append(model.encode_image(batch["images"].to(device), normalize=True).float().cpu())
            labels.append(batch["labels"])
            keys += batch["keys"]
            captions += batch["captions"]
            skipped += batch["skipped"]
            progress.update(len(batch["keys"]) + len(batch["skipped"]))
    if not parts:
        raise ValueError(f"no readable image in the evaluation data ({len(skipped)} skipped: {skipped[:3]})")
    return Features(torch.cat(parts), torch.cat(labels), keys, captions, skipped)


def _data_fingerprint(data: str) -> str:
    """Path plus the size and mtime of every file under it: a changed file means new features."""
    path = Path(data)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    listing = [data] + [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha1("\n".join(listing).encode()).hexdigest()


def cached_features(model, preprocess, data: str, cache_dir: Path, fingerprint: str,
                    classnames=None, **extract_options) -> tuple[Features, bool]:
    """Features of `data` under `model`, from the cache when the weights, data and preprocess match."""
    key = hashlib.sha1(f"{fingerprint}|{_data_fingerprint(data)}|{preprocess!r}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        stored = np.load(path)
        meta = json.loads(str(stored["meta"]))
        return Features(torch.from_numpy(stored["image"]), torch.from_numpy(stored["labels"]), meta["keys"],
                        meta["captions"], meta["skipped"]), True
    features = extract_features(model, open_eval_data(data, preprocess, classnames), **extract_options)
    meta = {"data": data, "keys": features.keys, "captions": features.captions, "skipped": features.skipped}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, image=features.image.numpy(), labels=features.labels.numpy(), meta=np.array(json.dumps(meta)))
    return features, False


# --- the three evaluations ----------------------------------------------------------------------
@torch.inference_mode()
def encode_texts(model, tokenizer, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    chunks = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def text_classifier(model, tokenizer, task, device) -> torch.Tensor:
    """D x C: per class, the mean of its normalised prompt embeddings, normalised again (open_clip's helper)."""
    with torch.inference_mode():
        return open_clip.build_zero_shot_classifier(model, tokenizer, task.classnames, task.templates,
                                                    device=device).float().cpu()


def class_prompt_cosine(classifier: torch.Tensor) -> float:
    """Mean cosine between the class embeddings (the classifier's columns). Near 1, the text
    tower does not tell the classes apart, and customizing with it locked has no distinct targets
    to move the images towards (docs/results/measurements-behind-defaults.md): check it before
    customizing."""
    count = classifier.shape[1]
    if count < 2:
        return 0.0
    similarity = classifier.T @ classifier
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * count - count))


def zero_shot(model, classifier: torch.Tensor, task, features: Features) -> dict:
    """Logits of every image against the text classifier, scored with the task's own metric."""
    check_labels(features, task)
    logits = model.logit_scale.exp().detach().float().cpu() * features.image @ classifier
    return {**metrics.classification_report(logits, features.labels, task.metric, list(task.classnames)),
            "class_prompt_cosine": class_prompt_cosine(classifier)}


def check_labels(features: Features, task) -> None:
    labels, count = features.labels, len(task.classnames)
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} samples of task {task.name} have no label "
                         f"(expected KEY.json 'label' or KEY.cls), e.g. {features.keys[int((labels < 0).nonzero()[0])]}")
    if labels.max() >= count:
        raise ValueError(f"labels in the data of task {task.name} go up to {int(labels.max())} but the task has "
                         f"{count} classes: class count differs (e.g. {features.keys[int(labels.argmax())]})")


def image_text_retrieval(model, tokenizer, features: Features, device) -> dict | None:
    """Recall@1/5/10 both ways over every caption of every image (None when there are no captions)."""
    owners = [i for i, captions in enumerate(features.captions) for _ in captions]
    if not owners:
        return None
    texts = [caption for captions in features.captions for caption in captions]
    text_features = encode_texts(model, tokenizer, texts, device)
    recall = metrics.retrieval_recall(features.image, text_features, torch.tensor(owners), RECALL_KS)
    return {**recall, "images": len(features.captions), "captions": len(texts)}


def linear_probe(classifier: torch.Tensor | None, task, features: Features, shots, seeds: int) -> dict:
    """Few/full-shot probes on a seeded, stratified half/half split of the task's labelled images.

    `classifier` (the text classifier, D x C) initialises the head; None starts it at zero.
    """
    check_labels(features, task)
    train, test = stratified_split(features.labels, 0.5, seed=0)
    return few_shot_probe(features.image[train], features.labels[train], features.image[test],
                          features.labels[test], shots=shots, seeds=seeds,
                          init_weights=None if classifier is None else classifier.T)


# --- side by side -------------------------------------------------------------------------------
def _resolve_task(task, data):
    """A Task object, or a name looked up in the mini world's tasks/ folder first, then built in."""
    if not isinstance(task, str):
        return task
    from .tasks import get_task

    if isinstance(data, (str, os.PathLike)) and (Path(data) / "tasks" / f"{task}.json").is_file():
        return get_task(str(Path(data) / "tasks" / f"{task}.json"))
    return get_task(task)


def task_data_path(data, task_name: str, split: str = "eval") -> str:
    """Where a task's evaluation data is: a per-task mapping, WORLD/<split>/<task>, DATA/<task>, or DATA.
    `split` other than "eval" (the mini world's "val") must exist as DATA/<split>/<task>: falling
    back to the test data there would choose settings on it without saying so."""
    if isinstance(data, dict):
        if task_name not in data:
            raise ValueError(f"no evaluation data given for task {task_name} (have: {sorted(data)})")
        return str(data[task_name])
    if data is None:
        raise ValueError(f"no evaluation data given for task {task_name}: pass data=PATH")
    if split != "eval":
        if not (Path(data) / split / task_name).is_dir():
            raise FileNotFoundError(f"no {split!r} split for task {task_name}: {Path(data) / split / task_name} "
                                    f"does not exist (a mini world made with val_size > 0 has WORLD/val/<task>)")
        return str(Path(data) / split / task_name)
    for candidate in (Path(data) / "eval" / task_name, Path(data) / task_name):
        if candidate.is_dir():
            return str(candidate)
    return str(data)


def evaluate(models, tasks=(), data=None, out="EVAL", retrieval=(), probe_shots=(), probe_seeds: int = 3,
             language_init: bool = True, batch_size: int = 64, workers: int = 2, device="auto",
             cache_dir=None, split: str = "eval", gate_scales=()) -> dict:
    """Evaluate every model on every task (and captioned set); write results, tables and a chart to `out`.

    models: model specs 'LABEL=NAME@PRETRAINED' (the first is the reference for deltas).
    tasks: task names or Task objects; data: a mini world, a dataset path, or {task: path}.
    split: "eval" (the test sets) or "val" (a mini world's validation sets, for choosing settings).
    retrieval: extra captioned sets (paths); probe_shots: e.g. [1, 5, "full"] (empty: no probe).
    gate_scales: lambdas in [0, 1]; every gated model is also evaluated with its gates scaled by
    each (`gated.scale_gates`), as models LABEL@LAMBDA, and results["gate_scale_curve"] holds the curve.
    """
    started, device = time.time(), resolve_device(device)
    out = Path(out)
    cache_dir = Path(cache_dir) if cache_dir else out / "feature_cache"
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]
    if len({s.label for s in specs}) != len(specs):
        raise ValueError(f"model labels must be unique: {[s.label for s in specs]}")
    tasks = [_resolve_task(t, data) for t in tasks]
    datasets = {t.name: task_data_path(data, t.name, split) for t in tasks}
    results = {"models": {}, "roles": {t.name: getattr(t, "role", None) or "" for t in tasks},
               "zero_shot": {}, "retrieval": {}, "probe": {}, "skipped": {}, "cache_hits": 0, "split": split}
    extract = {"batch_size": batch_size, "workers": workers, "device": device}
    for spec in specs:
        model, preprocess, tokenizer = load_model(spec.name, spec.pretrained, device=device)
        fingerprint = weights_fingerprint(model)
        for label, lam in model_variants(spec.label, model, gate_scales):
            if label in results["models"]:
                raise ValueError(f"model label {label!r} is given twice (a gate-scaled model is LABEL@LAMBDA)")
            results["models"][label] = {"model": model.react_vl["model"], "pretrained": spec.pretrained,
                                        "gated_layers": model.react_vl["gated_layers"], "fingerprint": fingerprint,
                                        "gate_scale": lam}
            # lambda 1 computes exactly what the saved model computes: the same cache entry
            key = fingerprint if lam in (None, 1.0) else f"{fingerprint}|gate_scale={lam!r}"
            with scale_gates(model, lam) if lam is not None else nullcontext():
                _evaluate_model(model, preprocess, tokenizer, label, key, tasks, datasets, retrieval, results,
                                cache_dir, extract, probe=(probe_shots, probe_seeds, language_init))
    results["gate_scale_curve"] = gate_scale_curve(results)
    results["seconds"] = round(time.time() - started, 2)
    results["table"] = side_by_side_rows(results, list(results["models"]))
    results["out"] = str(out)
    write_outputs(results, out)
    return results


def model_variants(label: str, model, gate_scales) -> list[tuple[str, float | None]]:
    """The model as saved (lambda None) and, if it has gated blocks, LABEL@LAMBDA for every gate scale."""
    if not gate_scales or not gated_layers(model):
        return [(label, None)]
    return [(label, None)] + [(f"{label}@{float(lam):g}", float(lam)) for lam in gate_scales]


def _evaluate_model(model, preprocess, tokenizer, label, fingerprint, tasks, datasets, retrieval, results,
                    cache_dir, extract, probe) -> None:
    """One model's zero-shot, retrieval and probe results on every task and captioned set, into `results`."""
    probe_shots, probe_seeds, language_init = probe
    device = extract["device"]
    for task in tasks:
        features, hit = cached_features(model, preprocess, datasets[task.name], cache_dir, fingerprint,
                                        list(task.classnames), desc=f"{label}/{task.name}", **extract)
        results["cache_hits"] += hit
        results["skipped"][datasets[task.name]] = features.skipped
        classifier = text_classifier(model, tokenizer, task, device)
        results["zero_shot"].setdefault(task.name, {})[label] = zero_shot(model, classifier, task, features)
        recall = image_text_retrieval(model, tokenizer, features, device)
        if recall:
            results["retrieval"].setdefault(task.name, {})[label] = recall
        if probe_shots:
            results["probe"].setdefault(task.name, {})[label] = linear_probe(
                classifier if language_init else None, task, features, probe_shots, probe_seeds)
    for captioned in retrieval:
        features, hit = cached_features(model, preprocess, str(captioned), cache_dir, fingerprint,
                                        desc=f"{label}/{Path(captioned).name}", **extract)
        results["cache_hits"] += hit
        results["skipped"][str(captioned)] = features.skipped
        recall = image_text_retrieval(model, tokenizer, features, device)
        if recall is None:
            raise ValueError(f"retrieval set {captioned} has no captions")
        results["retrieval"].setdefault(Path(captioned).name, {})[label] = recall


def gate_scale_curve(results: dict) -> dict:
    """Per gated model evaluated at gate scales: {label: {lambda: {task: zero-shot score in points}}}."""
    curve = {}
    for label, info in results["models"].items():
        if info["gate_scale"] is None:
            continue
        base_label = label.rsplit("@", 1)[0]
        curve.setdefault(base_label, {})[info["gate_scale"]] = {
            task: round(100 * by_model[label]["score"], 2) for task, by_model in results["zero_shot"].items()}
    return curve


def side_by_side_rows(results: dict, labels: list[str]) -> list[dict]:
    """One row per (task, measure): each model's value and its delta against the first model.

    `role` is the mini-world task's role (target: the style customization is for; control: styles
    it should not lose), empty elsewhere.
    """
    measures = []
    for task, by_model in results["zero_shot"].items():
        measures.append((task, f"zero-shot {next(iter(by_model.values()))['metric']}",
                         {m: r["score"] for m, r in by_model.items()}))
    for dataset, by_model in results["retrieval"].items():
        for direction in ("image_to_text", "text_to_image"):
            measures.append((dataset, f"{direction.replace('_', ' ')} R@1",
                             {m: r[f"{direction}_R@1"] for m, r in by_model.items()}))
    for task, by_model in results["probe"].items():
        for shots in next(iter(by_model.values()))["shots"]:
            measures.append((task, f"linear probe {shots}-shot",
                             {m: r["shots"][shots]["mean"] for m, r in by_model.items()}))
    rows = []
    for task, measure, values in measures:
        row = {"task": task, "role": results["roles"].get(task, ""), "measure": measure,
               **{m: round(values[m], 4) for m in labels}}
        row.update({f"Δ {m}": round(values[m] - values[labels[0]], 4) for m in labels[1:]})
        rows.append(row)
    return rows


def write_outputs(results: dict, out: Path) -> None:
    """results.json (everything), table.{md,csv,json}, chart.png."""
    rows = results["table"]
    write_json(results, out / "results.json")
    write_json(rows, out / "table.json")
    columns = list(rows[0]) if rows else ["task", "measure"]
    with atomic_path(out / "table.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = markdown_table(columns, [[row[c] for c in columns] for row in rows])
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _bar_chart(rows, list(results["models"]), out / "chart.png")


def _bar_chart(rows: list[dict], labels: list[str], path: Path) -> None:
    """Horizontal grouped bars, one group per table row, so long task/measure names stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.8 / max(len(labels), 1)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.25 * len(rows) * max(len(labels), 1) ** 0.5))
    positions = np.arange(len(rows))[::-1]
    for i, label in enumerate(labels):
        axes.barh(positions - i * height, [row[label] for row in rows], height, label=label)
    axes.set_yticks(positions - height * (len(labels) - 1) / 2)
    axes.set_yticklabels([f"{row['task']}: {row['measure']}" for row in rows], fontsize=8)
    axes.set_xlim(0, 1)
    axes.set_xlabel("score")
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
