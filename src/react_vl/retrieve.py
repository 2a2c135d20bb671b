"""Retrieve stage: the knowledge-base pairs most relevant to a task, found by its class-name prompts.

    summary = retrieve("KB", "imagenet-1k", "R", mode="both", k=100)

Every class name filled into every task template is one text query, encoded with the KB's own
model (REACT never looks at the task's images). Queries search the caption index (t2t), the
image index (t2i) or both; hits are merged by id, remembering which classes, queries and modes
found each pair and their best scores. Then, each counted in R/summary.json: pairs whose image
and caption disagree (CLIP score below a threshold) and near-duplicates of evaluation images
are removed, near-duplicate images among the results keep only their best-scored copy, and
`per_class` keeps each class's best pairs (t2t and t2i hits taken in turn by rank, as their
scores are not comparable). R/retrieved.parquet holds the result with the KB
metadata columns (id, key, caption, shard, ...), which the materialize stage reads.
"""

import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from .index import load_index, read_rows
from .kb import KnowledgeBase
from .models import load_model
from .tasks import Task, get_task
from .utils import atomic_path, write_json

MODES = {"t2t": "text", "t2i": "image"}  # mode -> index searched
DEDUP_THRESHOLD = 0.94       # clip-retrieval's near-duplicate cosine
EVAL_OVERLAP_THRESHOLD = 0.95  # the paper's train/eval near-duplicate cosine


def encode_queries(kb: KnowledgeBase, task: Task, model: str | None = None, batch_size: int = 256):
    """(prompts, class index per prompt, L2-normalised text embeddings) with the KB's own model.

    A `model` other than the KB's, or an embedding size other than the KB's, is refused: the
    queries would live in another embedding space and retrieve noise.
    """
    kb_model, pretrained = kb.info.get("model"), kb.info.get("pretrained")
    if not kb_model:
        raise ValueError(f"{kb.path}/kb.json records no model; the queries must use the model that embedded "
                         f"the KB (re-embed with `react-vl embed`, or write kb.json with model and pretrained)")
    if model is not None and model != kb_model:
        raise ValueError(f"model {model!r} differs from the model that embedded {kb.path} ({kb_model!r}); "
                         f"queries must be encoded with the KB's model")
    torch.manual_seed(0)  # as embed does: a randomly initialised model must be the one that embedded the KB
    clip, _, tokenizer = load_model(kb_model, pretrained)
    prompts = [prompt for name in task.classnames for prompt in task.prompts(name)]
    classes = np.repeat(np.arange(len(task.classnames)), len(task.templates))
    with torch.inference_mode():
        emb = torch.cat([F.normalize(clip.encode_text(tokenizer(prompts[i:i + batch_size])).float(), dim=-1)
                         for i in range(0, len(prompts), batch_size)]).numpy()
    if emb.shape[1] != kb.dim:
        raise ValueError(f"query embeddings have dimension {emb.shape[1]} but {kb.path} holds dimension "
                         f"{kb.dim}: the KB was embedded with another model than {kb_model}/{pretrained}")
    return prompts, classes, emb


def search_hits(kb: KnowledgeBase, mode: str, queries: np.ndarray, k: int) -> pa.Table:
    """One row per (query, hit): query index, id, score, mode."""
    index = load_index(kb, MODES[mode])
    if index.d != queries.shape[1]:
        raise ValueError(f"{MODES[mode]}.index has dimension {index.d}, the queries {queries.shape[1]}")
    scores, ids = index.search(queries, k)
    query = np.repeat(np.arange(len(queries)), k)
    found = ids.ravel() >= 0  # FAISS pads with -1 when fewer than k are found
    return pa.table({"query": query[found], "id": ids.ravel()[found], "score": scores.ravel()[found],
                     "mode": pa.array([mode] * int(found.sum()))})


def rows_of(kb_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions in KB order of the given ids."""
    order = np.argsort(kb_ids)
    return order[np.searchsorted(kb_ids, ids, sorter=order)]


def near_duplicate_mask(emb: np.ndarray, threshold: float) -> np.ndarray:
    """True for rows (ordered best first) whose image is within `threshold` cosine of a better kept row.

    Exact range search for small sets; above 20k rows an IVF index over the rows, probing
    enough cells that pairs this close are found (they almost always share a cell).
    """
    n, dim = emb.shape
    if n > 20_000:
        nlist = int(np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = 8
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(emb)
    lims, _, neighbours = index.range_search(emb, threshold)
    removed = np.zeros(n, dtype=bool)
    for row in range(n):
        if not removed[row]:
            close = neighbours[lims[row]:lims[row + 1]]
            removed[close[close > row]] = True
    return removed


def eval_embeddings(eval_set: str | Path, kb: KnowledgeBase) -> np.ndarray:
    """Image embeddings of an evaluation set: a .npy file, or a webdataset folder embedded with the KB's model."""
    path = Path(eval_set)
    if path.suffix == ".npy":
        emb = np.load(path).astype(np.float32)
    else:
        from .embed import embed_corpus
        with tempfile.TemporaryDirectory() as tmp:
            precision = {"bfloat16": "bf16", "float16": "fp16"}.get(kb.info.get("autocast"), "fp32")  # as the KB's
            embed_corpus(str(path), kb.info["model"], kb.info.get("pretrained"), tmp, dtype="float32",
                         precision=precision, workers=0, progress=False)
            emb = np.array(KnowledgeBase(tmp).image_embeddings(), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != kb.dim:
        raise ValueError(f"evaluation embeddings {path} have shape {emb.shape}; the KB's dimension is {kb.dim}")
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def retrieve(kb_path: str | Path, task: str | Task, out: str | Path, mode: str = "both", k: int | None = None,
             per_class: int | None = None, model: str | None = None, dedup_threshold: float | None = DEDUP_THRESHOLD,
             min_clip_score: float | None = None, eval_set: str | Path | None = None,
             eval_threshold: float = EVAL_OVERLAP_THRESHOLD) -> dict:
    """Retrieve pairs for `task` from the KB into out/retrieved.parquet; return the summary (out/summary.json).

    k: hits per query (default: per_class, else 100). per_class: keep each class's best pairs.
    dedup_threshold: image cosine above which results count as the same image (None: off).
    min_clip_score: drop pairs whose image-caption cosine is below it. eval_set: a .npy of
    evaluation image embeddings or an evaluation webdataset folder; results within
    `eval_threshold` cosine of any of its images are dropped.
    """
    started = time.time()
    modes = list(MODES) if mode == "both" else [mode]
    if mode != "both" and mode not in MODES:
        raise ValueError(f"mode must be t2t, t2i or both, got {mode!r}")
    k = k or per_class or 100
    kb = KnowledgeBase(kb_path)
    task = task if isinstance(task, Task) else get_task(task)
    prompts, query_class, queries = encode_queries(kb, task, model)

    hits = pa.concat_tables([search_hits(kb, m, queries, k) for m in modes])
    hits = hits.append_column("class", pa.array(query_class[hits.column("query").to_numpy()]))
    by_mode = {m: set(pc.filter(hits, pc.equal(hits.column("mode"), m)).column("id").to_pylist()) for m in modes}

    pairs = hits.group_by("id").aggregate([("score", "max"), ("class", "distinct"), ("query", "distinct"),
                                           ("mode", "distinct")]).sort_by([("score_max", "descending")])
    ids = pairs.column("id").to_numpy()
    kb_ids = kb.ids()
    rows = rows_of(kb_ids, ids)
    removed = {}
    keep = np.ones(len(ids), dtype=bool)
    if min_clip_score is not None:
        clip_score = np.einsum("ij,ij->i", read_rows(kb, "image", rows), read_rows(kb, "text", rows))
        drop = clip_score < min_clip_score
        removed["clip_score"] = int(drop.sum())
        keep &= ~drop
    if eval_set is not None:
        index = faiss.IndexFlatIP(kb.dim)
        index.add(eval_embeddings(eval_set, kb))
        nearest, _ = index.search(read_rows(kb, "image", rows[keep]), 1)
        drop = np.zeros(len(ids), dtype=bool)
        drop[np.flatnonzero(keep)[nearest[:, 0] >= eval_threshold]] = True
        removed["eval_overlap"] = int(drop.sum())
        keep &= ~drop
    if dedup_threshold is not None:
        drop = np.zeros(len(ids), dtype=bool)
        drop[np.flatnonzero(keep)[near_duplicate_mask(read_rows(kb, "image", rows[keep]), dedup_threshold)]] = True
        removed["near_duplicate"] = int(drop.sum())
        keep &= ~drop
    pairs, rows = pairs.filter(pa.array(keep)), rows[keep]
    if per_class is not None:
        pairs, rows = cap_per_class(pairs, rows, hits, per_class)

    table = write_retrieved(kb, pairs, rows, hits, task, prompts, Path(out))
    per_class_counts = {name: 0 for name in task.classnames}
    for classes in table.column("classes").to_pylist():
        for name in classes:
            per_class_counts[name] += 1
    summary = {
        "task": task.name, "kb": str(kb.path), "model": kb.info.get("model"), "pretrained": kb.info.get("pretrained"),
        "mode": mode, "k": k, "per_class": per_class, "queries": len(prompts), "hits": hits.num_rows,
        "unique_candidates": len(ids), "retrieved": table.num_rows,
        "by_mode": {m: len(found) for m, found in by_mode.items()},
        "t2t_t2i_overlap": len(by_mode["t2t"] & by_mode["t2i"]) if mode == "both" else None,
        "removed": removed, "thresholds": {"dedup": dedup_threshold, "min_clip_score": min_clip_score,
                                           "eval_overlap": eval_threshold if eval_set else None},
        "per_class_counts": per_class_counts, "seconds": time.time() - started,
    }
    write_json(summary, Path(out) / "summary.json")
    return summary


def cap_per_class(pairs: pa.Table, rows: np.ndarray, hits: pa.Table, per_class: int):
    """Keep, for each class, its `per_class` best pairs; a pair stays listed only under classes that kept it.

    With both modes, each mode's hits are taken in turn by rank (1st t2t, 1st t2i, 2nd t2t, ...):
    their scores are not comparable, text-text cosines run far above image-text ones, so sorting
    by score would fill every class from t2t alone.
    """
    best = (hits.filter(pc.is_in(hits.column("id"), pa.array(pairs.column("id"))))
            .group_by(["class", "mode", "id"]).aggregate([("score", "max")]))
    klass, ids = best.column("class").to_numpy(), best.column("id").to_numpy()
    mode = pc.index_in(best.column("mode"), pa.array(list(MODES))).to_numpy()
    order = np.lexsort((-best.column("score_max").to_numpy(), mode, klass))
    group = (klass * len(MODES) + mode)[order]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.searchsorted(group, group)  # rank within (class, mode)
    order = np.lexsort((mode, rank, klass))  # per class: rank 0 of each mode, then rank 1, ...
    klass, ids = klass[order], ids[order]
    _, first = np.unique(np.stack([klass, ids]), axis=1, return_index=True)  # a pair once per class
    first = np.sort(first)
    klass, ids = klass[first], ids[first]
    position = np.arange(len(klass)) - np.searchsorted(klass, klass)
    top = pa.table({"class": klass[position < per_class], "id": ids[position < per_class]})
    classes = top.group_by("id").aggregate([("class", "distinct")])
    kept = pc.is_in(pairs.column("id"), classes.column("id")).to_numpy(zero_copy_only=False)
    pairs, rows = pairs.filter(pa.array(kept)), rows[kept]
    position = pc.index_in(pairs.column("id"), classes.column("id"))
    column = pairs.schema.get_field_index("class_distinct")
    return pairs.set_column(column, "class_distinct", classes.column("class_distinct").take(position)), rows


def write_retrieved(kb: KnowledgeBase, pairs: pa.Table, rows: np.ndarray, hits: pa.Table, task: Task,
                    prompts: list[str], out: Path) -> pa.Table:
    """Join the retrieved pairs with their KB metadata and write out/retrieved.parquet atomically."""
    classnames, prompt_array = np.array(task.classnames, dtype=object), np.array(prompts, dtype=object)
    columns = {
        "score": pairs.column("score_max"),
        "classes": [sorted(classnames[c].tolist()) for c in pairs.column("class_distinct").to_pylist()],
        "queries": [sorted(prompt_array[q].tolist()) for q in pairs.column("query_distinct").to_pylist()],
        "modes": [sorted(m) for m in pairs.column("mode_distinct").to_pylist()],
    }
    mode_scores = hits.group_by(["id", "mode"]).aggregate([("score", "max")])
    for mode in MODES:
        best = mode_scores.filter(pc.equal(mode_scores.column("mode"), mode))
        position = pc.index_in(pairs.column("id"), best.column("id"))
        columns[f"score_{mode}"] = pc.take(best.column("score_max"), position)
    metadata = kb.metadata().take(pa.array(rows))
    table = metadata
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values) if isinstance(values, list) else values)
    with atomic_path(out / "retrieved.parquet") as tmp:
        pq.write_table(table, tmp)
    return table
