"""What the demo and the study share: their common settings and the stages both run first.

    base, kb = prepare(out, config, cache_dir, clock)   # world, base model, knowledge base, indexes
    merged = retrieve_targets(kb, out / "world", out / "retrieved", config.retrieve_mode, ...)

Both customize one base model, trained from scratch on the mini world's pretraining corpus and
cached by `cache_key` (so the demo and the study reuse each other's), with pairs retrieved from
the knowledge base for the target tasks, or drawn from it (`random_subset`, `write_subset`) as
controls. `react_vl.demo` and `react_vl.study` add what each does with them.

Both hold to the same rules, fixed here before any run: REACT's precondition on the base
(`check_precondition`, on the validation sets) and the rule that chooses a setting on the
validation sets (`choose_gate_scale`; `CONTROL_TOLERANCE`).
"""

import hashlib
import json
import operator
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .concepts import ATTRIBUTE_CLASSES, MINI_TASKS, TARGET_TASKS
from .utils import atomic_path, read_json, write_json
from .world import WorldConfig

BASE_CACHE = "~/.cache/react-vl"  # where trained base models are kept, for every demo and study to reuse
CONTROL_TOLERANCE = 2.0  # points a control task may lose for a setting to be chosen (the demo's bar)
# REACT's precondition: the base already knows the concepts, on the validation sets, before any
# customization (what `check_precondition` measures)
DOMINANT_STYLE = "photo"
DOMINANT_MIN = 90.0  # zero-shot % of the dominant-style controls
RARE_MIN_CHANCE_MULTIPLE = 2.0  # every rare-style task above this many times chance
TARGET_MAX = 80.0  # zero-shot % a target may have: room left to gain
PROMPT_COSINE_MAX = 0.8  # mean class-prompt cosine of every task: the text tower tells classes apart
PRETRAIN_MAX_SECONDS = 600.0


@dataclass
class ExperimentConfig:
    """The settings the demo and the study share: the world, the base model, retrieval, and how a
    customization run trains (its steps and mixing are each experiment's own)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    model: str = "mini-vit"
    seed: int = 0
    # base pretraining: strategy `full` from random initialisation on the pretraining corpus
    base_steps: int = 1400
    base_batch: int = 128
    base_lr: float = 5e-4
    # retrieval: class-name prompts of every target task, both modes
    retrieve_mode: str = "both"
    per_class: int = 400
    # The embedding near-duplicate filters (the paper's 0.94 among results, 0.95 against the
    # evaluation images) are off: in the small base's space an image's nearest *other* KB image
    # sits closer than its own JPEG copy, so no threshold tells copies from distinct images
    # (docs/results/measurements-behind-defaults.md). No evaluation image can leak: the world
    # renders them from their own seeds (tests/test_world.py).
    dedup_threshold: float | None = None
    eval_threshold: float | None = None
    # customization
    batch: int = 128
    precision: str = "auto"
    workers: int = 2


def cache_key(config: ExperimentConfig) -> str:
    """The base model's identity: what it is trained on and how (workers and val_size change no byte)."""
    import open_clip

    from . import models  # noqa: F401  (registers the mini-world model configs, part of the identity)

    record = {"world": config.world.corpus_settings(), "model": open_clip.get_model_config(config.model),
              "seed": config.seed, "steps": config.base_steps, "batch": config.base_batch, "lr": config.base_lr}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


class StageClock:
    """Times each stage and prints a header, so a user sees where the experiment is."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, what: str):
        print(f"\n== {name}: {what}", flush=True)
        start = time.time()
        yield
        self.seconds[name] = round(time.time() - start, 1)
        print(f"== {name} done in {self.seconds[name]:.0f} s", flush=True)


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_precondition(val_scores: dict[str, float], pretrain_seconds: float,
                       prompt_cosines: dict[str, float]) -> dict:
    """REACT's precondition on a base model, from its zero-shot scores (percent) and mean class-prompt
    cosines on the mini world's validation sets and its pretraining time: the dominant-style controls
    known (>= DOMINANT_MIN), every rare-style task above RARE_MIN_CHANCE_MULTIPLE x chance, every
    target with headroom (<= TARGET_MAX), every task's class prompts apart (< PROMPT_COSINE_MAX), and
    pretraining within PRETRAIN_MAX_SECONDS. One record per criterion: its measured value, bar, pass."""
    missing = sorted(set(MINI_TASKS) - set(val_scores)) + sorted(set(MINI_TASKS) - set(prompt_cosines))
    if missing:
        raise ValueError(f"the precondition needs every mini-world task's validation score and class-prompt "
                         f"cosine; missing: {missing}")

    def criterion(name, task, value, op, bar):
        return {"criterion": name, "task": task, "value": round(float(value), 4), "op": op,
                "bar": round(float(bar), 4), "passed": bool(_COMPARE[op](value, bar))}

    criteria = []
    for name, spec in MINI_TASKS.items():
        if spec["style"] == DOMINANT_STYLE and spec["role"] == "control":
            criteria.append(criterion("dominant-style control known (val zero-shot %)", name, val_scores[name],
                                      ">=", DOMINANT_MIN))
        if spec["style"] != DOMINANT_STYLE:
            chance = 100.0 / len(ATTRIBUTE_CLASSES[spec["attribute"]])
            criteria.append(criterion(f"rare style above {RARE_MIN_CHANCE_MULTIPLE:g}x chance (val zero-shot %)",
                                      name, val_scores[name], ">", RARE_MIN_CHANCE_MULTIPLE * chance))
        if spec["role"] == "target":
            criteria.append(criterion("target has headroom (val zero-shot %)", name, val_scores[name],
                                      "<=", TARGET_MAX))
    criteria += [criterion("class prompts apart (mean cosine)", name, prompt_cosines[name], "<", PROMPT_COSINE_MAX)
                 for name in MINI_TASKS]
    criteria.append(criterion("pretraining time (s)", "base", pretrain_seconds, "<=", PRETRAIN_MAX_SECONDS))
    return {"passed": all(c["passed"] for c in criteria), "split": "val", "criteria": criteria}


def print_precondition(record: dict) -> None:
    """The precondition as a short table, and a warning for each criterion the base fails."""
    print("\nREACT's precondition (validation sets): " + ("met" if record["passed"] else "NOT met"))
    for c in record["criteria"]:
        print(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['task']:<18} {c['criterion']}: "
              f"{c['value']:g} (bar {c['op']} {c['bar']:g})")
    for c in record["criteria"]:
        if not c["passed"]:
            print(f"WARNING: {c['task']}: {c['criterion']} is {c['value']:g}, the bar is {c['op']} {c['bar']:g}")
    if not record["passed"]:
        print("REACT improves a base that already knows the concepts: customizing a base that misses these "
              "bars may not show what the method does")


def base_precondition(out: Path, base: Path, workers: int) -> dict:
    """REACT's precondition on the base, before any customization: its zero-shot scores and class-prompt
    cosines on the validation sets of OUT/world (never the test sets) and its pretraining time, checked
    by `check_precondition` (evaluation in OUT/precondition); printed, a warning per failed criterion."""
    from .evaluate import evaluate

    results = evaluate([f"base=@{base}"], list(MINI_TASKS), data=str(out / "world"), out=out / "precondition",
                       workers=workers, split="val")
    scores = {name: 100 * by_model["base"]["score"] for name, by_model in results["zero_shot"].items()}
    cosines = {name: by_model["base"]["class_prompt_cosine"] for name, by_model in results["zero_shot"].items()}
    record = check_precondition(scores, read_json(base.parent / "summary.json")["time_s"], cosines)
    print_precondition(record)
    return record


def choose_gate_scale(curve: dict[float, dict[str, float]], base_scores: dict[str, float],
                      roles: dict[str, str]) -> dict:
    """The gate scale lambda to use, chosen on the validation sets by a rule fixed before any run (the
    rule `study.choose_schedule` applies to schedules): the largest mean target gain over base among
    the lambdas whose every control task stays within CONTROL_TOLERANCE points of base; of equal
    gains, the smallest lambda. curve: {lambda: {task: score in points}}; roles: {task: role}."""
    targets = [t for t, role in roles.items() if role == "target"]
    controls = [t for t, role in roles.items() if role == "control"]
    if not targets:
        raise ValueError(f"choosing a gate scale needs target tasks (tasks with role 'target'); roles: {roles}")
    candidates = []
    for lam in sorted(curve):
        scores = curve[lam]
        candidates.append({"gate_scale": lam,
                           "target_change": round(float(np.mean([scores[t] - base_scores[t] for t in targets])), 3),
                           "worst_control_change": round(min(scores[t] - base_scores[t] for t in controls), 3)
                           if controls else None})
    eligible = [c for c in candidates
                if c["worst_control_change"] is None or c["worst_control_change"] >= -CONTROL_TOLERANCE]
    chosen = max(eligible, key=lambda c: c["target_change"]) if eligible else None
    return {"rule": f"largest mean target gain among the gate scales that keep every control task within "
                    f"{CONTROL_TOLERANCE:g} points of base", "candidates": candidates,
            "chosen": chosen and chosen["gate_scale"]}


def pretrain_base(out: Path, config: ExperimentConfig, cache_dir: Path | None) -> Path:
    """The base CLIP: trained from scratch on the pretraining corpus, reused if already trained."""
    from .train import TrainConfig, train

    run = out / "base"
    cached = cache_dir / f"base-{cache_key(config)}" if cache_dir else None
    for candidate in (run, cached):
        if candidate and (candidate / "model.pt").is_file() and \
                read_json(candidate / "summary.json").get("cache_key") == cache_key(config):
            if candidate != run:
                shutil.copytree(candidate, run, dirs_exist_ok=True)
            print(f"reusing the base model trained earlier: {candidate / 'model.pt'}")
            return run / "model.pt"
    summary = train(TrainConfig(str(out / "world" / "pretrain"), run, model=config.model, strategy="full",
                                steps=config.base_steps, batch_size=config.base_batch, lr=config.base_lr,
                                precision=config.precision, seed=config.seed, workers=config.workers,
                                resume="latest"))
    summary["cache_key"] = cache_key(config)
    write_json(summary, run / "summary.json")
    if cached:
        shutil.copytree(run, cached, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
    return run / "model.pt"


def prepare(out: Path, config: ExperimentConfig, cache_dir: str | Path | None,
            clock: StageClock) -> tuple[Path, Path]:
    """The stages every experiment shares: world, base model (cached under `cache_dir`; None: no
    cache), knowledge base and its indexes."""
    from .embed import embed_corpus
    from .index import build_indexes
    from .world import generate_world

    with clock("world", f"generate {config.world.pretrain_size:,} pretraining and {config.world.kb_size:,} "
                        f"knowledge-base pairs"):
        generate_world(out / "world", config.world)
    with clock("pretrain", f"train the base {config.model} from scratch ({config.base_steps} steps)"):
        base = pretrain_base(out, config, Path(cache_dir).expanduser() if cache_dir else None)
    kb = out / "kb"
    with clock("embed", "embed the knowledge base with the base model"):
        embed_corpus(str(out / "world" / "kb"), None, str(base), kb, workers=config.workers,
                     precision=config.precision)
    with clock("index", "build and tune the FAISS indexes"):
        build_indexes(kb)
    return base, kb


def retrieve_targets(kb: Path, world: Path, out: Path, mode: str, per_class: int,
                     dedup_threshold: float | None, eval_threshold: float | None) -> Path:
    """Retrieve for every target task into out/<task> (filtering out near-duplicates of the task's
    evaluation images if `eval_threshold` is set); merged into out/all/retrieved.parquet."""
    from .retrieve import retrieve
    from .tasks import get_task

    parts = [out / name for name in TARGET_TASKS]
    for name, part in zip(TARGET_TASKS, parts):
        filters = {"eval_set": world / "eval" / name, "eval_threshold": eval_threshold} \
            if eval_threshold is not None else {}
        retrieve(kb, get_task(name), part, mode=mode, per_class=per_class, dedup_threshold=dedup_threshold,
                 **filters)
    return merge_retrieved(parts, out / "all")


def merge_retrieved(parts: list[Path], out: Path) -> Path:
    """One training set from several tasks' retrieved sets: union by id, classes merged.

    A pair rejected in any part's curation (R/curation.json) is rejected in the merged set too,
    so materialize leaves it out and counts it."""
    from .curation import record_decisions, rejected_ids

    table = pa.concat_tables([pq.read_table(p / "retrieved.parquet") for p in parts], promote_options="default")
    rows, seen = [], {}
    for row in table.to_pylist():
        if row["id"] in seen:
            kept = seen[row["id"]]
            kept["classes"] = sorted(set(kept["classes"]) | set(row["classes"]))
            kept["score"] = max(kept["score"], row["score"])
        else:
            seen[row["id"]] = row
            rows.append(row)
    with atomic_path(out / "retrieved.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp)
    for part in parts:
        if rejected := rejected_ids(part):
            record_decisions(out, rejected, "reject", who=f"curation of {part}", scope={"merged_from": str(part)})
    return out


def random_subset(kb_dir: Path, size: int, seed: int, out: Path) -> Path:
    """The control: as many knowledge-base pairs as retrieval returned, drawn at random."""
    from .kb import KnowledgeBase

    metadata = KnowledgeBase(kb_dir).metadata()
    rng = np.random.default_rng(seed)
    picked = metadata.take(np.sort(rng.choice(metadata.num_rows, size=min(size, metadata.num_rows), replace=False)))
    return write_subset(picked, [["random"]] * picked.num_rows, 0.0, out)


def write_subset(rows: pa.Table, classes: list[list[str]], score: float, out: Path) -> Path:
    """A drawn (not retrieved) subset of KB rows, in the retrieved-set format materialize reads."""
    rows = rows.append_column("score", pa.array(np.full(rows.num_rows, score, dtype=np.float32)))
    rows = rows.append_column("classes", pa.array(classes, pa.list_(pa.string())))
    with atomic_path(out / "retrieved.parquet") as tmp:
        pq.write_table(rows, tmp)
    return out


def versions() -> dict:
    """The versions of react-vl and of the libraries a result depends on."""
    import faiss
    import open_clip
    import torch

    from . import __version__
    return {"react_vl": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "faiss": faiss.__version__, "python": platform.python_version()}
