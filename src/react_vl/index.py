"""Index stage: tuned FAISS indexes over a knowledge base's image and caption embeddings.

    infos = build_indexes("KB", memory_budget="4GB", target_recall=0.95, k=10)
    index = load_index("KB", "image")     # checked against the KB, tuned params applied

The index type is picked the way autofaiss picks it (exact search for small sets, HNSW when
it fits the memory budget, IVF-Flat, then OPQ + IVF with an HNSW coarse quantizer + PQ for
large sets). Vectors are added in chunks under their metadata `id`, never by position. Search
parameters (nprobe, efSearch, quantizer_efSearch) are then tuned for a target recall@k
against exact search, at the lowest latency; the public REACT code ran at FAISS defaults.
Each index gets an infos JSON beside it: factory string, parameters, recall, latency, size
and a fingerprint of the ids, which `load_index` uses to detect an index that no longer
matches its KB.
"""

import hashlib
import math
import re
import time
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm import tqdm

from .kb import KnowledgeBase
from .utils import atomic_path, read_json, write_json

KINDS = {"image": "img_emb", "text": "text_emb"}
FLAT_MAX_VECTORS = 10_000       # below this, exact search is fast enough and loses nothing
HNSW_MAX_VECTORS = 1_000_000    # HNSW build time grows too fast beyond this (autofaiss' limit too)
HNSW_M = 32                     # graph links per node; fewer (down to 16) when the budget is tight
# Fewer links than this leave a high-dimensional graph poorly connected: at 1M x 512, HNSW11
# reached recall@10 0.77 at efSearch 1024 (benchmarks/bench_index.py), so IVF-Flat is used instead.
HNSW_MIN_M = 16
ADD_CHUNK = 20_000              # vectors converted to float32 and added at a time (bounds memory)
MMAP_MIN_BYTES = 2**30          # indexes at least this large load memory-mapped
_SIZE_RE = re.compile(r"^\s*([\d.]+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """'4GB' / '512M' / 1024 -> bytes."""
    if isinstance(size, int):
        return size
    match = _SIZE_RE.match(str(size))
    if not match:
        raise ValueError(f"cannot read memory size {size!r}: use a number with a unit, e.g. 4GB or 512MB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_KMGT".index(unit.upper() or "_"))


def _nlist_for(count: int) -> int:
    """Number of IVF cells: a power of two near 4 * sqrt(count), as autofaiss and the FAISS wiki advise."""
    return max(1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count)))))


def estimate_memory(factory: str, count: int, dim: int) -> int:
    """Bytes an index of this factory string needs in RAM (vectors, graph links, ids, centroids)."""
    ids = 8 * count
    if factory == "Flat":
        return count * dim * 4 + ids
    if factory.startswith("HNSW"):
        links = int(factory[4:])
        return count * (dim * 4 + 2 * links * 4) + ids
    nlist = int(re.search(r"IVF(\d+)", factory).group(1))
    centroids = nlist * (dim * 4 + 2 * HNSW_M * 4)
    if factory.endswith(",Flat"):
        return count * dim * 4 + ids + centroids
    code_bytes = int(re.search(r"PQ(\d+)x8", factory).group(1))
    return count * code_bytes + ids + centroids + dim * dim * 4


def choose_factory(count: int, dim: int, memory_budget: str | int = "4GB") -> str:
    """The FAISS factory string for `count` vectors of `dim` under a memory budget.

    Exact (Flat) for small sets; HNSW when it fits (with 16-32 links per node, as many as fit);
    IVF-Flat when the raw vectors fit;
    otherwise OPQ + IVF (HNSW coarse quantizer) + PQ with as many code bytes as the budget allows.
    """
    budget = parse_size(memory_budget)
    nlist = _nlist_for(count)
    if count <= FLAT_MAX_VECTORS and estimate_memory("Flat", count, dim) <= budget:
        return "Flat"
    links = min(HNSW_M, (budget // count - 4 * dim - 8) // 8)
    if count <= HNSW_MAX_VECTORS and links >= HNSW_MIN_M:
        return f"HNSW{links}"
    if estimate_memory(f"IVF{nlist},Flat", count, dim) <= budget:
        return f"IVF{nlist},Flat"
    for code_bytes in (256, 128, 64, 32, 16, 8):  # PQ code sizes; each subvector gets >= 2 dims
        if code_bytes * 2 > dim:
            continue
        factory = f"OPQ{code_bytes}_{code_bytes * (dim // code_bytes)},IVF{nlist}_HNSW{HNSW_M},PQ{code_bytes}x8"
        if estimate_memory(factory, count, dim) <= budget:
            return factory
    raise ValueError(f"memory budget {memory_budget} is too small for {count} vectors of dim {dim} "
                     f"(even 8-byte PQ codes need {estimate_memory(factory, count, dim) / 2**20:.0f} MiB)")


def search_candidates(factory: str) -> list[str]:
    """Search-parameter settings to try, cheapest first (latency grows along the list)."""
    if factory == "Flat":
        return [""]
    if factory.startswith("HNSW"):
        return [f"efSearch={ef}" for ef in (16, 32, 64, 128, 256, 512, 1024)]
    nlist = int(re.search(r"IVF(\d+)", factory).group(1))
    nprobes = [2**i for i in range(int(math.log2(nlist)) + 1)]
    if "_HNSW" in factory:  # the coarse quantizer must find at least nprobe cells
        return [f"nprobe={p},quantizer_efSearch={max(2 * p, 16)}" for p in nprobes]
    return [f"nprobe={p}" for p in nprobes]


def ids_fingerprint(ids: np.ndarray) -> str:
    """sha256 of the ids in KB order: changes when pairs are added, removed or renumbered."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _part_chunks(kb: KnowledgeBase, kind: str, leave_out: np.ndarray, chunk: int = ADD_CHUNK):
    """(float32 vectors, ids) in chunks, part by part (memory-mapped), without the rows where `leave_out` is True."""
    ids = kb.ids()
    start = 0
    for part in kb.parts:
        emb = kb.part_embeddings(KINDS[kind], part)
        for lo in range(start, start + len(emb), chunk):
            hi = min(lo + chunk, start + len(emb))
            keep = ~leave_out[lo:hi]
            yield np.asarray(emb[lo - start:hi - start], dtype=np.float32)[keep], ids[lo:hi][keep]
        start += len(emb)


def read_rows(kb: KnowledgeBase, kind: str, rows: np.ndarray) -> np.ndarray:
    """float32 embeddings of the given rows (positions in KB order, any order), read part by part
    from memory-mapped files, so only those rows come into memory."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), kb.dim), dtype=np.float32)
    start = 0
    for part in kb.parts:
        emb = kb.part_embeddings(KINDS[kind], part)
        inside = np.flatnonzero((rows >= start) & (rows < start + len(emb)))
        out[inside] = emb[np.sort(rows[inside] - start)][np.argsort(np.argsort(rows[inside]))]
        start += len(emb)
    return out


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index that stores explicit ids (IVF natively, others via IndexIDMap)."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    return index if "IVF" in factory else faiss.IndexIDMap(index)


def train_size(factory: str, count: int) -> int:
    """Vectors to train on: ~64 per IVF cell (FAISS warns under 39), at least 256 x 39 for PQ codebooks."""
    if "IVF" not in factory:
        return 0
    nlist = int(re.search(r"IVF(\d+)", factory).group(1))
    return min(count, max(64 * nlist, 256 * 39 if "PQ" in factory else 0))


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k ids that the index returns in its top-k."""
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def tune(index: faiss.Index, factory: str, queries: np.ndarray, truth: np.ndarray, k: int,
         target_recall: float) -> dict:
    """Cheapest search setting reaching `target_recall`@k (else the most accurate one), with its latency."""
    space = faiss.ParameterSpace()
    best = None
    for params in search_candidates(factory):
        if params:
            space.set_index_parameters(index, params)
        start = time.perf_counter()
        _, found = index.search(queries, k)
        latency = (time.perf_counter() - start) / len(queries)
        result = {"params": params, "recall": recall_at_k(found, truth, k), "latency_ms": 1000 * latency}
        if best is None or result["recall"] > best["recall"]:
            best = result
        if result["recall"] >= target_recall:
            best = result
            break
    if best["params"]:
        space.set_index_parameters(index, best["params"])
    return {**best, "target_reached": best["recall"] >= target_recall}


def build_index(kb: KnowledgeBase, kind: str, memory_budget: str | int = "4GB", target_recall: float = 0.95,
                k: int = 10, n_queries: int = 1000, factory: str | None = None, seed: int = 0) -> dict:
    """Build, tune and write KB/{kind}.index and its infos JSON; return the infos."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {sorted(KINDS)}, got {kind!r}")
    started = time.perf_counter()
    count, dim = len(kb), kb.dim
    factory = factory or choose_factory(count, dim, memory_budget)
    rng = np.random.default_rng(seed)
    index = make_index(factory, dim)
    kb_ids = kb.ids()

    n_train = train_size(factory, count)
    if n_train:
        train_rows = np.sort(rng.choice(count, n_train, replace=False))
        index.train(read_rows(kb, kind, train_rows))
    # Tuning queries: captions of held-out pairs (REACT's queries are text). Their pairs are added
    # only after tuning, so no query finds itself, its own image, or its graph links for free.
    held_out = np.sort(rng.choice(count, min(n_queries, count // 10 or 1), replace=False))
    is_held_out = np.zeros(count, dtype=bool)
    is_held_out[held_out] = True
    with tqdm(total=count, desc=f"index {kind} ({factory})", unit="vec", unit_scale=True) as bar:
        for vectors, ids in _part_chunks(kb, kind, is_held_out):
            index.add_with_ids(vectors, ids)
            bar.update(len(vectors))

        queries = read_rows(kb, "text", held_out)
        _, exact_rows = knn_ground_truth(queries, (vectors for vectors, _ in _part_chunks(kb, kind, is_held_out)),
                                         k, faiss.METRIC_INNER_PRODUCT)
        truth = kb_ids[~is_held_out][exact_rows]
        tuned = tune(index, factory, queries, truth, k, target_recall)
        index.add_with_ids(read_rows(kb, kind, held_out), kb_ids[held_out])
        bar.update(len(held_out))
    build_s = time.perf_counter() - started

    path = kb.path / f"{kind}.index"
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    infos = {
        "kind": kind, "factory": factory, "params": tuned["params"], "k": k,
        "target_recall": target_recall, f"recall_at_{k}": tuned["recall"],
        "target_reached": tuned["target_reached"], "latency_ms_per_query": tuned["latency_ms"],
        "n_queries": len(queries), "memory_budget_bytes": parse_size(memory_budget),
        "estimated_memory_bytes": estimate_memory(factory, count, dim), "size_bytes": path.stat().st_size,
        "count": count, "dim": dim, "model": kb.info.get("model"), "pretrained": kb.info.get("pretrained"),
        "ids_sha256": ids_fingerprint(kb_ids), "build_s": build_s,
        "total_s": time.perf_counter() - started,
    }
    write_json(infos, kb.path / f"{kind}.index.json")
    return infos


def build_indexes(kb_path: str | Path, memory_budget: str | int = "4GB", target_recall: float = 0.95,
                  k: int = 10, kinds: tuple[str, ...] = ("image", "text"), n_queries: int = 1000) -> dict:
    """Build KB/image.index and KB/text.index (each gets the whole budget, built one after the other)."""
    kb = KnowledgeBase(kb_path)
    return {kind: build_index(kb, kind, memory_budget, target_recall, k, n_queries) for kind in kinds}


def load_index(kb: KnowledgeBase | str | Path, kind: str, mmap_min_bytes: int = MMAP_MIN_BYTES) -> faiss.Index:
    """Read KB/{kind}.index, check it against the KB and apply its tuned search parameters.

    Raises ValueError naming what differs (vector count, ids, dimension or model) when the
    index was built for other data; large indexes are memory-mapped instead of read into RAM.
    """
    kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
    path, info_path = kb.path / f"{kind}.index", kb.path / f"{kind}.index.json"
    if not path.exists() or not info_path.exists():
        raise FileNotFoundError(f"no {kind} index in {kb.path} ({path.name} / {info_path.name} missing): "
                                f"run `react-vl index {kb.path}` first")
    infos = read_json(info_path)
    problems = []
    if infos["count"] != len(kb):
        problems.append(f"it holds {infos['count']} vectors, the KB {len(kb)}")
    if infos["dim"] != kb.dim:
        problems.append(f"its dimension is {infos['dim']}, the KB's {kb.dim}")
    if (infos.get("model"), infos.get("pretrained")) != (kb.info.get("model"), kb.info.get("pretrained")):
        problems.append(f"it was built for model {infos.get('model')}/{infos.get('pretrained')}, "
                        f"the KB is {kb.info.get('model')}/{kb.info.get('pretrained')}")
    if not problems and infos["ids_sha256"] != ids_fingerprint(kb.ids()):
        problems.append("its ids differ from the KB metadata ids")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if path.stat().st_size >= mmap_min_bytes else 0
    index = faiss.read_index(str(path), flags)
    if index.ntotal != len(kb) or index.d != kb.dim:
        problems.append(f"the index file holds {index.ntotal} vectors of dim {index.d}, "
                        f"the KB {len(kb)} of dim {kb.dim}")
    if problems:
        raise ValueError(f"{path} does not match its knowledge base: {'; '.join(problems)}. "
                         f"Rebuild it with `react-vl index {kb.path}`")
    if infos["params"]:
        faiss.ParameterSpace().set_index_parameters(index, infos["params"])
    return index
