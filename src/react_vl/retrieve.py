"""Retrieve stage: the knowledge-base pairs most relevant to a task, found by its class-name prompts.

    summary = retrieve("KB", "imagenet-1k", "R", mode="both", per_class=10_000)
    torchrun --nproc_per_node 8 -m react_vl.cli retrieve KB --task imagenet-1k --out R --per-class 10000

Every class name filled into every task template is one text query, encoded with the KB's own
model (REACT never looks at the task's images). Queries search the caption index (t2t), the
image index (t2i) or both, at the k retrieve asks for (an index tuned for a smaller k is
re-tuned for it on a sample of the task's queries). Memory is bounded by the results, not by
the hits: classes are searched a chunk at a time and each chunk's top-k arrays are cut at once
to each class's best `per_class` pairs plus a margin (t2t and t2i hits taken in turn by rank,
as their scores are not comparable); the chunk's kept pairs go to R/parts/ (one file per chunk,
so a crashed run resumes where it stopped). Under torchrun each rank takes every N-th chunk.
Rank 0 then merges the chunks and, each counted in R/summary.json, removes pairs whose image
and caption disagree (CLIP score below a threshold), near-duplicates of evaluation images and
near-duplicate images among the kept pairs (the best-scored copy stays), before cutting each
class to `per_class`. R/retrieved.parquet holds the result, one row group per KB part, with the
KB metadata columns (id, key, caption, shard, ...) read for the kept ids only, and the
provenance: classes, queries and modes that kept each pair, its best score and its best score
per mode. The materialize stage reads it.
"""

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .distributed import init_distributed
from .index import exact_top_k, load_index, read_rows, tune
from .kb import KnowledgeBase, make_ids
from .models import load_model
from .tasks import Task, get_task
from .utils import atomic_path, read_json, write_json

MODES = {"t2t": "text", "t2i": "image"}  # mode -> index searched (mode number = position here)
DEDUP_THRESHOLD = 0.94       # clip-retrieval's near-duplicate cosine
EVAL_OVERLAP_THRESHOLD = 0.95  # the paper's train/eval near-duplicate cosine
OVERFETCH = 0.25             # share of per_class kept beyond it per class, so the filters leave per_class
HITS_PER_CHUNK = 4_000_000   # hits searched and held at a time (query x k x mode)
BATCH = 16_384               # kept pairs whose embeddings are read (and deduplicated) at a time
EXACT_DEDUP_MAX = 20_000     # up to this many kept pairs, near-duplicates are found by exact search
DEDUP_CELL, DEDUP_NPROBE = 256, 4  # above it: IVF cells of ~256 kept pairs, 4 probed per pair
GPU_NEIGHBOURS = 64          # GPU FAISS has no range search: this many nearest, cut at the threshold
RETUNE_QUERIES = 64          # task queries an index is re-tuned on when built for a smaller k


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


# --- the KB, part by part ------------------------------------------------------------------------
def locate(kb: KnowledgeBase, ids: np.ndarray) -> np.ndarray:
    """Positions in KB order of the given ids, found part by part; ValueError names ids not in the KB."""
    rows = np.full(len(ids), -1, dtype=np.int64)
    order = np.argsort(ids)
    wanted = ids[order]
    start = 0
    for part in kb.parts:
        mine = kb.part_ids(part)
        at = np.searchsorted(wanted, mine)
        hit = at < len(wanted)
        hit[hit] = wanted[at[hit]] == mine[hit]
        rows[order[at[hit]]] = start + np.flatnonzero(hit)
        start += len(mine)
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} retrieved ids are not in {kb.path} (e.g. {ids[rows < 0][:3]}): "
                         f"the index was built for another KB; rebuild it with `react-vl index {kb.path}`")
    return rows


def batched_rows(kb: KnowledgeBase, kind: str, rows: np.ndarray):
    """(start, float32 embeddings) of `rows` in batches of BATCH, read from the memory-mapped parts."""
    for lo in range(0, len(rows), BATCH):
        yield lo, read_rows(kb, kind, rows[lo:lo + BATCH])


# --- the indexes, searched at retrieve's k -------------------------------------------------------
def open_index(kb: KnowledgeBase, kind: str, queries: np.ndarray, k: int) -> tuple[faiss.Index, dict]:
    """load_index, and the search setting used at `k`: the index's own if tuned at k or more, else
    re-tuned (index.tune, same target recall) on a sample of the task's queries against exact search."""
    index = load_index(kb, kind)
    if index.d != queries.shape[1]:
        raise ValueError(f"{kind}.index has dimension {index.d}, the queries {queries.shape[1]}")
    infos = read_json(kb.path / f"{kind}.index.json")
    record = {"factory": infos["factory"], "index_k": infos["k"], "index_params": infos["params"], "k": k,
              "params": infos["params"], "retuned": False}
    if infos["k"] < k and infos["params"]:
        sample = queries[np.unique(np.linspace(0, len(queries) - 1, RETUNE_QUERIES).astype(int))]
        tuned = tune(index, infos["factory"], sample, exact_top_k(kb, kind, sample, k), k, infos["target_recall"])
        record.update(params=tuned["params"], retuned=True, recall=round(tuned["recall"], 4),
                      target_recall=infos["target_recall"], target_reached=tuned["target_reached"])
    return index, record


# --- per-class cap on one chunk's hits -----------------------------------------------------------
def cap_per_class(klass: np.ndarray, mode: np.ndarray, ids: np.ndarray, score: np.ndarray,
                  limit: int | None) -> dict:
    """Each class's best `limit` pairs among its hits (all of them when `limit` is None).

    Inputs are one row per hit. A pair's rank in a (class, mode) is by its best score there;
    each mode's pairs are then taken in turn by rank (1st t2t, 1st t2i, 2nd t2t, ...): their
    scores are not comparable, text-text cosines run far above image-text ones, so sorting by
    score would fill every class from t2t alone. Returns, sorted by class then position, one
    entry per kept (class, pair): class, id, position in the class, best score per mode (NaN
    where that mode did not find it), and `hit` (for every hit of a kept entry, its entry).
    """
    uid, dense = np.unique(ids, return_inverse=True)
    pair = klass.astype(np.int64) * len(uid) + dense  # (class, id) as one key
    group = pair * len(MODES) + mode
    order = np.lexsort((-score, group))
    first = order[np.r_[True, group[order][1:] != group[order][:-1]]]  # best hit per (class, mode, id)
    best = score[first]
    by_rank = first[np.lexsort((ids[first], -best, mode[first], klass[first]))]
    cell = klass[by_rank].astype(np.int64) * len(MODES) + mode[by_rank]
    rank = np.arange(len(by_rank)) - np.searchsorted(cell, cell)
    if limit is not None:
        by_rank, rank = by_rank[rank < limit], rank[rank < limit]
    turns = by_rank[np.lexsort((mode[by_rank], rank, klass[by_rank]))]  # per class: rank 0 of each mode, ...
    seen = np.lexsort((np.arange(len(turns)), pair[turns]))  # a pair once per class, at its first turn
    once = np.zeros(len(turns), dtype=bool)
    once[seen[np.r_[True, pair[turns][seen][1:] != pair[turns][seen][:-1]]]] = True
    turns = turns[once]
    position = np.arange(len(turns)) - np.searchsorted(klass[turns], klass[turns])
    if limit is not None:
        turns, position = turns[position < limit], position[position < limit]
    keys = pair[turns]  # the kept (class, id) keys, each once
    sorter = np.argsort(keys)

    def entry_of(wanted):  # entry number of each (class, id) key; -1 where that pair was not kept for that class
        if not len(keys):
            return np.full(len(wanted), -1, dtype=np.int64)
        at = sorter[np.minimum(np.searchsorted(keys, wanted, sorter=sorter), len(keys) - 1)]
        return np.where(keys[at] == wanted, at, -1)

    scores = np.full((len(turns), len(MODES)), np.nan, dtype=np.float32)
    entry = entry_of(pair[first])
    scores[entry[entry >= 0], mode[first][entry >= 0]] = best[entry >= 0]
    return {"class": klass[turns].astype(np.int32), "id": ids[turns], "position": position.astype(np.int32),
            "score": scores, "hit": entry_of(pair)}


def search_chunk(indexes: dict, queries: np.ndarray, query_class: np.ndarray, query_ids: np.ndarray, k: int,
                 limit: int | None) -> dict:
    """Search one chunk's queries in each mode's index and cap per class; the arrays of a chunk file."""
    hits = []
    for mode, index in indexes.items():
        scores, ids = index.search(queries, k)
        found = ids >= 0  # FAISS pads with -1 when fewer than k are found
        query = np.broadcast_to(np.arange(len(queries))[:, None], ids.shape)[found]
        hits.append((query, ids[found], scores[found], np.full(int(found.sum()), list(MODES).index(mode))))
    query, ids, score, mode = (np.concatenate(column) for column in zip(*hits))
    kept = cap_per_class(query_class[query], mode, ids, score, limit)
    hit = kept.pop("hit")
    # provenance: which queries found each kept entry (a query once per entry, whatever the mode)
    n_queries = int(query_ids.max(initial=0)) + 1
    found_by = np.unique(hit[hit >= 0] * n_queries + query_ids[query[hit >= 0]])
    return {**kept, "query_entry": found_by // n_queries, "query": (found_by % n_queries).astype(np.int32),
            "hits": np.int64(len(ids))}


def class_chunks(n_classes: int, templates: int, k: int, modes: int, hits_per_chunk: int) -> list[range]:
    """Classes searched together: as many as keep a chunk's hits under `hits_per_chunk`."""
    size = max(1, hits_per_chunk // (templates * k * modes))
    return [range(lo, min(lo + size, n_classes)) for lo in range(0, n_classes, size)]


def settings_key(kb: KnowledgeBase, task: Task, modes: list[str], k: int, limit: int | None, search: dict) -> str:
    """What a chunk file depends on; chunk files made under other settings are not reused."""
    settings = {"kb": str(kb.path.resolve()), "count": len(kb), "model": kb.info.get("model"),
                "pretrained": kb.info.get("pretrained"), "classes": task.classnames, "templates": task.templates,
                "modes": modes, "k": k, "limit": limit,
                "index": {m: (read_json(kb.path / f"{MODES[m]}.index.json")["ids_sha256"], search[m]["params"])
                          for m in modes}}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def search_chunks(env, indexes: dict, queries: np.ndarray, query_class: np.ndarray, chunks: list[range],
                  k: int, limit: int | None, parts: Path) -> dict:
    """This rank's chunks (every world_size-th), each written to parts/chunk-N.npz; finished ones are kept."""
    mine = list(range(env.rank, len(chunks), env.world_size))
    todo = [n for n in mine if not (parts / f"chunk-{n:06d}.npz").exists()]
    for n in todo:  # temporary files a killed run left (its atomic writes never finished)
        for stale in parts.glob(f".chunk-{n:06d}.npz.*.tmp"):
            stale.unlink(missing_ok=True)
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"retrieve (rank {env.rank})", unit="chunk",
              disable=not env.is_main) as bar:
        for n in todo:
            select = np.isin(query_class, chunks[n])
            arrays = search_chunk(indexes, queries[select], query_class[select], np.flatnonzero(select), k, limit)
            with atomic_path(parts / f"chunk-{n:06d}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            bar.update()
    return {"rank": env.rank, "chunks": len(mine), "searched": len(todo)}


def read_chunks(parts: Path, count: int) -> dict:
    """Every chunk file's entries, concatenated (query_entry renumbered to the concatenation)."""
    columns = {name: [] for name in ("class", "id", "position", "score", "query_entry", "query")}
    entries, hits = 0, 0
    for n in range(count):
        with np.load(parts / f"chunk-{n:06d}.npz") as chunk:
            for name in columns:
                columns[name].append(chunk[name] + (entries if name == "query_entry" else 0))
            entries += len(chunk["id"])
            hits += int(chunk["hits"])
    return {**{name: np.concatenate(values) for name, values in columns.items()}, "hits": hits}


# --- filters on the kept pairs -------------------------------------------------------------------
def dedup_index(kb: KnowledgeBase, rows: np.ndarray, gpu: bool) -> faiss.Index:
    """An empty index for the kept image embeddings: exact for small sets, else IVF (fp16 codes) over
    cells centred on a sample of the kept pairs (no k-means: pairs this close mostly share a cell,
    and DEDUP_NPROBE cells are searched; this finds most, not all, near-duplicates)."""
    if len(rows) <= EXACT_DEDUP_MAX:
        index = faiss.IndexFlatIP(kb.dim)
    else:
        nlist = len(rows) // DEDUP_CELL
        centres = read_rows(kb, "image", np.sort(np.random.default_rng(0).choice(rows, nlist, replace=False)))
        quantizer = faiss.IndexFlatIP(kb.dim) if gpu else faiss.IndexHNSWFlat(kb.dim, 32, faiss.METRIC_INNER_PRODUCT)
        quantizer.add(centres)
        index = faiss.IndexIVFScalarQuantizer(quantizer, kb.dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.train(centres)  # the quantizer is filled, so this trains only the (trivial) fp16 codec
        index.nprobe = DEDUP_NPROBE
        if not gpu:
            quantizer.hnsw.efSearch = 4 * DEDUP_NPROBE
    return faiss.index_cpu_to_all_gpus(index) if gpu else index


def neighbours(index: faiss.Index, emb: np.ndarray, threshold: float, gpu: bool):
    """(lims, ids) of the indexed rows within `threshold` cosine of each row of `emb`, as range_search."""
    if not gpu:
        lims, _, ids = index.range_search(emb, threshold)
        return lims.astype(np.int64), ids
    scores, ids = index.search(emb, GPU_NEIGHBOURS)
    close = (scores >= threshold) & (ids >= 0)  # -1: fewer rows indexed than asked for
    return np.r_[0, np.cumsum(close.sum(1))], ids[close]


def near_duplicates(kb: KnowledgeBase, rows: np.ndarray, threshold: float) -> np.ndarray:
    """True for rows (ordered best first) whose image is within `threshold` cosine of a better kept row.

    In batches: each batch is added to one index of the kept pairs, then searched against it, so
    every better row is there; only rows with a better close neighbour are looked at one by one.
    """
    gpu = faiss.get_num_gpus() > 0
    index = dedup_index(kb, rows, gpu)
    removed = np.zeros(len(rows), dtype=bool)
    batches = tqdm(batched_rows(kb, "image", rows), total=math.ceil(len(rows) / BATCH), unit="batch",
                   desc=f"near-duplicates among {len(rows):,} kept pairs", disable=len(rows) <= EXACT_DEDUP_MAX)
    for lo, emb in batches:
        index.add(emb)
        lims, ids = neighbours(index, emb, threshold, gpu)
        owner = lo + np.repeat(np.arange(len(emb)), np.diff(lims))
        better = ids < owner
        owner, ids = owner[better], ids[better]
        for row in np.unique(owner):  # rows with a better near-duplicate (sorted, so better rows come first)
            span = slice(np.searchsorted(owner, row), np.searchsorted(owner, row, side="right"))
            removed[row] = not removed[ids[span]].all()
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


def filter_pairs(kb: KnowledgeBase, rows: np.ndarray, min_clip_score: float | None, eval_set, eval_threshold: float,
                 dedup_threshold: float | None) -> tuple[np.ndarray, dict]:
    """(removed mask, counts per reason) over the kept pairs' KB rows, ordered best first."""
    removed, counts = np.zeros(len(rows), dtype=bool), {}
    if min_clip_score is not None:
        for lo, image in batched_rows(kb, "image", rows):
            text = read_rows(kb, "text", rows[lo:lo + BATCH])
            removed[lo:lo + len(image)] = np.einsum("ij,ij->i", image, text) < min_clip_score
        counts["clip_score"] = int(removed.sum())
    if eval_set is not None:
        index = faiss.IndexFlatIP(kb.dim)
        index.add(eval_embeddings(eval_set, kb))
        left = np.flatnonzero(~removed)
        for lo, image in batched_rows(kb, "image", rows[left]):
            nearest, _ = index.search(image, 1)
            removed[left[lo:lo + len(image)][nearest[:, 0] >= eval_threshold]] = True
        counts["eval_overlap"] = int(removed.sum()) - sum(counts.values())
    if dedup_threshold is not None:
        left = np.flatnonzero(~removed)
        removed[left[near_duplicates(kb, rows[left], dedup_threshold)]] = True
        counts["near_duplicate"] = int(removed.sum()) - sum(counts.values())
    return removed, counts


# --- merge, cut to per_class, write ----------------------------------------------------------------
def select(entries: dict, removed_ids: np.ndarray, per_class: int | None) -> dict:
    """The entries left after the filters, each class cut to its `per_class` best (by position)."""
    keep = ~np.isin(entries["id"], removed_ids)
    if per_class is not None:  # entries are sorted by class, then position
        kept_so_far = np.cumsum(keep)
        class_start = np.searchsorted(entries["class"], entries["class"])
        kept_before_class = np.where(class_start > 0, kept_so_far[class_start - 1], 0)
        keep &= kept_so_far - kept_before_class <= per_class
    renumber = np.cumsum(keep) - 1
    of_kept = keep[entries["query_entry"]]
    return {"class": entries["class"][keep], "id": entries["id"][keep], "score": entries["score"][keep],
            "query_entry": renumber[entries["query_entry"][of_kept]], "query": entries["query"][of_kept]}


def name_rank(names: list[str]) -> np.ndarray:
    """Each name's position in sorted order (provenance lists are sorted by name, as sorted() would)."""
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(np.array(names, dtype=object), kind="stable")] = np.arange(len(names))
    return rank


class Lists:
    """list<string> columns from (key, value) rows: per key, its distinct names[value], sorted by name."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, names: list[str]):
        order = np.lexsort((name_rank(names)[values], keys))
        keys, values = keys[order], values[order]
        distinct = np.r_[True, (keys[1:] != keys[:-1]) | (values[1:] != values[:-1])] if len(keys) else []
        self.keys, self.values, self.names = keys[distinct], values[distinct], pa.array(names, pa.string())

    def column(self, wanted: np.ndarray) -> pa.Array:
        starts = np.searchsorted(self.keys, wanted)
        lengths = np.searchsorted(self.keys, wanted, side="right") - starts
        offsets = np.r_[0, np.cumsum(lengths)]
        take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), self.names.take(pa.array(self.values[take])))


class Provenance:
    """The provenance columns of kept pairs (from the kept entries), for any subset of their ids."""

    def __init__(self, kept: dict, classnames: list[str], prompts: list[str]):
        order = np.argsort(kept["id"], kind="stable")
        ids = kept["id"][order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
        self.ids = ids[starts]
        # best score per mode over the classes that kept the pair (fmax skips the NaN of an absent mode)
        self.scores = np.fmax.reduceat(kept["score"][order], starts, axis=0) if len(ids) else kept["score"]
        found = np.flatnonzero(~np.isnan(kept["score"]).ravel())
        self.lists = {"classes": Lists(kept["id"], kept["class"], classnames),
                      "queries": Lists(kept["id"][kept["query_entry"]], kept["query"], prompts),
                      "modes": Lists(kept["id"][found // len(MODES)], found % len(MODES), list(MODES))}

    def columns(self, ids: np.ndarray) -> dict:
        scores = self.scores[np.searchsorted(self.ids, ids)]
        columns = {"score": pa.array(np.nanmax(scores, axis=1)),
                   **{name: lists.column(ids) for name, lists in self.lists.items()}}
        for row, mode in enumerate(MODES):
            columns[f"score_{mode}"] = pa.array(scores[:, row], mask=np.isnan(scores[:, row]))
        return columns


def part_rows(kb: KnowledgeBase, part: int, rows: np.ndarray) -> pa.Table:
    """Every metadata column of the given rows (sorted positions) of one part, read batch by batch."""
    path = kb.metadata_path(part)
    tables, start = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
        inside = rows[(rows >= start) & (rows < start + batch.num_rows)] - start
        if len(inside):
            tables.append(pa.Table.from_batches([batch.take(pa.array(inside))]))
        start += batch.num_rows
    table = pa.concat_tables(tables)
    if "id" not in table.column_names:
        table = table.append_column("id", pa.array(make_ids(part, start)[rows]))
    return table


def output_schema(kb: KnowledgeBase, provenance: dict) -> pa.Schema:
    """The KB metadata columns (unified over the parts, `id` included), then the provenance columns."""
    schema = pa.unify_schemas([pq.read_schema(kb.metadata_path(n)) for n in kb.parts],
                              promote_options="default")
    if "id" not in schema.names:
        schema = schema.append(pa.field("id", pa.int64()))
    for name, column in provenance.items():
        schema = schema.append(pa.field(name, column.type))
    return schema


def write_retrieved(kb: KnowledgeBase, ids: np.ndarray, provenance: Provenance, path: Path) -> int:
    """Write the pairs `ids` with their KB metadata and provenance to `path` atomically, one row
    group per KB part that holds some (parts are read one at a time); return the row count."""
    wanted, written = np.sort(ids), 0
    schema = output_schema(kb, provenance.columns(wanted[:0]))
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in kb.parts:
            rows = np.flatnonzero(np.isin(kb.part_ids(part), wanted))
            if not len(rows):
                continue
            table = part_rows(kb, part, rows)
            for name, column in provenance.columns(table.column("id").to_numpy()).items():
                table = table.append_column(name, column)
            table = pa.table([table.column(f.name).cast(f.type) if f.name in table.column_names
                              else pa.nulls(table.num_rows, f.type) for f in schema], schema=schema)
            writer.write_table(table)
            written += table.num_rows
        if not written:
            writer.write_table(schema.empty_table())
    return written


# --- the stage -----------------------------------------------------------------------------------
def check_arguments(mode: str, k: int | None, per_class: int | None) -> list[str]:
    if mode != "both" and mode not in MODES:
        raise ValueError(f"mode must be t2t, t2i or both, got {mode!r}")
    for name, value in (("k", k), ("per_class", per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return list(MODES) if mode == "both" else [mode]


def open_indexes(env, kb: KnowledgeBase, modes: list[str], queries: np.ndarray, k: int) -> tuple[dict, dict]:
    """Each mode's index with its search setting at k (chosen on rank 0, applied on every rank)."""
    indexes, records = {}, {}
    for mode in modes:
        if env.is_main:
            indexes[mode], records[mode] = open_index(kb, MODES[mode], queries, k)
        else:
            indexes[mode] = load_index(kb, MODES[mode])
    records = env.gather(records)[0]
    for mode in modes:
        if records[mode]["params"]:
            faiss.ParameterSpace().set_index_parameters(indexes[mode], records[mode]["params"])
    return indexes, records


def merge_chunks(kb: KnowledgeBase, task: Task, prompts: list[str], out: Path, entries: dict,
                 per_class: int | None, filters: dict) -> dict:
    """Rank 0: filter the kept pairs of every chunk, cut each class to per_class, write retrieved.parquet."""
    by_id = np.argsort(entries["id"], kind="stable")
    ids, starts = np.unique(entries["id"][by_id], return_index=True)
    best = np.nanmax(np.fmax.reduceat(entries["score"][by_id], starts, axis=0), axis=1) if len(ids) else ids
    ids = ids[np.lexsort((ids, -best))]  # best first
    started = time.time()
    removed, counts = filter_pairs(kb, locate(kb, ids), **filters)
    kept = select(entries, ids[removed], per_class)
    filtered = time.time()
    retrieved = write_retrieved(kb, np.unique(kept["id"]), Provenance(kept, list(task.classnames), prompts),
                                out / "retrieved.parquet")
    per_class_counts = np.bincount(kept["class"], minlength=len(task.classnames))
    found = {mode: np.unique(entries["id"][~np.isnan(entries["score"][:, n])]) for n, mode in enumerate(MODES)}
    short = np.flatnonzero(per_class_counts < per_class) if per_class is not None else np.zeros(0, dtype=int)
    return {
        "hits": entries["hits"], "unique_candidates": len(ids), "retrieved": retrieved,
        "by_mode": {mode: len(found[mode]) for mode in MODES if len(found[mode])},
        "t2t_t2i_overlap": len(np.intersect1d(*found.values())) if all(len(f) for f in found.values()) else None,
        "removed": counts,
        "per_class_counts": dict(zip(task.classnames, per_class_counts.tolist())),
        "short_classes": {"count": len(short), "missing_pairs": int((per_class - per_class_counts[short]).sum())
                          if len(short) else 0, "classes": [task.classnames[c] for c in short[:20]]},
        "stage_seconds": {"filter": filtered - started, "write": time.time() - filtered},
    }


def retrieve(kb_path: str | Path, task: str | Task, out: str | Path, mode: str = "both", k: int | None = None,
             per_class: int | None = None, model: str | None = None, dedup_threshold: float | None = DEDUP_THRESHOLD,
             min_clip_score: float | None = None, eval_set: str | Path | None = None,
             eval_threshold: float = EVAL_OVERLAP_THRESHOLD, hits_per_chunk: int = HITS_PER_CHUNK) -> dict:
    """Retrieve pairs for `task` from the KB into out/retrieved.parquet; return the summary (out/summary.json).

    k: hits per query (default: per_class plus the OVERFETCH margin, else 100). per_class: keep
    each class's best pairs. dedup_threshold: image cosine above which kept pairs count as the
    same image (None: off). min_clip_score: drop pairs whose image-caption cosine is below it.
    eval_set: a .npy of evaluation image embeddings or an evaluation webdataset folder; pairs
    within `eval_threshold` cosine of any of its images are dropped. hits_per_chunk: hits searched
    and held at a time (bounds memory). Runs as it is under torchrun (classes split by chunk).
    """
    started = time.time()
    modes = check_arguments(mode, k, per_class)
    limit = None if per_class is None else math.ceil(per_class * (1 + OVERFETCH))
    k = k or limit or 100
    kb, out = KnowledgeBase(kb_path), Path(out)
    task = task if isinstance(task, Task) else get_task(task)
    if not kb.has_text and "t2t" in modes:
        if mode == "t2t":
            raise ValueError(f"{kb.path} has no caption embeddings (an image-only folder): it serves --mode t2i only")
        print(f"note: {kb.path} has no caption embeddings (an image-only folder): searching images only (t2i)")
        modes = ["t2i"]
    env = init_distributed("cpu")
    try:
        marks = [time.time()]
        prompts, query_class, queries = encode_queries(kb, task, model)
        marks.append(time.time())
        indexes, search = open_indexes(env, kb, modes, queries, k)
        marks.append(time.time())
        chunks = class_chunks(len(task.classnames), len(task.templates), k, len(modes), hits_per_chunk)
        parts = out / "parts" / settings_key(kb, task, modes, k, limit, search)
        if env.is_main:  # chunk files of other settings can never be reused
            for stale in (out / "parts").glob("*"):
                if stale != parts:
                    shutil.rmtree(stale)
        ranks = env.gather(search_chunks(env, indexes, queries, query_class, chunks, k, limit, parts))
        marks.append(time.time())
        if env.is_main:
            filters = {"min_clip_score": min_clip_score, "eval_set": eval_set, "eval_threshold": eval_threshold,
                       "dedup_threshold": dedup_threshold}
            summary = {
                "task": task.name, "kb": str(kb.path), "model": kb.info.get("model"),
                "pretrained": kb.info.get("pretrained"), "mode": mode, "modes": modes, "k": k, "per_class": per_class,
                "kept_per_class_before_filters": limit, "queries": len(prompts),
                **merge_chunks(kb, task, prompts, out, read_chunks(parts, len(chunks)), per_class, filters),
                "thresholds": {"dedup": dedup_threshold, "min_clip_score": min_clip_score,
                               "eval_overlap": eval_threshold if eval_set else None},
                "search": search, "chunks": {"total": len(chunks), "searched": sum(r["searched"] for r in ranks),
                                             "ranks": ranks}, "seconds": time.time() - started,
            }
            summary["stage_seconds"] = {**dict(zip(("queries", "index", "search"), np.diff(marks).round(2))),
                                        **{s: round(t, 2) for s, t in summary["stage_seconds"].items()}}
            write_json(summary, out / "summary.json")
        env.barrier()
        return read_json(out / "summary.json")
    finally:
        env.close()
