"""Curation of a retrieved set: per-class views, report cards, and the pairs a person rejected.

    cards = report_cards("KB", "R")                # plain data, one card per class
    view = class_pairs("R", "circle")               # the class's pairs, ranked, and its noise
    record_decisions("R", [id1, id2], "reject", who="ana")   # R/curation.json, atomically
    rejected_ids("R")                               # {id1, id2}: materialize leaves them out

R/curation.json holds the latest decision per pair id (`reject` or `accept`, with who and
when) and a log of every action. `react-vl serve KB --retrieved R` shows the views and cards
and writes the decisions; `materialize` drops the rejected pairs.

For lineage, `fingerprint(R)` is what a customized checkpoint records of the set and its
curation (the sha256 of both files; materialize puts it in SHARDS/summary.json, train copies it
into model.pt), `sets_holding(ids, sets)` lists, for a takedown list of pair ids, which retrieved
sets hold them, and `runs_using(ids, find_runs(["runs/"]), sets, ...)` which training runs used them.

A report card summarises one class of R/retrieved.parquet: how many pairs, how many both
modes found (t2t and t2i), a histogram of each mode's scores, how close the class's prompt
embedding is to another class's (above COLLAPSE_COSINE the queries barely tell the two apart),
the estimated precision (the share of its pairs whose KB image embedding the base's zero-shot
classifier, the KB model's class prompts, assigns to the class), and the classes whose
retrieved sets share the most pairs with it. The retrieved file is read batch by batch, so
memory is bounded by the classes, not by the pairs.
"""

import fcntl
import getpass
import hashlib
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .utils import read_json, write_json

CURATION_FILE = "curation.json"
DECISIONS = ("reject", "accept")
COLLAPSE_COSINE = 0.9   # class prompt embeddings closer than this to another class's: a warning
HISTOGRAM_BINS = 20
NOISE = 12              # lowest-scored pairs shown per class
OVERLAPPING = 3         # classes listed per card as sharing the most pairs
BATCH = 65_536          # retrieved rows read at a time
MODES = ("t2t", "t2i")


def retrieved_file(retrieved_dir: str | Path) -> Path:
    path = Path(retrieved_dir) / "retrieved.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make it with `react-vl retrieve KB --task T --out "
                                f"{retrieved_dir}`")
    return path


# --- decisions ---------------------------------------------------------------------------------
def load_curation(retrieved_dir: str | Path) -> dict:
    """R/curation.json ({"decisions": {id: {decision, who, when, ...}}, "log": [...]}); empty when absent."""
    path = Path(retrieved_dir) / CURATION_FILE
    if not path.exists():
        return {"decisions": {}, "log": []}
    curation = read_json(path)
    if not isinstance(curation, dict) or not isinstance(curation.get("decisions"), dict):
        raise ValueError(f"{path} is not a curation file (no 'decisions' object); move it away to start over")
    return curation


@contextmanager
def _locked(retrieved_dir: Path):
    """An exclusive lock on R/.curation.lock, so two writers never lose each other's decisions."""
    with open(retrieved_dir / f".{CURATION_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_decisions(retrieved_dir: str | Path, ids, decision: str, who: str | None = None,
                     scope: dict | None = None) -> dict:
    """Set `decision` (reject / accept) for the pair ids, with who and when; log the action.

    scope: what the person acted on (e.g. {"class": "circle", "query": "a photo of a circle."}),
    kept in the log. Returns the action logged.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    retrieved_dir = Path(retrieved_dir)
    ids = sorted({int(i) for i in ids})
    action = {"decision": decision, "who": who or getpass.getuser(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pairs": len(ids), **(scope or {})}
    with _locked(retrieved_dir):
        curation = load_curation(retrieved_dir)
        for pair in ids:
            curation["decisions"][str(pair)] = {k: action[k] for k in ("decision", "who", "when")}
        curation["log"].append(action)
        write_json(curation, retrieved_dir / CURATION_FILE)
    return action


def rejected_ids(retrieved_dir: str | Path) -> set[int]:
    """The ids whose latest decision in R/curation.json is `reject` (empty when there is no file)."""
    return {int(pair) for pair, d in load_curation(retrieved_dir)["decisions"].items() if d["decision"] == "reject"}


# --- lineage --------------------------------------------------------------------------------------
def fingerprint(retrieved: str | Path) -> dict:
    """sha256 of R/retrieved.parquet (or of the retrieved parquet given) and of R/curation.json
    (None when there is none): what a customized checkpoint records so that the pairs it was
    trained on can be traced."""
    def sha256(path: Path) -> str | None:
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        return digest.hexdigest()

    path = Path(retrieved)
    folder = path if path.is_dir() else path.parent
    return {"retrieved_sha256": sha256(retrieved_file(folder) if path.is_dir() else path),
            "curation_sha256": sha256(folder / CURATION_FILE)}


def sets_holding(ids, retrieved_dirs: dict[str, Path]) -> dict[str, list[dict]]:
    """For a takedown list: {set name: [{id, classes, queries, decision}]} of the given pair ids
    that each retrieved set holds (sets holding none are left out)."""
    wanted = pa.array(sorted({int(i) for i in ids}), pa.int64())
    found = {}
    for name, folder in retrieved_dirs.items():
        decisions = load_curation(folder)["decisions"]
        rows = []
        for batch in _batches(retrieved_file(folder), ["id", "classes", "queries"]):
            rows += batch.filter(pc.is_in(batch.column("id"), value_set=wanted)).to_pylist()
        for row in rows:
            row["decision"] = decisions.get(str(row["id"]), {}).get("decision")
        if rows:
            found[name] = rows
    return found


STANDINGS = ("unchanged", "curation changed", "set changed")  # a run's retrieved set now, best match first


def find_runs(folders) -> dict[str, dict]:
    """The training runs in `folders`, each a run folder (RUN/model.pt, as customize writes it) or a
    folder holding run folders at any depth: {name: {"path", "lineage"}}, named by their path
    below the folder given (a run folder given: its own name). lineage is the record train
    stores in model.pt's metadata (None for a checkpoint without one)."""
    from .models import read_checkpoint_meta

    runs = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"--runs {folder}: no such folder (give a run folder, the --out of `react-vl "
                                    f"customize`, or a folder of them)")
        found = [folder] if (folder / "model.pt").is_file() else sorted({p.parent for p in folder.rglob("model.pt")})
        if not found:
            raise FileNotFoundError(f"--runs {folder}: no run in it (no model.pt, which `react-vl customize` writes)")
        for run in found:
            name = run.name if run == folder else str(run.relative_to(folder))
            name = str(run) if name in runs else name
            try:
                lineage = read_checkpoint_meta(run / "model.pt").get("lineage")
            except Exception as err:  # noqa: BLE001 - torch.load raises many kinds on a broken file
                raise ValueError(f"{run / 'model.pt'} is not a readable checkpoint ({err})") from err
            runs[name] = {"path": str(run), "lineage": lineage}
    return runs


def standing(entry: dict, sets: dict[str, Path], fingerprints: dict[str, dict]) -> tuple[str, str] | None:
    """(served set, how it stands) for one lineage entry of a run: the set whose retrieved file is
    the one recorded ("unchanged", or "curation changed" when R/curation.json differs), else the
    set in the folder recorded ("set changed": other pairs were retrieved since); None when no
    served set is either."""
    if entry.get("retrieved") is None:
        return None
    recorded, best = entry.get("fingerprint") or {}, None
    for name, folder in sets.items():
        now = fingerprints[name]
        same_folder = Path(entry["retrieved"]) == Path(folder).resolve()
        if recorded.get("retrieved_sha256") == now["retrieved_sha256"]:
            state = "unchanged" if recorded.get("curation_sha256") == now["curation_sha256"] else "curation changed"
        elif same_folder:
            state = "set changed"
        else:
            continue
        rank = (STANDINGS.index(state), not same_folder)
        if best is None or rank < best[0]:
            best = (rank, name, state)
    return best[1:] if best else None


def runs_using(ids, runs: dict[str, dict], sets: dict[str, Path], fingerprints: dict[str, dict]) -> dict:
    """For pair ids (one, or a takedown list): the served sets holding them and the runs trained on
    those sets. Returns {"sets": sets_holding(ids, sets), "runs": [{"run", "path", "shards", "set",
    "standing", "used", "possibly", "rejected"}], "untraced": [{"run", "shards", "retrieved", "why"}]}.

    Per run and shard set: `used`, the ids the set holds and its curation did not reject (the set
    and its curation are as they were when the shards were materialized); `possibly`, the ids the
    set holds when it or its curation changed since; `rejected`, those left out by the curation.
    Runs whose sets hold none of the ids are left out; `untraced` lists the shard sets that cannot
    be checked (no retrieved set recorded, or one not served)."""
    held = sets_holding(ids, sets)
    found, untraced = [], []
    for run, record in runs.items():
        for entry in record["lineage"] or [{"shards": None, "retrieved": None}]:
            match = standing(entry, sets, fingerprints)
            if match is None:
                why = "no lineage record" if record["lineage"] is None else \
                    "shards not materialized from a retrieved set" if entry.get("retrieved") is None else \
                    "its retrieved set is not served (add it with --retrieved)"
                untraced.append({"run": run, "shards": entry.get("shards"), "retrieved": entry.get("retrieved"),
                                 "why": why})
                continue
            rows = held.get(match[0], [])
            if not rows:
                continue
            known = match[1] == "unchanged"
            found.append({"run": run, "path": record["path"], "shards": entry["shards"], "set": match[0],
                          "standing": match[1],
                          "used": [r["id"] for r in rows if known and r["decision"] != "reject"],
                          "possibly": [r["id"] for r in rows if not known],
                          "rejected": [r["id"] for r in rows if known and r["decision"] == "reject"]})
    return {"sets": held, "runs": found, "untraced": untraced}


# --- reading the retrieved set -------------------------------------------------------------------
def _batches(path: Path, wanted: list[str]):
    """Record batches of the wanted columns that the file has."""
    parquet = pq.ParquetFile(path)
    columns = [c for c in wanted if c in parquet.schema_arrow.names]
    yield from parquet.iter_batches(batch_size=BATCH, columns=columns)


def _mode_scores(batch: pa.RecordBatch) -> dict:
    """{mode: float array, NaN where the mode did not find the pair}, for the modes present; from
    `score` and `modes` for files without per-mode scores."""
    names, scores = batch.schema.names, {}
    for mode in MODES:
        if f"score_{mode}" in names:
            scores[mode] = batch.column(f"score_{mode}").to_numpy(zero_copy_only=False).astype(np.float64)
        elif "score" in names and "modes" in names:
            found = _has_value(batch.column("modes"), mode)
            scores[mode] = np.where(found, batch.column("score").to_numpy(zero_copy_only=False), np.nan)
    return scores


def _has_value(lists: pa.Array, value: str) -> np.ndarray:
    """Per row of a list<string> column: whether `value` is among its items."""
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy()
    out = np.zeros(len(lists), dtype=bool)
    out[parents[pc.equal(flat, value).to_numpy(zero_copy_only=False)]] = True
    return out


def _task_of(retrieved_dir: Path):
    """The Task named in R/summary.json, or None (a custom task file that moved, a hand-made set)."""
    from .tasks import get_task

    summary = Path(retrieved_dir) / "summary.json"
    try:
        return get_task(read_json(summary)["task"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None


def class_names(retrieved_dir: str | Path) -> list[str]:
    """The task's class names (R/summary.json), then any other the retrieved file names, in order met."""
    task = _task_of(Path(retrieved_dir))
    seen = dict.fromkeys(task.classnames if task is not None else [])
    for batch in _batches(retrieved_file(retrieved_dir), ["classes"]):
        seen.update(dict.fromkeys(pc.unique(pc.list_flatten(batch.column("classes"))).to_pylist()))
    return list(seen)


# --- one class's pairs ----------------------------------------------------------------------------
def _class_rows(retrieved_dir: Path, classname: str) -> tuple[list[dict], dict]:
    """Every pair retrieved for the class (as dicts) and {mode: its scores}, file order."""
    rows, scores = [], {mode: [] for mode in MODES}
    wanted = ["id", "caption", "classes", "queries", "modes", "score", "score_t2t", "score_t2i"]
    for batch in _batches(retrieved_file(retrieved_dir), wanted):
        mine = _has_value(batch.column("classes"), classname)
        if mine.any():
            picked = batch.filter(pa.array(mine))
            rows += picked.select([c for c in ("id", "caption", "queries", "modes") if c in picked.schema.names]
                                  ).to_pylist()
            found = _mode_scores(picked)
            for mode in MODES:
                scores[mode].append(found.get(mode, np.full(picked.num_rows, np.nan)))
    return rows, {m: np.concatenate(s) if s else np.zeros(0) for m, s in scores.items()}


def class_pairs(retrieved_dir: str | Path, classname: str, limit: int = 200, noise: int = NOISE) -> dict:
    """The pairs retrieved for one class, best first, with the rank and score each mode gave them,
    the queries (the class's prompts) that found them and their curation decision; the last
    `noise` of them (the lowest-ranked: the likeliest noise) apart; the class's queries with counts.

    Pairs are ordered as retrieve takes them: by their best rank over the modes, then score
    (t2t and t2i scores are not comparable, ranks are).
    """
    retrieved_dir = Path(retrieved_dir)
    task = _task_of(retrieved_dir)
    own = set(task.prompts(classname)) if task is not None else None
    rows, scores = _class_rows(retrieved_dir, classname)
    ranks = {}
    for mode, s in scores.items():
        order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
        ranks[mode] = np.empty(len(s), dtype=np.int64)
        ranks[mode][order] = np.arange(1, len(s) + 1)
        ranks[mode] = np.where(np.isnan(s), np.iinfo(np.int64).max, ranks[mode])
    best_rank = np.minimum.reduce([ranks[m] for m in MODES]) if rows else np.zeros(0, np.int64)
    best_score = np.fmax.reduce([scores[m] for m in MODES]) if rows else np.zeros(0)
    order = np.lexsort((-np.nan_to_num(best_score, nan=-np.inf), best_rank))
    decisions = load_curation(retrieved_dir)["decisions"]
    queries = {}
    out = []
    for i in order.tolist():
        row = rows[i]
        row["queries"] = [q for q in row.get("queries") or [] if own is None or q in own]
        for query in row["queries"]:
            queries[query] = queries.get(query, 0) + 1
        row["scores"] = {m: float(scores[m][i]) for m in MODES if not np.isnan(scores[m][i])}
        row["ranks"] = {m: int(ranks[m][i]) for m in row["scores"]}
        row["score"] = max(row["scores"].values()) if row["scores"] else None
        row["decision"] = decisions.get(str(row["id"]), {}).get("decision")
        out.append(row)
    return {"class": classname, "count": len(out), "pairs": out[:limit], "noise": out[-noise:] if noise else [],
            "queries": [{"query": q, "pairs": n} for q, n in sorted(queries.items(), key=lambda x: -x[1])],
            "rejected": sum(r["decision"] == "reject" for r in out)}


def query_ids(retrieved_dir: str | Path, classname: str, query: str) -> list[int]:
    """The ids of the class's pairs that `query` found (for a decision on a whole query's results)."""
    rows, _ = _class_rows(Path(retrieved_dir), classname)
    return [row["id"] for row in rows if query in (row.get("queries") or [])]


# --- report cards -------------------------------------------------------------------------------
def _zero_shot_classifier(kb, task) -> np.ndarray:
    """One L2-normalised text embedding per class: the mean of its prompts' embeddings, with the
    KB's own model (the base's zero-shot classifier)."""
    from .retrieve import encode_queries

    _, query_class, emb = encode_queries(kb, task)
    means = np.stack([emb[query_class == c].mean(0) for c in range(len(task.classnames))])
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def _score_ranges(path: Path) -> dict:
    """{mode: (lowest, highest) score} over the file, for the histograms' shared bin edges."""
    ranges = {}
    for batch in _batches(path, ["score", "modes", "score_t2t", "score_t2i"]):
        for mode, s in _mode_scores(batch).items():
            if not np.isnan(s).all():
                lo, hi = ranges.get(mode, (np.inf, -np.inf))
                ranges[mode] = (min(lo, float(np.nanmin(s))), max(hi, float(np.nanmax(s))))
    return ranges


class _Tally:
    """Per-class counts accumulated batch by batch (the card's numbers before they are shares)."""

    def __init__(self, n_classes: int, ranges: dict, bins: int):
        self.n, self.ranges, self.bins = n_classes, ranges, bins
        self.count = np.zeros(n_classes, np.int64)
        self.agree = np.zeros(n_classes, np.int64)
        self.by_mode = {m: np.zeros(n_classes, np.int64) for m in ranges}
        self.both = np.zeros(n_classes, np.int64)
        self.histogram = {m: np.zeros((n_classes, bins), np.int64) for m in ranges}
        self.shared = {}  # class a * n + class b -> pairs both retrieved

    def add(self, batch: pa.RecordBatch, index: dict, predicted: np.ndarray | None):
        classes = batch.column("classes")
        parent = pc.list_parent_indices(classes).to_numpy()
        klass = np.array([index[name] for name in pc.list_flatten(classes).to_pylist()], dtype=np.int64)
        self.count += np.bincount(klass, minlength=self.n)
        found_all = np.ones(len(klass), dtype=bool)
        for mode, s in _mode_scores(batch).items():
            if mode not in self.ranges:
                continue
            found = ~np.isnan(s[parent])
            found_all &= found
            self.by_mode[mode] += np.bincount(klass[found], minlength=self.n)
            lo, hi = self.ranges[mode]
            bin_of = np.clip(((s[parent][found] - lo) / max(hi - lo, 1e-12) * self.bins).astype(np.int64), 0,
                             self.bins - 1)
            np.add.at(self.histogram[mode], (klass[found], bin_of), 1)
        if len(self.ranges) == len(MODES):
            self.both += np.bincount(klass[found_all], minlength=self.n)
        if predicted is not None:
            self.agree += np.bincount(klass[predicted[parent] == klass], minlength=self.n)
        self._add_shared(classes.offsets.to_numpy(), klass)

    def _add_shared(self, offsets: np.ndarray, klass: np.ndarray):
        lengths = np.diff(offsets)
        for k in np.unique(lengths[lengths >= 2]).tolist():  # rows kept by k classes: their k x k pairs
            members = klass[offsets[:-1][lengths == k][:, None] + np.arange(k)]
            a, b = np.meshgrid(np.arange(k), np.arange(k))
            keys = (members[:, a[a != b]] * self.n + members[:, b[a != b]]).ravel()
            for key, n in zip(*np.unique(keys, return_counts=True)):
                self.shared[int(key)] = self.shared.get(int(key), 0) + int(n)


def report_cards(kb, retrieved_dir: str | Path, bins: int = HISTOGRAM_BINS) -> dict:
    """One card per class of R/retrieved.parquet, as plain data (see the module docstring):

        {"task", "bin_edges": {mode: [...]}, "collapse_cosine", "notes": [...], "cards": [{"class",
         "count", "by_mode": {mode: n}, "both_modes", "overlap", "histogram": {mode: [...]},
         "prompt_cosine", "nearest_class", "collapse", "precision", "overlapping": [{"class",
         "shared", "share"}]}]}

    kb: the KnowledgeBase (or its path) the set was retrieved from; its model is the base whose
    zero-shot classifier estimates precision. Precision and prompt cosines are None when
    R/summary.json names no task this installation knows (the class prompts are then unknown).
    """
    from .kb import KnowledgeBase

    kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
    retrieved_dir = Path(retrieved_dir)
    path, task, names = retrieved_file(retrieved_dir), _task_of(retrieved_dir), class_names(retrieved_dir)
    index = {name: i for i, name in enumerate(names)}
    notes, classifier = [], None
    if task is None:
        notes.append(f"{retrieved_dir}/summary.json names no known task: no prompt cosines or precision")
    else:
        classifier = _zero_shot_classifier(kb, task)
    ranges = _score_ranges(path)
    tally = _Tally(len(names), ranges, bins)
    for batch in _batches(path, ["id", "classes", "modes", "score", "score_t2t", "score_t2i"]):
        predicted = None
        if classifier is not None:
            images = kb.embeddings_of("img_emb", batch.column("id").to_numpy()).astype(np.float32)
            predicted = np.argmax(images @ classifier.T, axis=1)
        tally.add(batch, index, predicted)
    cosine = classifier @ classifier.T if classifier is not None else None
    if cosine is not None:
        np.fill_diagonal(cosine, -np.inf)
    cards = [_card(c, names, tally, cosine) for c in range(len(names))]
    return {"task": task.name if task else None, "collapse_cosine": COLLAPSE_COSINE, "notes": notes,
            "bin_edges": {m: np.linspace(lo, hi, bins + 1).round(4).tolist() for m, (lo, hi) in ranges.items()},
            "cards": cards}


def _card(c: int, names: list[str], tally: _Tally, cosine: np.ndarray | None) -> dict:
    count = int(tally.count[c])
    shared = sorted(((n, other) for other in range(tally.n) if other != c
                     and (n := tally.shared.get(c * tally.n + other, 0))), reverse=True)[:OVERLAPPING]
    nearest = int(np.argmax(cosine[c])) if cosine is not None and tally.n > 1 else None
    prompt_cosine = float(cosine[c, nearest]) if nearest is not None else None
    return {
        "class": names[c], "count": count, "by_mode": {m: int(v[c]) for m, v in tally.by_mode.items()},
        "both_modes": int(tally.both[c]) if len(tally.by_mode) == len(MODES) else None,
        "overlap": round(tally.both[c] / count, 4) if count and len(tally.by_mode) == len(MODES) else None,
        "histogram": {m: h[c].tolist() for m, h in tally.histogram.items()},
        "prompt_cosine": round(prompt_cosine, 4) if prompt_cosine is not None else None,
        "nearest_class": names[nearest] if nearest is not None else None,
        "collapse": prompt_cosine is not None and prompt_cosine > COLLAPSE_COSINE,
        "precision": round(tally.agree[c] / count, 4) if count and cosine is not None else None,
        "overlapping": [{"class": names[o], "shared": n, "share": round(n / count, 4)} for n, o in shared],
    }
