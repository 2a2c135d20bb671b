"""`react-vl study`: the paper's ablations on the mini world, each over several customization seeds.

    summary = run_study("react-vl-study", quick=False, seeds=3)

The ablations (REACT's tables; docs/DESIGN.md for the stages they run through):
- strategy: base, locked-image, locked-text, full, gated-image, gated-image-text, at the paper's
  learning rates (5e-4 gated, 5e-5 otherwise: train's defaults), with trainable parameter counts;
- fair-strategy: every strategy over the same grid of learning rates and lengths (the same
  compute for each), each strategy's schedule chosen on the validation sets by `choose_schedule`'s
  rule, and the strategies compared at their chosen schedules;
- concept: why REACT's precondition matters. The default gated-image run on the web world and on
  the colour-cue world, whose base can match sketches to captions by colour and so lacks the
  shapes in sketches; each base's precondition check (validation sets) beside its gain;
- training set: retrieved vs a random subset of the knowledge base of the same size vs an oracle
  subset of that size (pairs whose ground-truth style is a target's, captions not noisy);
- retrieval mode: t2t, t2i, both;  retrieval size: ~1%, ~3%, the demo's size, ~10% of the knowledge base;
- number of gated layers, 1 .. depth;
- forgetting: every row shows the control tasks next to the targets; two ways to bound it are
  measured: mixing a share of general (pretraining) pairs into every batch, and fewer steps;
  a 4x longer run shows whether forgetting grows with training, and whether mixing still bounds it;
- schedule: 1x, 2x, 4x the steps, without and with general pairs mixed in, and the one the demo
  should use *chosen on the world's validation sets* (never the test sets every table reports) by
  a rule fixed before any run: the largest mean target gain among the schedules that keep every
  control task within 2 points of base (`choose_schedule`);
- methods (only when asked for): the field's retrieval-augmented methods on the same retrieved set
  and feature cache (`react_vl.methods`): REACT, REAL-Prompt, REAL-Linear, Neural Priming, SWAT,
  WiSE-FT and gate scaling, zero-shot and with 1, 4 and 16 validation-set shots, with their costs.

What is shared and what a seed changes: the world, the base model (trained once, as in the demo,
and cached), the knowledge base, its indexes and the retrieved sets are prepared once. A seed is
the customization seed: gated-block initialisation, data order and augmentation, and the draw of
the random and oracle subsets. So the spread measures customization noise, not base-model noise.

Every run writes STUDY/runs/<key>/result.json; a run whose result exists is not redone, so a
killed study continues where it stopped, and a run several ablations share (the default
gated-image run is in most) is trained once. Runs go seed by seed, and STUDY/study.json (every
run), STUDY/study.md (tables, mean ± std over seeds) and STUDY/study.png (the same as pictures)
are rewritten after each run, with every run's seconds (docs/results has the times measured).
"""

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .concepts import ATTRIBUTE_CLASSES, CONTROL_TASKS, MINI_TASKS, TARGET_TASKS
from .experiment import (BASE_CACHE, CONTROL_TOLERANCE, ExperimentConfig, StageClock, base_precondition, prepare,
                         random_subset, retrieve_targets, versions, write_subset)
from .strategies import GATED_STRATEGIES
from .utils import atomic_path, markdown_table, read_json, write_json

ABLATIONS = ("strategy", "fair-strategy", "subset", "mode", "size", "layers", "forgetting", "schedule", "concept",
             "methods")
DEFAULT_ABLATIONS = ABLATIONS[:-1]  # methods runs only when named: `react-vl study --ablation methods`
METHOD_CHECKPOINTS = ("gated-image", "locked-text", "full")  # the methods comparison's trained starting points
STRATEGY_ORDER = ("locked-image", "locked-text", "full", "gated-image", "gated-image-text")
# what each strategy does to the image and text towers, as the paper's strategy table shows it
TOWERS = {"base": ("-", "-"), "locked-image": ("frozen", "tuned"), "locked-text": ("tuned", "frozen"),
          "full": ("tuned", "tuned"), "gated-image": ("gated", "frozen"), "gated-image-text": ("gated", "tuned")}
# what the paper measured (ImageNet-1k zero-shot, ViT-B/32: REACT's tuning-strategy and search-method
# ablation tables), beside ours
PAPER_IN1K = {"base": 63.2, "locked-image": 63.7, "locked-text": 66.9, "full": 64.3, "gated-image": 68.6,
              "gated-image-text": 68.7, "t2i": 65.8, "t2t": 68.6, "both": 68.6}
SIZE_SHARES = (0.01, 0.03, 0.10)  # retrieval size curve: these shares of the KB, plus the demo's per_class
MIX_RATIOS = (0.25, 0.5)  # share of every batch drawn from the pretraining corpus
SCHEDULE_STEPS = (1, 2, 4)  # schedule ablation: these multiples of the default steps, each without and with mixing
FAIR_LRS = (5e-5, 5e-4)  # fair-strategy grid: every strategy at each learning rate ...
FAIR_STEPS = (1, 2)  # ... and each of these multiples of the default steps, with MIX_RATIOS[-1] general pairs
TASKS = TARGET_TASKS + CONTROL_TASKS


@dataclass
class StudyConfig(ExperimentConfig):
    """The study's settings: the demo's world, base model and retrieval; its rows customize on a
    short schedule, a quarter of the demo's steps, and set their own mixing (`plan_study`)."""
    steps: int = 150


@dataclass(frozen=True)
class Run:
    """One customization run; its key names its folder, so equal runs of two ablations are one."""
    strategy: str = "gated-image"
    data: str = "retrieved"  # retrieved | random | oracle (random and oracle: the default retrieved size)
    mode: str = "both"
    per_class: int = 400
    gated_layers: int = 0  # the last N image layers get gated blocks (0 for strategies without them)
    mix_ratio: float = 0.0
    steps: int = 300
    seed: int = 0
    lr: float | None = None  # None: train's default for the strategy

    @property
    def key(self) -> str:
        data = f"retrieved-{self.mode}-{self.per_class}" if self.data == "retrieved" else self.data
        lr = f"_lr{self.lr:g}" if self.lr is not None else ""
        return (f"{self.strategy}_{data}_L{self.gated_layers}_mix{self.mix_ratio:g}_"
                f"{self.steps}steps{lr}_seed{self.seed}")


def _depth(model_name: str) -> int:
    import open_clip

    from . import models  # noqa: F401  (registers the mini-world model configs with open_clip)
    return open_clip.get_model_config(model_name)["vision_cfg"]["layers"]


def default_ablations(quick: bool) -> tuple[str, ...]:
    """What a study runs when no ablation is named: all but methods; --quick leaves out the concept
    ablation too, which generates a second world and pretrains a second base."""
    return tuple(a for a in DEFAULT_ABLATIONS if not (quick and a == "concept"))


def plan_study(config: StudyConfig, quick: bool = False, ablations=ABLATIONS) -> dict[str, list[tuple[str, Run]]]:
    """Each ablation's rows: (label, run at seed 0). `quick` keeps fewer points of the long curves."""
    from .gated import default_gated_layers

    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"unknown ablation(s) {sorted(unknown)}; choose from {', '.join(ABLATIONS)}")
    depth = _depth(config.model)
    default = Run(mode=config.retrieve_mode, per_class=config.per_class,
                  gated_layers=len(default_gated_layers(depth)), steps=config.steps)
    n_classes = sum(len(ATTRIBUTE_CLASSES[MINI_TASKS[t]["attribute"]]) for t in TARGET_TASKS)
    shares = SIZE_SHARES[:1] if quick else SIZE_SHARES
    size_points = sorted({max(1, round(share * config.world.kb_size / n_classes)) for share in shares}
                         | {config.per_class})
    layer_points = sorted({1, default.gated_layers, depth}) if quick else range(1, depth + 1)
    steps, mix_ratios = config.steps, MIX_RATIOS[:1] if quick else MIX_RATIOS

    def schedule_point(n_steps: int, mix: float = 0.0) -> tuple[str, Run]:
        """The default run at another schedule, labelled the way every table names it."""
        label = f"{n_steps} steps" + (f", {100 * mix:g}% general pairs" if mix else "")
        return label, dataclasses.replace(default, steps=n_steps, mix_ratio=mix)

    forgetting = ([schedule_point(steps)] + [schedule_point(steps, r) for r in mix_ratios]
                  + [schedule_point(steps // 3)])
    if not quick:  # 4x longer: does forgetting grow with training, does mixing still bound it, and
        # does the gain still come from retrieval (the random subset of the same size, trained alike)?
        mixed, long_mixed = schedule_point(4 * steps, mix_ratios[-1])
        forgetting += [schedule_point(4 * steps), (mixed, long_mixed),
                       (f"{mixed}, random subset", dataclasses.replace(long_mixed, data="random"))]
    schedule = [schedule_point(k * steps, mix)
                for k in (SCHEDULE_STEPS[:2] if quick else SCHEDULE_STEPS) for mix in (0.0, mix_ratios[-1])]

    def strategy_run(strategy: str, **changes) -> Run:
        return dataclasses.replace(default, strategy=strategy, **changes,
                                   gated_layers=default.gated_layers if strategy in GATED_STRATEGIES else 0)

    fair = [(f"{s}, lr {lr:g}, {k * steps} steps", strategy_run(s, lr=lr, steps=k * steps, mix_ratio=mix_ratios[-1]))
            for s in STRATEGY_ORDER for lr in FAIR_LRS for k in (FAIR_STEPS[:1] if quick else FAIR_STEPS)]
    plan = {
        "strategy": [(s, strategy_run(s)) for s in STRATEGY_ORDER],
        "fair-strategy": fair,
        "concept": [("gated-image, web world", default)],
        "subset": [(d, dataclasses.replace(default, data=d)) for d in ("retrieved", "random", "oracle")],
        "mode": [(m, dataclasses.replace(default, mode=m)) for m in ("t2t", "t2i", "both")],
        "size": [(f"{n} per class", dataclasses.replace(default, per_class=n)) for n in size_points],
        "layers": [(f"{n} of {depth}", dataclasses.replace(default, gated_layers=n)) for n in layer_points],
        "forgetting": forgetting,
        "schedule": schedule,
        "methods": [(s, strategy_run(s)) for s in METHOD_CHECKPOINTS],
    }
    return {name: plan[name] for name in ABLATIONS if name in ablations}


# --- training sets -------------------------------------------------------------------------------
def oracle_subset(kb_dir: Path, size: int, seed: int, out: Path) -> Path:
    """The upper control: `size` KB pairs in the target tasks' styles with true captions, split
    evenly over the targets, picked from the ground truth that retrieval never sees."""
    from .kb import KnowledgeBase

    metadata = KnowledgeBase(kb_dir).metadata()
    if "json" not in metadata.column_names:
        raise ValueError(f"{kb_dir}: the oracle subset needs the ground-truth `json` metadata column "
                         f"(the mini world's KEY.json), which this knowledge base lacks")
    truth = [json.loads(text) if text else {} for text in metadata.column("json").to_pylist()]
    rng = np.random.default_rng(seed)
    picked, classes = [], []
    for i, task in enumerate(TARGET_TASKS):
        spec = MINI_TASKS[task]
        rows = [r for r, t in enumerate(truth) if t.get("style") == spec["style"] and not t.get("noisy")]
        share = size // len(TARGET_TASKS) + (i < size % len(TARGET_TASKS))
        chosen = rng.choice(rows, size=min(share, len(rows)), replace=False) if rows else []
        picked += [int(r) for r in chosen]
        classes += [[truth[r][spec["attribute"]]] for r in chosen]
    return write_subset(metadata.take(picked), classes, 1.0, out)


def training_set(study_dir: Path, kb: Path, run: Run, config: StudyConfig,
                 subset_size: Callable[[], int] | None) -> tuple[Path, int]:
    """The shards `run` trains on, made (retrieve or draw, then materialize) the first time asked.
    `subset_size` gives the random and oracle subsets their size: the default retrieved set's."""
    from .materialize import materialize

    if run.data == "retrieved":
        folder = study_dir / "data" / f"retrieved-{run.mode}-{run.per_class}"
    else:
        folder = study_dir / "data" / f"{run.data}-seed{run.seed}"
    done = folder / "shards" / "summary.json"
    if not done.is_file():
        if run.data == "retrieved":
            selected = retrieve_targets(kb, study_dir / "world", folder, run.mode, run.per_class,
                                        config.dedup_threshold, config.eval_threshold)
        else:
            draw = random_subset if run.data == "random" else oracle_subset
            selected = draw(kb, subset_size(), run.seed, folder / "selected")
        materialize(selected, folder / "shards", progress=False)
    return folder / "shards", read_json(done)["count"]


# --- runs ----------------------------------------------------------------------------------------
def scores_of(model_spec: str, study_dir: Path, out: Path, workers: int,
              split: str = "eval") -> tuple[dict, float]:
    """Zero-shot score (percent) of one model on every target and control task (on the test sets, or
    on the validation sets with split="val"), and the seconds it took."""
    from .evaluate import evaluate

    results = evaluate([model_spec], TASKS, data=str(study_dir / "world"), out=out, workers=workers,
                       split=split)
    label = model_spec.split("=", 1)[0]
    return {t: round(100 * results["zero_shot"][t][label]["score"], 2) for t in TASKS}, results["seconds"]


def do_run(study_dir: Path, kb: Path, base: Path, run: Run, config: StudyConfig,
           subset_size: Callable[[], int], validate: bool = False) -> dict:
    """Train and evaluate one run, or read its result if it exists (that is what makes the study resumable).
    `validate`: also score it on the validation sets (the schedule ablation chooses on them)."""
    from .train import TrainConfig, train

    run_dir = study_dir / "runs" / run.key
    model = f"run=@{run_dir / 'model.pt'}"
    if (run_dir / "result.json").is_file():
        result = read_json(run_dir / "result.json")
        if validate and "val_scores" not in result:  # finished before it was a schedule candidate
            result["val_scores"] = scores_of(model, study_dir, run_dir / "val_eval", config.workers, "val")[0]
            write_json(result, run_dir / "result.json")
        return result
    shards, pairs = training_set(study_dir, kb, run, config, subset_size)
    resume = "latest" if any((run_dir / "checkpoints").glob("step_*.pt")) else None
    # workers: the trainer's default, which fits the loader to the retrieved set's few shards
    summary = train(TrainConfig(str(shards), run_dir, pretrained=str(base), strategy=run.strategy, steps=run.steps,
                                lr=run.lr, batch_size=config.batch, precision=config.precision, seed=run.seed,
                                gated_layers=run.gated_layers or None, mix_ratio=run.mix_ratio,
                                mix_shards=str(study_dir / "world" / "pretrain") if run.mix_ratio else None,
                                resume=resume))
    scores, eval_seconds = scores_of(model, study_dir, run_dir / "eval", config.workers)
    result = {"key": run.key, "seed": run.seed, "config": {**asdict(run), "lr": summary["args"]["lr"],
                                                           "batch_size": config.batch},
              "scores": scores, "train_pairs": pairs, "trainable_params": summary["trainable_params"],
              "gates": summary["final_gates"], "final_loss": summary["final_loss"],
              "seconds": {"train": round(summary["time_s"], 1), "eval": eval_seconds}}
    if validate:
        result["val_scores"], val_seconds = scores_of(model, study_dir, run_dir / "val_eval", config.workers, "val")
        result["seconds"]["eval"] = round(eval_seconds + val_seconds, 2)
    write_json(result, run_dir / "result.json")
    return read_json(run_dir / "result.json")  # as a resumed study reads it (JSON keys: layer numbers as strings)


def choose_schedule(points: list[tuple[str, Run]], records: dict[str, dict], base_val: dict) -> dict:
    """The schedule the demo should use, chosen on the validation sets by a rule fixed before any
    run: the largest mean target gain over base among the schedules whose every control task stays
    within CONTROL_TOLERANCE points of base (mean over the seeds done). `chosen` is None until every
    candidate has a finished run, or when none keeps the controls."""
    candidates = []
    for label, run in points:
        done = _runs_of(run, records)
        if not done:
            continue
        val = {t: float(np.mean([r["val_scores"][t] for r in done])) for t in TASKS}
        candidates.append({"label": label, "steps": run.steps, "mix_ratio": run.mix_ratio, "lr": run.lr,
                           "seeds": len(done),
                           "val_target_change": round(float(np.mean([val[t] - base_val[t] for t in TARGET_TASKS])), 3),
                           "val_worst_control_change": round(min(val[t] - base_val[t] for t in CONTROL_TASKS), 3)})
    eligible = [c for c in candidates if c["val_worst_control_change"] >= -CONTROL_TOLERANCE]
    complete = len(candidates) == len(points)
    chosen = max(eligible, key=lambda c: c["val_target_change"]) if eligible and complete else None
    return {"rule": f"largest mean target gain on the validation sets among the schedules that keep every "
                    f"control task within {CONTROL_TOLERANCE:g} points of base there",
            "candidates": candidates, "complete": complete, "chosen": chosen and chosen["label"]}


def fair_strategy_choice(points: list[tuple[str, Run]], records: dict[str, dict], base: dict) -> dict:
    """Each strategy's schedule, chosen among its own points of the fair-strategy grid by
    `choose_schedule`'s rule (on the validation sets): {strategy: choice}."""
    strategies = dict.fromkeys(run.strategy for _, run in points)
    return {s: choose_schedule([p for p in points if p[1].strategy == s], records, base["val_scores"])
            for s in strategies}


def chosen_strategy_rows(points: list[tuple[str, Run]], choice: dict, records: dict[str, dict],
                         base_scores: dict) -> list[dict]:
    """The fair comparison: base, then every strategy whose choice is made, at its chosen schedule (test sets)."""
    rows = [base_row(base_scores)]
    for label, run in points:
        if choice[run.strategy]["chosen"] == label and (done := _runs_of(run, records)):
            rows.append({**table_row(run.strategy, sorted(done, key=lambda r: r["seed"]), base_scores),
                         "schedule": label})
    return rows


def _setting(key: str) -> str:
    """A run key without its seed: the runs of one table row."""
    return key.rsplit("_seed", 1)[0]


def _runs_of(run: Run, records: dict[str, dict]) -> list[dict]:
    """The finished runs of `run`'s table row, over every seed done."""
    return [r for r in records.values() if _setting(r["key"]) == _setting(run.key)]


# --- tables --------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) over seeds; no spread from a single value."""
    values = np.asarray(list(values), dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def _stat(values) -> dict:
    mean, std = mean_std(values)
    return {"mean": round(mean, 3), "std": None if std is None else round(std, 3), "n": len(values)}


def table_row(label: str, results: list[dict], base_scores: dict) -> dict:
    """One ablation row: every task's score and the mean change on targets and on controls, over seeds."""
    def change(result, tasks):
        return np.mean([result["scores"][t] - base_scores[t] for t in tasks])

    return {"label": label, "seeds": [r["seed"] for r in results],
            "trainable_params": results[0]["trainable_params"] if results else 0,
            "train_pairs": results[0]["train_pairs"] if results else 0,
            "scores": {t: _stat([r["scores"][t] for r in results]) for t in TASKS},
            "target_change": _stat([change(r, TARGET_TASKS) for r in results]),
            "control_change": _stat([change(r, CONTROL_TASKS) for r in results])}


def base_row(base_scores: dict) -> dict:
    """The base model: one shared model, so no seed spread."""
    zero = {"mean": 0.0, "std": None, "n": 1}
    return {"label": "base", "seeds": [], "trainable_params": 0, "train_pairs": 0,
            "scores": {t: {"mean": base_scores[t], "std": None, "n": 1} for t in TASKS},
            "target_change": zero, "control_change": zero}


def gain_in_seed_std(retrieved: dict, random: dict) -> dict:
    """Per target task: (retrieved - random) / pooled seed std; None where one seed gives no spread."""
    out = {}
    for task in TARGET_TASKS:
        a, b = retrieved["scores"][task], random["scores"][task]
        diff = a["mean"] - b["mean"]
        pooled = np.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2) if a["std"] is not None and b["std"] is not None else None
        out[task] = {"difference": round(diff, 3), "pooled_std": None if pooled is None else round(float(pooled), 3),
                     "in_std": None if not pooled else round(float(diff / pooled), 2)}
    return out


def _stat_text(stat: dict, signed: bool = False) -> str:
    """A table's mean ± std over seeds ("52.3 ± 1.2"; the mean alone from one seed)."""
    text = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.1f}"


TABLE_TITLES = {
    "strategy": ("Strategies (paper: REACT Table 6)", "strategy"),
    "subset": ("Retrieved vs random vs oracle training set of the same size (gated-image)", "training set"),
    "mode": ("Retrieval mode (gated-image)", "mode"),
    "size": ("Retrieval size (gated-image)", "retrieved per class"),
    "layers": ("Number of gated layers (the last N image layers)", "gated layers"),
    "forgetting": ("Bounding forgetting (gated-image)", "setting"),
    "schedule": ("Customization schedule, test sets (gated-image; chosen on the validation sets, below)", "schedule"),
    "fair-strategy": ("Every strategy on the same grid of learning rates and lengths, test sets", "strategy, schedule"),
    "concept": ("The base lacks the concept: the same run on the web and the colour-cue world (each against "
                "its own base)", "world, model"),
    "fair-strategy-chosen": ("Strategies, each at its schedule chosen on the validation sets (fair comparison)",
                             "strategy"),
    "methods": ("Retrieval-augmented methods: the checkpoints they start from (customized on the retrieved set)",
                "strategy"),
}


def ablation_table(ablation: str, rows: list[dict], kb_size: int) -> list[str]:
    title, first = TABLE_TITLES[ablation]
    extra = {"strategy": ["image", "text", "trainable", "paper IN-1k"], "layers": ["trainable"],
             "fair-strategy-chosen": ["image", "text", "trainable", "paper IN-1k"],
             "methods": ["trainable"],
             "size": ["pairs", "% of KB"], "subset": ["pairs"], "mode": ["pairs", "paper IN-1k"]}.get(ablation, [])
    columns = [first, *extra, *(f"{t} (target)" for t in TARGET_TASKS), *(f"{t} (control)" for t in CONTROL_TASKS),
               "Δ target", "Δ control"]
    cells = []
    for row in rows:
        extra_cells = {"image": TOWERS.get(row["label"], ("", ""))[0], "text": TOWERS.get(row["label"], ("", ""))[1],
                 "trainable": f"{row['trainable_params']:,}", "pairs": f"{row['train_pairs']:,}",
                 "% of KB": f"{100 * row['train_pairs'] / kb_size:.1f}",
                 "paper IN-1k": str(PAPER_IN1K.get(row["label"], ""))}
        cells.append([row["label"], *(extra_cells[c] for c in extra), *(_stat_text(row["scores"][t]) for t in TASKS),
                      _stat_text(row["target_change"], True), _stat_text(row["control_change"], True)])
    return [f"### {title}", "", *markdown_table(columns, cells)]


def schedule_lines(choice: dict) -> list[str]:
    """The validation-set figures the schedule was chosen on, and the choice."""
    lines = [f"Chosen on the validation sets ({choice['rule']}): "
             + (f"**{choice['chosen']}**" if choice["chosen"] else
                "none yet (not every schedule has run)" if not choice["complete"] else "none keeps the controls"),
             ""]
    return lines + markdown_table(["schedule", "seeds", "val Δ target", "val worst Δ control"],
                                  [[c["label"], c["seeds"], f"{c['val_target_change']:+.1f}",
                                    f"{c['val_worst_control_change']:+.1f}"] for c in choice["candidates"]])


def gates_table(records: list[dict], depth: int) -> list[str]:
    """|tanh(alpha)| per gated layer after training (attention / dense gate), mean over seeds:
    a gate's sign is arbitrary (the block's output can flip with it), its size says how far it opened."""
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        if r["gates"]:
            by_setting.setdefault(_setting(r["key"]), []).append(r["gates"])
    rows = []
    for setting, gates in sorted(by_setting.items()):
        cells = [setting]
        for layer in range(depth):
            found = [g[str(layer)] for g in gates if str(layer) in g]
            cells.append(f"{np.mean([abs(g['attn']) for g in found]):.3f} / "
                         f"{np.mean([abs(g['dense']) for g in found]):.3f}" if found else "")
        rows.append(cells)
    return ["### Gate openings after training, |tanh(alpha)| attention / dense, mean over seeds", "",
            *markdown_table(["run", *(f"layer {i}" for i in range(depth))], rows)]


def build_tables(plan: dict, records: dict[str, dict], base_scores: dict) -> dict:
    """Every ablation's rows from the finished runs (seeds that are not done yet are left out)."""
    tables = {}
    for ablation, points in plan.items():
        rows = [base_row(base_scores)]  # "before" in every table, so forgetting reads off each one
        for label, run in points:
            done = _runs_of(run, records)
            if done:
                rows.append(table_row(label, sorted(done, key=lambda r: r["seed"]), base_scores))
        tables[ablation] = rows
    return tables


def write_study(study_dir: Path, summary: dict) -> None:
    """study.json (everything), study.md (the tables) and study.png (trade-off, curves, gates)."""
    write_json(summary, study_dir / "study.json")
    kb_size = summary["settings"]["world"]["kb_size"]
    lines = ["# react-vl study: REACT's ablations on the mini world", "",
             (f"Mean ± standard deviation over customization seeds {summary['seeds']} (one shared base model, "
             f"knowledge base and retrieval; a seed changes gated-block init, data order and the random/oracle draws). "
             f"Zero-shot scores in percent; Δ: mean change against base over the target / control tasks. "
             f"{summary['runs_done']} of {summary['runs_planned']} runs done; training and evaluation took "
             f"{summary['run_seconds'] / 60:.1f} min in all, this invocation {summary['seconds'] / 60:.1f} min."), ""]
    for ablation, rows in summary["tables"].items():
        lines += ablation_table(ablation, rows, kb_size) + [""]
        if ablation == "subset" and summary.get("retrieved_vs_random"):
            lines += ["Retrieved − random, in units of the pooled seed standard deviation: " + "; ".join(
                f"{task} {v['difference']:+.1f} points = "
                + (f"{v['in_std']:+.1f} std" if v["in_std"] is not None else "n/a (one seed)")
                for task, v in summary["retrieved_vs_random"].items()), ""]
        if ablation == "schedule" and summary.get("schedule_choice"):
            lines += schedule_lines(summary["schedule_choice"]) + [""]
        if ablation == "fair-strategy-chosen" and summary.get("strategy_choice"):
            for strategy, choice in summary["strategy_choice"].items():
                lines += [f"**{strategy}**:", ""] + schedule_lines(choice) + [""]
        if ablation == "concept" and summary.get("concept"):
            lines += concept_lines(summary["concept"]) + [""]
        if ablation == "methods" and summary.get("methods"):
            lines += methods_lines(summary["methods"]) + [""]
    lines += gates_table(summary["runs"], summary["depth"]) + [""]
    figure = study_figure(summary)
    if figure is not None:
        with atomic_path(study_dir / "study.png") as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        lines += ["![target gain against forgetting, size and layer curves, gate openings, methods](study.png)", ""]
    with atomic_path(study_dir / "study.md") as tmp:
        tmp.write_text("\n".join(lines))


def study_figure(summary: dict):
    """The tables as pictures: each run's target gain against its forgetting, the size and layer
    curves, and how far the gates opened per layer. None when no ablation has a finished run."""
    from matplotlib.figure import Figure

    tables = {name: rows[1:] for name, rows in summary["tables"].items() if len(rows) > 1}  # rows[0] is base
    gated = [r for r in summary["runs"] if r["gates"]]
    if not tables:
        return None
    panels = ["trade-off"] + [name for name in ("size", "layers") if name in tables] + (["gates"] if gated else []) \
        + (["methods"] if summary.get("methods") else [])
    figure = Figure(figsize=(4.4 * len(panels), 3.6), layout="constrained")
    for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        if panel == "trade-off":  # every row of every ablation, one point each
            for name, rows in tables.items():
                for row in rows:
                    ax.errorbar(row["control_change"]["mean"], row["target_change"]["mean"],
                                xerr=row["control_change"]["std"] or 0, yerr=row["target_change"]["std"] or 0,
                                fmt="o" if name == "strategy" else ".", color="C0" if name == "strategy" else "C7")
                    outlier = abs(row["target_change"]["mean"]) > 2 or row["control_change"]["mean"] < -5
                    if name == "strategy" or row["label"] in ("random", "oracle") or outlier:
                        ax.annotate(row["label"], (row["control_change"]["mean"], row["target_change"]["mean"]),
                                    fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axhline(0, color="k", lw=0.5)
            ax.axvline(0, color="k", lw=0.5)
            ax.set(xlabel="Δ control (points)", ylabel="Δ target (points)",
                   title="gain vs forgetting (grey: other ablations)")
        elif panel in ("size", "layers"):
            rows = tables[panel]
            x = [row["train_pairs"] if panel == "size" else int(row["label"].split()[0]) for row in rows]
            base = summary["tables"][panel][0]["scores"]
            for task in TARGET_TASKS:
                ax.errorbar(x, [r["scores"][task]["mean"] - base[task]["mean"] for r in rows],
                            yerr=[r["scores"][task]["std"] or 0 for r in rows], marker="o", capsize=3, label=task)
            ax.errorbar(x, [r["control_change"]["mean"] for r in rows],
                        yerr=[r["control_change"]["std"] or 0 for r in rows],
                        marker="s", ls="--", color="k", capsize=3, label="Δ control (mean)")
            ax.axhline(0, color="k", lw=0.5)
            ax.set(xlabel="retrieved pairs" if panel == "size" else "gated layers (the last N)",
                   ylabel="points vs base", title="retrieval size" if panel == "size" else "gated layers")
            if panel == "size":
                ax.set_xscale("log")
            else:
                ax.set_xticks(x)
            ax.legend(fontsize=7)
        elif panel == "methods":
            from .methods import draw_methods
            draw_methods(ax, summary["methods"]["records"], TARGET_TASKS, CONTROL_TASKS)
        else:  # mean |tanh(alpha)| per layer over every gated run
            layers = sorted({int(layer) for r in gated for layer in r["gates"]})
            for gate in ("attn", "dense"):
                ax.plot(layers, [np.mean([abs(r["gates"][str(i)][gate]) for r in gated if str(i) in r["gates"]])
                                 for i in layers], marker="o", label=gate)
            ax.set(xlabel="image layer", ylabel="mean |tanh(alpha)|", title=f"gate openings ({len(gated)} runs)",
                   xticks=layers)
            ax.legend(fontsize=7)
    return figure


def _check_same_config(study_dir: Path, config: StudyConfig) -> None:
    """A study folder holds one config: resuming with another would mix runs that are not comparable."""
    path = study_dir / "study-config.json"
    settings = {**json.loads(json.dumps(asdict(config))), "world": config.world.corpus_settings()}
    settings.pop("workers")  # data-loading processes change no run
    if path.is_file():
        changed = sorted(k for k, v in read_json(path).items() if settings.get(k) != v)
        if changed:
            raise ValueError(f"{study_dir} holds a study made with other settings ({', '.join(changed)} differ); "
                             f"use another --out or delete it")
    else:
        write_json(settings, path)


def run_study(out: str | Path = "react-vl-study", quick: bool = False, config: StudyConfig | None = None,
              seeds: int = 3, *, ablations=DEFAULT_ABLATIONS, cache_dir: str | Path | None = BASE_CACHE) -> dict:
    """Run (or resume) every ablation for `seeds` customization seeds; return what STUDY/study.json holds."""
    config = config or StudyConfig()
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    study_dir = Path(out)
    study_dir.mkdir(parents=True, exist_ok=True)
    _check_same_config(study_dir, config)
    plan = plan_study(config, quick, ablations)
    clock = StageClock()
    started = time.time()
    base, kb = prepare(study_dir, config, cache_dir, clock)
    with clock("base scores", "zero-shot scores of the base model on every task"):
        base_scores = base_model_scores(study_dir, base, config.workers,
                                        validate=bool({"schedule", "fair-strategy"} & set(plan)))
    default_retrieved = Run(mode=config.retrieve_mode, per_class=config.per_class)

    def subset_size() -> int:  # random and oracle subsets: as many pairs as the default retrieved set
        return training_set(study_dir, kb, default_retrieved, config, None)[1]

    seed_list = list(range(config.seed, config.seed + seeds))
    runs = seeded_runs(plan, seed_list)
    candidates = {_setting(run.key) for _, run in plan.get("schedule", []) + plan.get("fair-strategy", [])}
    records: dict[str, dict] = {}
    summary = {}
    for run in tqdm(runs, desc="study", unit="run"):
        tqdm.write(f"\n== run {len(records) + 1}/{len(runs)}: {run.key}")
        records[run.key] = do_run(study_dir, kb, base, run, config, subset_size,
                                  validate=_setting(run.key) in candidates)
        summary = study_summary(config, quick, plan, seed_list, base_scores, records, len(runs), clock, started)
        write_study(study_dir, summary)
    if "concept" in plan:
        with clock("concept", "the same run on the colour-cue world, whose base lacks the shapes in sketches"):
            summary["concept"] = lacks_concept(study_dir, base, config, plan["concept"][0][1], seed_list, cache_dir)
        summary["tables"]["concept"] += summary["concept"]["rows"]
        summary["seconds"] = round(time.time() - started, 1)
        write_study(study_dir, summary)
    if "methods" in plan:
        with clock("methods", "every method on the retrieved set, zero-shot and few-shot, seed by seed"):
            summary["methods"] = compare_methods_seeds(study_dir, kb, base, plan["methods"], seed_list, config,
                                                       subset_size, quick)
        summary["seconds"] = round(time.time() - started, 1)
        write_study(study_dir, summary)
    print(f"\nstudy: {study_dir / 'study.md'} and {study_dir / 'study.json'} "
          f"({len(records)} runs, {summary['seconds'] / 60:.0f} min)")
    return summary


def lacks_concept(study_dir: Path, base: Path, config: StudyConfig, run: Run, seeds: list[int],
                  cache_dir: str | Path | None) -> dict:
    """The concept ablation's colour-cue rows: that world's base, KB and retrieval in STUDY/colour-cue
    (their stage seconds apart from the web world's), `run` there at every seed, and both bases'
    precondition checks (validation sets)."""
    cue = dataclasses.replace(config, world=dataclasses.replace(config.world, variant="colour-cue"))
    cue_dir = study_dir / "colour-cue"
    clock = StageClock()
    cue_base, cue_kb = prepare(cue_dir, cue, cache_dir, clock)
    cue_scores = base_model_scores(cue_dir, cue_base, config.workers, validate=False)["scores"]
    results = [do_run(cue_dir, cue_kb, cue_base, dataclasses.replace(run, seed=seed), cue, lambda: 0)
               for seed in seeds]
    return {"stages": clock.seconds, "rows": [{**base_row(cue_scores), "label": "base, colour-cue world"},
                     table_row("gated-image, colour-cue world", results, cue_scores)],
            "precondition": {"web": base_precondition(study_dir, base, config.workers),
                             "colour-cue": base_precondition(cue_dir, cue_base, config.workers)}}


def concept_lines(concept: dict) -> list[str]:
    """Each world's base against REACT's precondition: the criteria it fails."""
    lines = []
    for world, record in concept["precondition"].items():
        failed = [f"{c['task']} {c['criterion']} {c['value']:g} (bar {c['op']} {c['bar']:g})"
                  for c in record["criteria"] if not c["passed"]]
        lines.append(f"- {world} world's base, precondition (validation sets): "
                     + ("met" if not failed else "NOT met: " + "; ".join(failed)))
    return lines


def compare_methods_seeds(study_dir: Path, kb: Path, base: Path, points: list[tuple[str, Run]], seeds: list[int],
                          config: StudyConfig, subset_size: Callable[[], int], quick: bool) -> dict:
    """`methods.compare_methods` for every seed, on the default retrieved set and each seed's runs of
    `points` (REACT's checkpoints and full fine-tuning): STUDY/methods/seed<N>/result.json."""
    from .methods import NP_BLENDS, Setting, compare_methods
    from .tasks import get_task

    shards, _ = training_set(study_dir, kb, Run(mode=config.retrieve_mode, per_class=config.per_class), config,
                             subset_size)
    grid = (0.5,) if quick else None  # --quick: one point of each knob's grid
    records = []
    for seed in seeds:
        checkpoints = {}
        for label, run in points:
            result = read_json(study_dir / "runs" / dataclasses.replace(run, seed=seed).key / "result.json")
            checkpoints[label] = {"path": study_dir / "runs" / result["key"] / "model.pt",
                                  "trainable": result["trainable_params"], "train_s": result["seconds"]["train"]}
        setting = Setting(world=study_dir / "world", kb=kb, base=base, retrieved=shards.parent / "all",
                          retrieved_shards=shards, checkpoints=checkpoints, tasks=[get_task(t) for t in TASKS],
                          steps=config.steps, batch=config.batch, precision=config.precision, workers=config.workers,
                          **({"blends": (NP_BLENDS[1],), "alphas": grid, "gate_scales": grid} if grid else {}))
        records.append(compare_methods(setting, seed, study_dir / "methods" / f"seed{seed}"))
    return {"records": records, "seconds": round(sum(r["seconds"] for r in records), 1)}


def methods_lines(methods: dict) -> list[str]:
    """The methods table (`methods.methods_table`) under a note on what its columns mean."""
    from .methods import methods_table

    note = ("Every method on the default retrieved set, zero-shot (shots 0) and with k shots per class drawn "
            "from each task's validation split; Δ: mean change against zero-shot on the target / control tasks. "
            "Knobs (Neural Priming's blend, WiSE-FT's alpha, the gate scale) are chosen on the validation sets by "
            "the study's rule. Costs are per task for the heads; train s includes the customization run; extra "
            f"storage: fp32 bytes of what is trained or kept. {len(methods['records'])} seed(s), "
            f"{methods['seconds'] / 60:.1f} min beyond the customization runs.")
    return ["### Retrieval-augmented methods side by side", "", note, "",
            *methods_table(methods["records"], TARGET_TASKS, CONTROL_TASKS)]


def base_model_scores(study_dir: Path, base: Path, workers: int, validate: bool) -> dict:
    """The base model's test scores (STUDY/base_scores.json) and, with `validate`, its validation
    scores (what the schedule is chosen on), each computed once: {"scores", "val_scores", "model"}."""
    splits = {"scores": ("base_scores.json", "base_eval", "eval")}
    if validate:
        splits["val_scores"] = ("base_val_scores.json", "base_val_eval", "val")
    scores = {"scores": None, "val_scores": None, "model": str(base)}
    for field_name, (file_name, eval_dir, split) in splits.items():
        if not (study_dir / file_name).is_file():
            write_json(scores_of(f"base=@{base}", study_dir, study_dir / eval_dir, workers, split)[0],
                       study_dir / file_name)
        scores[field_name] = read_json(study_dir / file_name)
    return scores


def seeded_runs(plan: dict, seeds: list[int]) -> list[Run]:
    """Every distinct run of the plan at every seed, seed by seed (a run two ablations share, once)."""
    unique = {}
    for seed in seeds:
        for points in plan.values():
            for _, run in points:
                unique.setdefault(dataclasses.replace(run, seed=seed).key, dataclasses.replace(run, seed=seed))
    return list(unique.values())


def study_summary(config: StudyConfig, quick: bool, plan: dict, seeds: list[int], base: dict,
                  records: dict[str, dict], planned: int, clock: StageClock, started: float) -> dict:
    """What STUDY/study.json holds after the runs done so far: settings, base scores, every table,
    the retrieved-vs-random gain, the schedule choice and every run."""
    tables = build_tables(plan, records, base["scores"])
    strategy_choice = fair_strategy_choice(plan["fair-strategy"], records, base) if "fair-strategy" in plan else None
    if strategy_choice:
        tables["fair-strategy-chosen"] = chosen_strategy_rows(plan["fair-strategy"], strategy_choice, records,
                                                              base["scores"])
    subset = {row["label"]: row for row in tables.get("subset", [])}
    return {
        "settings": {**asdict(config), "quick": quick, "ablations": list(plan)},
        "seeds": seeds, "depth": _depth(config.model),
        "base": base,
        "tables": tables,
        "retrieved_vs_random": gain_in_seed_std(subset["retrieved"], subset["random"])
        if {"retrieved", "random"} <= set(subset) else None,
        "schedule_choice": choose_schedule(plan["schedule"], records, base["val_scores"])
        if "schedule" in plan else None,
        "strategy_choice": strategy_choice,
        "runs": list(records.values()), "runs_done": len(records), "runs_planned": planned,
        "run_seconds": round(sum(r["seconds"]["train"] + r["seconds"]["eval"] for r in records.values()), 1),
        "stages": clock.seconds, "seconds": round(time.time() - started, 1), "versions": versions(),
    }
