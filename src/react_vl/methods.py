"""The field's retrieval-augmented methods as functions over the same inputs, side by side.

    pool = retrieved_examples(kb, "R/all", task)            # retrieved images' KB embeddings, class labels
    text = text_classifier(model, tokenizer, task, "cpu")   # D x C, the zero-shot head
    head = neural_priming(text, pool, blend=0.3)            # a Head: logits = features @ weight.T + bias
    accuracy = score(head, task, test_features)

Every method starts from one base CLIP, one task (class names and templates), one retrieved set
(its rows' KB image embeddings, which are the base's own image features, labelled with the class
each row was retrieved for: a row retrieved for several classes counts once for each, as in the
papers' per-class folders) and, for the few-shot variants, k shots per class drawn (seeded) from
the task's *validation* split, never its test split:

- `react`: a gated-image or locked-text checkpoint made by `react_vl.train` (REACT, CVPR 2023),
  evaluated as it is; `gate_scale`: the same gated model with its gates scaled (`gated.scale_gates`);
- `real_prompt`: each class named by whichever of its names (the task's `synonyms`) the KB captions
  use most (REAL-Prompt, Parashar et al., CVPR 2024); with no synonyms it is the zero-shot head;
- `real_linear`: a linear head trained on the retrieved features and the class prompts' text
  features (REAL's cross-modal recipe), then averaged 1:1 with the zero-shot head (REAL's released
  code: 0.5 x trained + 0.5 x zero-shot weights, WiSE-FT on the head). REAL trains from the
  zero-shot head with AdamW at a small learning rate, which keeps the two on one scale; here the
  head is probe.py's L-BFGS logistic regression, so both heads' class vectors are normalised first;
- `neural_priming`: class centroids of the retrieved features blended into the text head,
  (1 - blend) x text + blend x centroids, no training (Wallingford et al., NeurIPS 2023; its code's
  `alpha` is 1 - blend); `neural_priming_transductive` first keeps only the pool images among each
  unlabelled test image's nearest neighbours (the paper's transductive filtering);
- `swat`: the image tower fine-tuned (`train`, locked-text) on the retrieved pairs with the few
  shots mixed in, then the head retrained on the few shots alone (Liu et al., CVPR 2025);
- `wise_ft`: theta = (1 - alpha) x base + alpha x tuned, for strategies that tune existing weights
  (Wortsman et al., CVPR 2022);
- `few_shot_head`: the language-initialised linear probe (probe.py) on k shots, the few-shot
  variant of a method whose output is a model.

`compare_methods` runs all of them for one seed on the mini world and records each one's scores
and cost; `methods_table` writes the table `react-vl study --ablation methods` shows.
"""

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .evaluate import (Features, cached_features, check_labels, encode_texts, task_data_path, text_classifier,
                       weights_fingerprint)
from .gated import scale_gates
from .kb import KnowledgeBase
from .metrics import task_metric
from .models import load_model
from .probe import ZERO_SHOT_SCALE, sample_few_shot, train_probe
from .utils import atomic_path, markdown_table, read_json, write_json

SHOTS = (1, 4, 16)
NP_BLENDS = (0.1, 0.3, 0.5)  # the released code's default alpha 0.9 is blend 0.1; its Flowers example 0.3
WISE_ALPHAS = (0.25, 0.5, 0.75)
GATE_SCALES = (0.25, 0.5, 0.75)
REAL_ALPHA = 0.5  # weight of the trained head in REAL-Linear's average with the zero-shot head
NEIGHBOURS = 10  # transductive priming: pool images kept per test image (the paper's retrievals per image)
FLOAT_BYTES = 4


# --- inputs ----------------------------------------------------------------------------------------
@dataclass
class Pool:
    """Labelled image features: retrieved examples or few shots. `rows`: the retrieved row of each
    example (one row retrieved for two classes gives two examples with the same row)."""
    image: torch.Tensor  # N x D, L2-normalised
    labels: torch.Tensor  # N
    rows: torch.Tensor | None = None


def _join(*pools: Pool | None) -> Pool:
    pools = [p for p in pools if p is not None and len(p.labels)]
    return Pool(torch.cat([p.image for p in pools]), torch.cat([p.labels for p in pools]))


def retrieved_examples(kb: KnowledgeBase | str | Path, retrieved: str | Path, task) -> Pool:
    """The retrieved rows whose classes include one of the task's, as (KB image embedding, class)
    examples: the base model's features of the retrieved images, read from the KB, not recomputed."""
    kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
    path = Path(retrieved) / "retrieved.parquet" if Path(retrieved).is_dir() else Path(retrieved)
    table = pq.read_table(path, columns=["id", "classes"])
    classes = table.column("classes").combine_chunks()
    label = pc.index_in(pc.list_flatten(classes), value_set=pa.array(list(task.classnames)))
    keep = pc.is_valid(label)
    rows = pc.list_parent_indices(classes).filter(keep).to_numpy(zero_copy_only=False)
    if not len(rows):
        raise ValueError(f"{path}: no retrieved row was retrieved for a class of task {task.name} "
                         f"({', '.join(task.classnames[:5])}, ...): retrieve for this task first")
    ids = table.column("id").to_numpy()[rows]
    image = torch.from_numpy(kb.embeddings_of("img_emb", ids).astype(np.float32))
    return Pool(torch.nn.functional.normalize(image, dim=1),
                torch.from_numpy(label.filter(keep).to_numpy(zero_copy_only=False).astype(np.int64)),
                torch.from_numpy(rows.astype(np.int64)))


def prompt_examples(model, tokenizer, task, device="cpu") -> Pool:
    """Every class prompt's text embedding, labelled with its class: cross-modal training samples."""
    prompts = [(c, template.format(name)) for c, name in enumerate(task.classnames) for template in task.templates]
    image = encode_texts(model, tokenizer, [p for _, p in prompts], device)
    return Pool(image, torch.tensor([c for c, _ in prompts]))


def shots_of(features: Features, keys: list[str]) -> Pool:
    """The few-shot examples `keys` (evaluation-data keys) from one model's features of their split."""
    where = {key: i for i, key in enumerate(features.keys)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise KeyError(f"few-shot samples {missing[:3]} are not in these features ({len(features.keys)} samples)")
    index = torch.tensor([where[k] for k in keys])
    return Pool(features.image[index], features.labels[index])


def draw_shots(features: Features, shots: int, seed: int) -> list[str]:
    """`shots` seeded samples per class of a (validation) split, as their keys."""
    return [features.keys[i] for i in sample_few_shot(features.labels, shots, seed).tolist()]


# --- heads -----------------------------------------------------------------------------------------
@dataclass
class Head:
    """A linear classifier over image features: logits = features @ weight.T + bias."""
    weight: torch.Tensor  # C x D
    bias: torch.Tensor | None = None

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        out = image @ self.weight.T
        return out if self.bias is None else out + self.bias

    @property
    def parameters(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())


def text_head(text: torch.Tensor) -> Head:
    """The zero-shot head of a D x C text classifier (at the logit scale the probes start from)."""
    return Head(ZERO_SHOT_SCALE * text.T)


def score(head: Head, task, features: Features) -> float:
    """The task's metric of the head on these features, in percent."""
    check_labels(features, task)
    return round(100 * task_metric(task.metric, head.logits(features.image), features.labels), 2)


def most_frequent_names(kb: KnowledgeBase | str | Path, task) -> list[str]:
    """Per class, whichever of its names (class name first, then the task's synonyms) the most KB
    captions contain as a whole word (case-insensitive); ties go to the earlier name. Counted part
    by part with pyarrow's regex kernel, so memory is one part's captions."""
    if not task.synonyms:
        return list(task.classnames)
    kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
    names = sorted({name for c in task.classnames for name in task.names_of(c)})
    counts = Counter()
    for part in kb.parts:
        captions = kb.part_metadata(part, ["caption"]).column("caption")
        for name in names:
            hits = pc.match_substring_regex(captions, rf"\b{re.escape(name)}\b", ignore_case=True)
            counts[name] += pc.sum(hits).as_py() or 0
    return [max(task.names_of(c), key=lambda name: counts[name]) for c in task.classnames]


def real_prompt(model, tokenizer, task, kb, device="cpu") -> tuple[Head, list[str]]:
    """REAL-Prompt: the zero-shot head with each class named by its most frequent name in the KB."""
    names = most_frequent_names(kb, task)
    renamed = task if names == list(task.classnames) else dataclasses.replace(task, classnames=names, synonyms=None)
    return text_head(text_classifier(model, tokenizer, renamed, device)), names


def few_shot_head(text: torch.Tensor, examples: Pool, seed: int = 0) -> Head:
    """A linear probe on `examples` from the zero-shot head (weight decay towards it, probe.py)."""
    head, _ = train_probe(examples.image, examples.labels, text.shape[1], init_weights=text.T, seed=seed)
    return Head(head["weight"], head["bias"])


def real_linear(text: torch.Tensor, pool: Pool, prompts: Pool | None = None, shots: Pool | None = None,
                alpha: float = REAL_ALPHA, seed: int = 0) -> Head:
    """REAL-Linear: a logistic-regression head on the retrieved examples (and the class prompts' text
    features, and the few shots when given), its class vectors normalised and averaged with the
    zero-shot head's (alpha of the trained one): one bias-free head, as REAL's."""
    examples = _join(pool, prompts, shots)
    trained, _ = train_probe(examples.image, examples.labels, text.shape[1], seed=seed)
    mixed = alpha * torch.nn.functional.normalize(trained["weight"], dim=1) + (1 - alpha) * text.T
    return Head(ZERO_SHOT_SCALE * mixed)


def centroids(pool: Pool, fallback: torch.Tensor) -> torch.Tensor:
    """C x D: each class's mean feature, normalised; a class without examples keeps its `fallback` row."""
    sums = torch.zeros_like(fallback).index_add_(0, pool.labels, pool.image)
    counts = torch.bincount(pool.labels, minlength=len(fallback))
    means = torch.nn.functional.normalize(sums, dim=1)
    return torch.where((counts > 0)[:, None], means, fallback)


def neural_priming(text: torch.Tensor, pool: Pool, blend: float, shots: Pool | None = None) -> Head:
    """Neural Priming: (1 - blend) x text head + blend x class centroids of the retrieved (and few-shot)
    features; blend 0 is the zero-shot head."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"the priming blend must be in [0, 1] (0: the zero-shot head), got {blend}")
    cents = centroids(_join(pool, shots), text.T)
    return Head(ZERO_SHOT_SCALE * ((1 - blend) * text.T + blend * cents))


def neural_priming_transductive(text: torch.Tensor, pool: Pool, test_image: torch.Tensor, blend: float,
                                neighbours: int = NEIGHBOURS, chunk: int = 4096) -> Head:
    """Transductive priming: only the retrieved rows among some unlabelled test image's `neighbours`
    nearest (by image feature) build the centroids; then as `neural_priming`."""
    rows = pool.rows if pool.rows is not None else torch.arange(len(pool.labels))
    unique, first = np.unique(rows.numpy(), return_index=True)
    features = pool.image[torch.from_numpy(first)]
    near = torch.zeros(len(unique), dtype=torch.bool)
    for part in test_image.split(chunk):
        near[(part @ features.T).topk(min(neighbours, len(unique)), dim=1).indices.flatten()] = True
    kept = torch.from_numpy(np.isin(rows.numpy(), unique[near.numpy()]))
    return neural_priming(text, Pool(pool.image[kept], pool.labels[kept], rows[kept]), blend)


def wise_ft(base_state: dict, tuned_state: dict, alpha: float) -> dict:
    """WiSE-FT: every floating-point weight (1 - alpha) x base + alpha x tuned (alpha 0: the base,
    1: the tuned model, exactly); other tensors from the tuned model."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT's alpha must be in [0, 1] (0: the base, 1: the tuned model), got {alpha}")
    if set(base_state) != set(tuned_state):
        extra = sorted(set(base_state) ^ set(tuned_state))
        raise ValueError(f"WiSE-FT interpolates weights both models have; {len(extra)} differ (e.g. {extra[0]}). "
                         f"A gated model's new blocks have no base weights: use gate scaling for it")
    return {key: torch.lerp(base, tuned_state[key].to(base.dtype), alpha) if base.is_floating_point()
            else tuned_state[key].clone() for key, base in base_state.items()}


def wise_ft_model(base: str | Path, tuned: str | Path, alpha: float, device="cpu"):
    """(model, preprocess, tokenizer): the base architecture holding WiSE-FT's interpolated weights."""
    model, preprocess, tokenizer = load_model(None, str(base), device=device)
    tuned_model = load_model(None, str(tuned), device=device)[0]
    model.load_state_dict(wise_ft(model.state_dict(), tuned_model.state_dict(), alpha))
    return model, preprocess, tokenizer


def write_shot_shard(features: Features, keys: list[str], task, out: str | Path) -> Path:
    """The few-shot samples `keys` (keys of `features`: SHARD:KEY) as one webdataset shard, their
    images as they are, each captioned with one of the task's prompts for its class (in turn)."""
    import webdataset as wds
    from webdataset.tariterators import tarfile_samples

    label_of = {k: int(features.labels[i]) for i, k in enumerate(features.keys)}
    by_shard: dict[str, set] = {}
    for key in keys:
        shard, _, sample_key = key.rpartition(":")
        by_shard.setdefault(shard, set()).add(sample_key)
    written = 0
    with atomic_path(Path(out)) as tmp:
        writer = wds.TarWriter(str(tmp))
        for shard, wanted in by_shard.items():
            for sample in tarfile_samples([{"url": shard}]):
                if sample["__key__"] not in wanted:
                    continue
                ext = next(e for e in sample if e not in ("__key__", "__url__", "json", "txt", "cls"))
                label = label_of[f"{shard}:{sample['__key__']}"]
                caption = task.templates[written % len(task.templates)].format(task.classnames[label])
                writer.write({"__key__": f"{task.name}-{written:06d}", ext: sample[ext], "txt": caption})
                written += 1
        writer.close()
    if written != len(keys):
        raise ValueError(f"{out}: found {written} of the {len(keys)} few-shot samples in their shards")
    return Path(out)


def swat_stage_one(base: Path, retrieved_shards: Path, shot_folder: Path, shots: int, out: Path, steps: int,
                   batch: int, seed: int, precision: str = "auto") -> dict:
    """SWAT's first stage: locked-text fine-tuning on the retrieved pairs with the few shots mixed in
    at their share of the two (at least one a batch); returns train's summary (reused when done)."""
    from .train import TrainConfig, train

    if (out / "summary.json").is_file() and (out / "model.pt").is_file():
        return read_json(out / "summary.json")
    retrieved = read_json(Path(retrieved_shards) / "summary.json")["count"]
    share = max(shots / (shots + retrieved), 1 / batch)
    return train(TrainConfig(str(retrieved_shards), out, pretrained=str(base), strategy="locked-text", steps=steps,
                             batch_size=batch, precision=precision, seed=seed, mix_shards=str(shot_folder),
                             mix_ratio=share, resume="latest"))


def image_flops(model) -> int:
    """FLOPs of one image through the model's image tower (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    return int(counter.get_total_flops())


# --- the comparison ----------------------------------------------------------------------------------
@dataclass
class View:
    """One model's zero-shot text classifiers and its test and validation features on every task."""
    text: dict[str, torch.Tensor]
    test: dict[str, Features]
    val: dict[str, Features]
    flops: int


@dataclass
class Setting:
    """What every method of one comparison shares. `checkpoints`: label (strategy) -> {"path",
    "trainable", "train_s"} of the runs `react_vl.train` made on the retrieved set."""
    world: Path
    kb: Path
    base: Path
    retrieved: Path  # R/ with retrieved.parquet
    retrieved_shards: Path  # materialized from it
    checkpoints: dict
    tasks: list
    steps: int = 150
    batch: int = 128
    precision: str = "auto"
    workers: int = 2
    shots: tuple = SHOTS
    swat_shots: tuple = SHOTS  # the shot counts SWAT trains for (one fine-tuning run each)
    blends: tuple = NP_BLENDS
    alphas: tuple = WISE_ALPHAS
    gate_scales: tuple = GATE_SCALES


def model_view(model, preprocess, tokenizer, setting: Setting, cache_dir: Path, key: str) -> View:
    """The model's text classifiers and features (test and validation splits), features cached by `key`."""
    text, test, val = {}, {}, {}
    for task in setting.tasks:
        text[task.name] = text_classifier(model, tokenizer, task, "cpu")
        for split, into in (("eval", test), ("val", val)):
            data = task_data_path(str(setting.world), task.name, split)
            into[task.name] = cached_features(model, preprocess, data, cache_dir, key, list(task.classnames),
                                              desc=f"{task.name}/{split}", workers=setting.workers)[0]
    return View(text, test, val, image_flops(model))


def _row(method: str, heads: dict, view: View, tasks, shots: int = 0, knob=None, val: bool = True,
         trainable: int = 0, train_s: float = 0.0, storage: int = 0, inference: str = "none") -> dict:
    """One table row: the heads' scores on the test sets (and on the validation sets, where no
    validation sample trained them) and the method's cost."""
    return {"method": method, "shots": shots, "knob": knob, "chosen": False,
            "scores": {t.name: score(heads[t.name], t, view.test[t.name]) for t in tasks},
            "val_scores": {t.name: score(heads[t.name], t, view.val[t.name]) for t in tasks} if val else None,
            "trainable": int(trainable), "train_s": round(train_s, 2), "storage_bytes": int(storage),
            "inference": inference}


def mark_chosen(rows: list[dict], base_val: dict, tasks) -> float | None:
    """Mark the grid row chosen on the validation sets by the study's rule (`experiment.choose_gate_scale`:
    the largest mean target gain that keeps every control within tolerance); returns its knob."""
    from .experiment import choose_gate_scale

    choice = choose_gate_scale({r["knob"]: r["val_scores"] for r in rows}, base_val,
                               {t.name: t.role or "" for t in tasks})["chosen"]
    for r in rows:
        r["chosen"] = r["knob"] == choice
    return choice


def head_rows(setting: Setting, model, tokenizer, base: View, pools: dict, prompts: dict) -> list[dict]:
    """The methods that only change the head of the frozen base: zero-shot, REAL-Prompt, REAL-Linear,
    Neural Priming (blend grid, chosen on the validation sets) and its transductive variant."""
    tasks, per_task = setting.tasks, 1 / len(setting.tasks)
    zero = {t.name: text_head(base.text[t.name]) for t in tasks}
    rows = [_row("zero-shot", zero, base, tasks)]
    started = time.perf_counter()
    renamed = {t.name: real_prompt(model, tokenizer, t, setting.kb) for t in tasks}
    rows.append(_row("REAL-Prompt", {n: head for n, (head, _) in renamed.items()}, base, tasks,
                     knob=", ".join(sorted({f"{c}->{r}" for t in tasks for c, r in zip(t.classnames, renamed[t.name][1])
                                            if c != r})) or "no synonym used",
                     train_s=per_task * (time.perf_counter() - started)))
    started = time.perf_counter()
    linear = {t.name: real_linear(base.text[t.name], pools[t.name], prompts[t.name]) for t in tasks}
    size = next(iter(linear.values())).parameters
    rows.append(_row("REAL-Linear", linear, base, tasks, trainable=size, storage=size * FLOAT_BYTES,
                     train_s=per_task * (time.perf_counter() - started), inference="none (the heads average into one)"))
    grid = []
    for blend in setting.blends:
        started = time.perf_counter()
        heads = {t.name: neural_priming(base.text[t.name], pools[t.name], blend) for t in tasks}
        grid.append(_row("Neural Priming", heads, base, tasks, knob=blend, storage=zero[tasks[0].name].parameters
                         * FLOAT_BYTES, train_s=per_task * (time.perf_counter() - started)))
    blend = mark_chosen(grid, rows[0]["val_scores"], tasks)
    blend = setting.blends[0] if blend is None else blend
    started = time.perf_counter()
    transductive = {}
    for t in tasks:  # test-set heads from the test images, validation-set heads from the validation images
        for split, features in (("test", base.test), ("val", base.val)):
            transductive[(split, t.name)] = neural_priming_transductive(base.text[t.name], pools[t.name],
                                                                       features[t.name].image, blend)
    row = _row("Neural Priming, transductive", {t.name: transductive[("test", t.name)] for t in tasks}, base, tasks,
               knob=blend, storage=grid[0]["storage_bytes"], train_s=per_task * (time.perf_counter() - started) / 2,
               inference="transductive: the whole test set first")
    row["val_scores"] = {t.name: score(transductive[("val", t.name)], t, base.val[t.name]) for t in tasks}
    return rows + grid + [row]


def _cost_of(checkpoint: dict, view: View, base: View) -> dict:
    extra = view.flops - base.flops
    return {"trainable": checkpoint["trainable"], "train_s": checkpoint["train_s"],
            "storage": checkpoint["trainable"] * FLOAT_BYTES,
            "inference": f"+{extra / 1e6:.1f} MFLOPs/image (+{100 * extra / base.flops:.0f}%)" if extra else "none"}


def checkpoint_rows(setting: Setting, base: View, cache: Path, views: dict) -> list[dict]:
    """The customized checkpoints as they are (REACT's gated-image and locked-text, full fine-tuning),
    each gated one at every gate scale and each other at every WiSE-FT alpha (chosen on the
    validation sets). Fills `views` with each checkpoint's view, for the few-shot probes."""
    from .gated import gated_layers

    tasks, rows = setting.tasks, []
    base_val = {t.name: score(text_head(base.text[t.name]), t, base.val[t.name]) for t in tasks}
    for label, checkpoint in setting.checkpoints.items():
        model, preprocess, tokenizer = load_model(None, str(checkpoint["path"]))
        key = weights_fingerprint(model)
        views[label] = view = model_view(model, preprocess, tokenizer, setting, cache, key)
        cost = _cost_of(checkpoint, view, base)
        name = f"REACT {label}" if label in ("gated-image", "locked-text") else f"{label} fine-tuning"
        rows.append(_row(name, {t.name: text_head(view.text[t.name]) for t in tasks}, view, tasks, **cost))
        grid, gated = [], bool(gated_layers(model))
        for knob in setting.gate_scales if gated else setting.alphas:
            if gated:
                with scale_gates(model, knob):
                    scaled = model_view(model, preprocess, tokenizer, setting, cache, f"{key}|gate_scale={knob!r}")
            else:
                mixed, preprocess, tokenizer = wise_ft_model(setting.base, checkpoint["path"], knob)
                scaled = model_view(mixed, preprocess, tokenizer, setting, cache, weights_fingerprint(mixed))
            grid.append(_row(f"gate scale ({label})" if gated else f"WiSE-FT ({label})",
                             {t.name: text_head(scaled.text[t.name]) for t in tasks}, scaled, tasks, knob=knob,
                             **{**cost, "inference": cost["inference"] if gated else "none"}))
        mark_chosen(grid, base_val, tasks)
        rows += grid
    return rows


def few_shot_rows(setting: Setting, base: View, views: dict, pools: dict, prompts: dict, blend: float,
                  seed: int, out: Path) -> list[dict]:
    """k shots per class of every task from its validation split (seeded): the language-initialised
    probe on the base and on each REACT checkpoint, REAL-Linear and Neural Priming with the shots
    added, and SWAT. No validation score: the shots come from the validation sets."""
    tasks, rows = setting.tasks, []
    for k in setting.shots:
        keys = {t.name: draw_shots(base.val[t.name], k, seed) for t in tasks}
        for label, view in [("base", base)] + [(name, views[name]) for name in ("gated-image", "locked-text")
                                                if name in views]:
            started = time.perf_counter()
            heads = {t.name: few_shot_head(view.text[t.name], shots_of(view.val[t.name], keys[t.name]), seed)
                     for t in tasks}
            size = next(iter(heads.values())).parameters
            cost = {} if label == "base" else _cost_of(setting.checkpoints[label], view, base)
            rows.append(_row(f"linear probe ({label})", heads, view, tasks, shots=k, val=False,
                             **{**cost, "trainable": cost.get("trainable", 0) + size,
                                "storage": cost.get("storage", 0) + size * FLOAT_BYTES,
                                "train_s": cost.get("train_s", 0) + (time.perf_counter() - started) / len(tasks)}))
        shots = {t.name: shots_of(base.val[t.name], keys[t.name]) for t in tasks}
        started = time.perf_counter()
        linear = {t.name: real_linear(base.text[t.name], pools[t.name], prompts[t.name], shots[t.name], seed=seed)
                  for t in tasks}
        size = next(iter(linear.values())).parameters
        rows.append(_row("REAL-Linear", linear, base, tasks, shots=k, val=False, trainable=size,
                         storage=size * FLOAT_BYTES, train_s=(time.perf_counter() - started) / len(tasks),
                         inference="none (the heads average into one)"))
        priming = {t.name: neural_priming(base.text[t.name], pools[t.name], blend, shots[t.name]) for t in tasks}
        rows.append(_row("Neural Priming", priming, base, tasks, shots=k, knob=blend, val=False,
                         storage=size * FLOAT_BYTES))
        if k in setting.swat_shots:
            rows.append(swat_row(setting, base, keys, k, seed, out / f"swat-{k}shot"))
    return rows


def swat_row(setting: Setting, base: View, keys: dict, shots: int, seed: int, run: Path) -> dict:
    """SWAT with `shots` per class: stage one on the retrieved pairs plus the target tasks' shots,
    stage two a head per task retrained on that task's shots alone."""
    targets = [t for t in setting.tasks if t.role == "target"] or setting.tasks
    for task in targets:
        if not (run / "shots" / f"{task.name}.tar").is_file():
            write_shot_shard(base.val[task.name], keys[task.name], task, run / "shots" / f"{task.name}.tar")
    summary = swat_stage_one(setting.base, setting.retrieved_shards, run / "shots",
                             sum(len(keys[t.name]) for t in targets), run / "stage1", setting.steps, setting.batch,
                             seed, setting.precision)
    model, preprocess, tokenizer = load_model(None, str(run / "stage1" / "model.pt"))
    view = model_view(model, preprocess, tokenizer, setting, run.parent.parent / "feature_cache",
                      weights_fingerprint(model))
    started = time.perf_counter()
    heads = {t.name: few_shot_head(view.text[t.name], shots_of(view.val[t.name], keys[t.name]), seed)
             for t in setting.tasks}
    size = summary["trainable_params"] + next(iter(heads.values())).parameters
    return _row("SWAT", heads, view, setting.tasks, shots=shots, val=False, trainable=size,
                train_s=summary["time_s"] + (time.perf_counter() - started) / len(setting.tasks),
                storage=size * FLOAT_BYTES)


def compare_methods(setting: Setting, seed: int, out: str | Path) -> dict:
    """Every method for one seed (OUT/result.json; a finished seed is read back, not redone).
    Features are cached in OUT/../feature_cache, shared by the seeds."""
    out = Path(out)
    if (out / "result.json").is_file():
        return read_json(out / "result.json")
    started = time.time()
    cache = out.parent / "feature_cache"
    model, preprocess, tokenizer = load_model(None, str(setting.base))
    base = model_view(model, preprocess, tokenizer, setting, cache, weights_fingerprint(model))
    pools = {t.name: retrieved_examples(setting.kb, setting.retrieved, t) for t in setting.tasks}
    prompts = {t.name: prompt_examples(model, tokenizer, t) for t in setting.tasks}
    rows = head_rows(setting, model, tokenizer, base, pools, prompts)
    blend = next((r["knob"] for r in rows if r["method"] == "Neural Priming" and r["chosen"]), setting.blends[0])
    views: dict[str, View] = {}
    rows += checkpoint_rows(setting, base, cache, views)
    per_class = min(int(torch.bincount(f.labels).min()) for f in base.val.values())  # shots a split can give
    skipped = [k for k in setting.shots if k > per_class]
    shots = tuple(k for k in setting.shots if k <= per_class)
    rows += few_shot_rows(dataclasses.replace(setting, shots=shots), base, views, pools, prompts, blend, seed, out)
    record = {"seed": seed, "rows": rows, "retrieved_examples": {n: len(p.labels) for n, p in pools.items()},
              "shots_skipped": skipped, "base_image_flops": base.flops, "seconds": round(time.time() - started, 1)}
    write_json(record, out / "result.json")
    return record


# --- the table ---------------------------------------------------------------------------------------
def _size_text(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B" if count else "0"


def _stat(values: list[float], signed: bool = False) -> str:
    mean = float(np.mean(values))
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if len(values) == 1 else f"{text} ± {float(np.std(values, ddof=1)):.1f}"


def method_groups(records: list[dict], targets: list[str], controls: list[str]) -> list[dict]:
    """Each (method, shots, setting) row over the seeds' records: its rows and zero-shot's, and
    every seed's mean change against zero-shot on the target / control tasks."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for record in records:
        zero = next(r for r in record["rows"] if r["method"] == "zero-shot")
        for row in record["rows"]:
            groups.setdefault((row["method"], row["shots"], str(row["knob"])), []).append((row, zero))
    return [{"method": method, "shots": shots, "pairs": pairs,
             **{name: [float(np.mean([row["scores"][t] - zero["scores"][t] for t in tasks])) for row, zero in pairs]
                for name, tasks in (("target", targets), ("control", controls))}}
            for (method, shots, _), pairs in groups.items()]


def methods_table(records: list[dict], targets: list[str], controls: list[str]) -> list[str]:
    """Markdown lines: every method row, mean ± std over the seeds' records, Δ against zero-shot."""
    columns = ["method", "shots", "setting", *(f"{t} (target)" for t in targets),
               *(f"{t} (control)" for t in controls), "Δ target", "Δ control", "trainable", "train s",
               "extra storage", "inference overhead"]
    lines = []
    for group in method_groups(records, targets, controls):
        pairs = group["pairs"]
        first = pairs[0][0]
        chosen = sum(row["chosen"] for row, _ in pairs)
        knob = "" if first["knob"] is None else str(first["knob"])
        if chosen:
            knob += f" (chosen on val{'' if len(pairs) == 1 else f': {chosen}/{len(pairs)} seeds'})"
        scores = [_stat([row["scores"][t] for row, _ in pairs]) for t in targets + controls]
        lines.append([group["method"], group["shots"] or "0", knob, *scores,
                      _stat(group["target"], True), _stat(group["control"], True), f"{first['trainable']:,}",
                      f"{np.mean([row['train_s'] for row, _ in pairs]):.1f}", _size_text(first["storage_bytes"]),
                      first["inference"]])
    return markdown_table(columns, lines)


def draw_methods(ax, records: list[dict], targets: list[str], controls: list[str], shots: int = 0) -> None:
    """Target gain against control change of every method at `shots`, mean ± std over the seeds;
    of a method whose knob was chosen on val, only the chosen setting."""
    groups = [g for g in method_groups(records, targets, controls)
              if (g["shots"] or 0) == shots and g["method"] != "zero-shot"]  # zero-shot: the origin
    chosen = {g["method"] for g in groups if any(row["chosen"] for row, _ in g["pairs"])}
    for group in groups:
        if group["method"] in chosen and not any(row["chosen"] for row, _ in group["pairs"]):
            continue
        (x, dx), (y, dy) = ((float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                            for v in (group["control"], group["target"]))
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=2)
        knob = group["pairs"][0][0]["knob"]
        ax.annotate(group["method"] + ("" if knob is None else f" {knob}"), (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set(xlabel="Δ control (points)", ylabel="Δ target (points)",
           title=f"methods, {shots} shots" if shots else "methods, zero-shot")
