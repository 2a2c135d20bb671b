"""Index stage: tuned FAISS indexes over a knowledge base's image and caption embeddings.

    infos = build_indexes("KB", memory_budget="4GB", target_recall=0.95, k=10)
    infos = build_indexes("KB", memory_budget="16GB", shards=16, processes=4)   # in blocks, merged on disk
    index = load_index("KB", "image")     # checked against the KB, tuned params applied

The index type is picked the way autofaiss picks it (exact search for small sets, HNSW when
it fits the memory budget, IVF-Flat, then OPQ + IVF with an HNSW coarse quantizer + PQ for
large sets). The memory budget is the RAM the finished index keeps while it searches. When not
even the smallest PQ codes the rule accepts (1 byte per 8 dimensions) fit in it, the inverted
lists (codes and ids) go to disk, KB/{kind}.ivfdata, memory-mapped when searching: then only
the coarse quantizer, the OPQ matrix and the list directory count against the budget, and the
page cache keeps what it can of the lists. Building also holds the training sample in RAM
(`train_size` vectors).

IVF indexes can be built in blocks, FAISS's own way (faiss/demos/demo_ondisk_ivf.py): train
once on a sample (the k-means on every GPU faiss sees), write the trained empty index, add row
ranges of the KB in parallel processes, each into its own block index
(KB/{kind}.blocks/block_N.index), then merge the blocks' inverted lists into one on-disk index
with `faiss.contrib.ondisk.merge_ondisk`. Finished blocks survive a crash and the next run of
the same build reuses them. Flat and HNSW indexes are built in one piece.

Vectors are added in chunks under their metadata `id`, never by position. Search parameters
(nprobe, efSearch, quantizer_efSearch) are then tuned for a target recall@k against exact
search, at the lowest latency; the exact neighbours of the tuning queries are found in the same
pass over the vectors that adds them. The public REACT code ran at FAISS defaults. Each index
gets an infos JSON beside it: factory string, parameters, recall, latency, size and a
fingerprint of the ids, which `load_index` uses to detect an index that no longer matches its KB.
"""

import hashlib
import math
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk
from tqdm import tqdm

from .kb import KnowledgeBase
from .utils import atomic_path, markdown_table, read_json, write_json

KINDS = {"image": "img_emb", "text": "text_emb"}
FLAT_MAX_VECTORS = 10_000       # below this, exact search is fast enough and loses nothing
HNSW_MAX_VECTORS = 1_000_000    # HNSW build time grows too fast beyond this (autofaiss' limit too)
HNSW_M = 32                     # graph links per node; fewer (down to 16) when the budget is tight
# Fewer links than this leave a high-dimensional graph poorly connected: at 1M x 512, HNSW11
# reached recall@10 0.77 at efSearch 1024 (benchmarks/bench_index.py), so IVF-Flat is used instead.
HNSW_MIN_M = 16
PQ_SIZES = (256, 128, 64, 32, 16, 8)   # PQ code bytes tried, largest first
PQ_MIN_DIMS_PER_BYTE = 8        # smaller codes than 1 byte per 8 dims go to disk instead (64 B at 512-d)
LIST_ENTRY_BYTES = 24           # RAM per IVF cell of an on-disk index (its offset, size and capacity)
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


def _nlist_of(factory: str) -> int:
    return int(re.search(r"IVF(\d+)", factory).group(1))


def _list_bytes(factory: str, count: int, dim: int) -> int:
    """Bytes of an IVF index's inverted lists: each vector's code (raw floats for IVF-Flat) and its id."""
    code_bytes = dim * 4 if factory.endswith(",Flat") else int(re.search(r"PQ(\d+)x8", factory).group(1))
    return count * (code_bytes + 8)


def estimate_memory(factory: str, count: int, dim: int, on_disk: bool = False) -> int:
    """Bytes an index of this factory string keeps in RAM (vectors or codes, graph links, ids, centroids).

    on_disk: an IVF index whose inverted lists are memory-mapped from disk; only its coarse
    quantizer (centroids and their HNSW links), OPQ matrix and list directory count.
    """
    ids = 8 * count
    if factory == "Flat":
        return count * dim * 4 + ids
    if factory.startswith("HNSW"):
        links = int(factory[4:])
        return count * (dim * 4 + 2 * links * 4) + ids
    nlist = _nlist_of(factory)
    resident = nlist * (dim * 4 + 2 * HNSW_M * 4) + (dim * dim * 4 if factory.startswith("OPQ") else 0)
    if on_disk:
        return resident + nlist * LIST_ENTRY_BYTES
    return resident + _list_bytes(factory, count, dim)


def _pq_factory(code_bytes: int, nlist: int, dim: int) -> str:
    return f"OPQ{code_bytes}_{code_bytes * (dim // code_bytes)},IVF{nlist}_HNSW{HNSW_M},PQ{code_bytes}x8"


def choose_factory(count: int, dim: int, memory_budget: str | int = "4GB") -> str:
    """The FAISS factory string for `count` vectors of `dim` under a memory budget.

    Exact (Flat) for small sets; HNSW when it fits (with 16-32 links per node, as many as fit);
    IVF-Flat when the raw vectors fit; OPQ + IVF (HNSW coarse quantizer) + PQ with as many code
    bytes as the budget allows, down to 1 byte per 8 dimensions; below that, those smallest codes
    with their inverted lists on disk (`stores_on_disk`), when the coarse quantizer fits.
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
    smallest = max(PQ_SIZES[-1], dim // PQ_MIN_DIMS_PER_BYTE)  # each subvector also gets >= 2 dims
    factories = [_pq_factory(b, nlist, dim) for b in PQ_SIZES if smallest <= b <= dim // 2] or [f"IVF{nlist},Flat"]
    for factory in factories:
        if estimate_memory(factory, count, dim) <= budget:
            return factory
    if estimate_memory(factories[-1], count, dim, on_disk=True) <= budget:
        return factories[-1]
    raise ValueError(f"memory budget {memory_budget} is too small for {count} vectors of dim {dim}: even with "
                     f"its inverted lists on disk, {factories[-1]} keeps "
                     f"{estimate_memory(factories[-1], count, dim, on_disk=True) / 2**20:.0f} MiB in RAM")


def stores_on_disk(factory: str, count: int, dim: int, memory_budget: str | int) -> bool:
    """Whether the index's inverted lists go to disk: an IVF index whose lists do not fit the budget."""
    return "IVF" in factory and estimate_memory(factory, count, dim) > parse_size(memory_budget)


def factory_table(count: int, dim: int, budgets: list[str]) -> list[str]:
    """Markdown table of what the rule picks at each budget: factory, where the lists live, RAM and disk."""
    rows = []
    for budget in budgets:
        factory = choose_factory(count, dim, budget)
        on_disk = stores_on_disk(factory, count, dim, budget)
        disk = _list_bytes(factory, count, dim) if on_disk else 0
        rows.append([budget, f"`{factory}`", "disk (mmap)" if on_disk else "RAM",
                     f"{estimate_memory(factory, count, dim, on_disk) / 2**30:.1f}", f"{disk / 2**30:.1f}",
                     f"{train_size(factory, count) * dim * 4 / 2**30:.1f}"])
    return markdown_table(["budget", "factory", "inverted lists", "RAM GiB", "disk GiB", "training sample GiB"], rows)


def search_candidates(factory: str) -> list[str]:
    """Search-parameter settings to try, cheapest first (latency grows along the list)."""
    if factory == "Flat":
        return [""]
    if factory.startswith("HNSW"):
        return [f"efSearch={ef}" for ef in (16, 32, 64, 128, 256, 512, 1024)]
    nprobes = [2**i for i in range(int(math.log2(_nlist_of(factory))) + 1)]
    if "_HNSW" in factory:  # the coarse quantizer must find at least nprobe cells
        return [f"nprobe={p},quantizer_efSearch={max(2 * p, 16)}" for p in nprobes]
    return [f"nprobe={p}" for p in nprobes]


def ids_fingerprint(ids: np.ndarray) -> str:
    """sha256 of the ids in KB order: changes when pairs are added, removed or renumbered."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _row_chunks(kb: KnowledgeBase, kind: str, lo: int, hi: int, chunk: int = ADD_CHUNK):
    """(first row, float32 vectors) for KB rows lo..hi in chunks, read part by part from memory-mapped files."""
    start = 0
    for part in kb.parts:
        end = start + kb.part_rows[part]
        if end > lo:
            emb = kb.part_embeddings(KINDS[kind], part)
            for a in range(max(lo, start), min(hi, end), chunk):
                yield a, np.asarray(emb[a - start:min(a + chunk, hi, end) - start], dtype=np.float32)
        start = end
        if start >= hi:
            return


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
    if "IVF" not in factory:
        return faiss.IndexIDMap(index)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):  # its polysemous codes' Hamming filter is never searched with,
        ivf.do_polysemous_training = False  # and their training takes most of the PQ training time
    return index


def train_size(factory: str, count: int) -> int:
    """Vectors to train on: ~64 per IVF cell (FAISS warns under 39), at least 256 x 39 for PQ codebooks."""
    if "IVF" not in factory:
        return 0
    return min(count, max(64 * _nlist_of(factory), 256 * 39 if "PQ" in factory else 0))


def train_index(index: faiss.Index, vectors: np.ndarray) -> None:
    """Train an IVF index. Its k-means assigns with a flat index (as FAISS advises for HNSW coarse
    quantizers), on every GPU faiss sees when it is faiss-gpu, else on the CPU."""
    ivf = faiss.extract_index_ivf(index)
    flat = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)
    clustering = faiss.index_cpu_to_all_gpus(flat) if faiss.get_num_gpus() > 0 else flat
    ivf.clustering_index = clustering
    index.train(vectors)
    ivf.clustering_index = None


def add_rows(index: faiss.Index, kb: KnowledgeBase, kind: str, lo: int, hi: int, ids: np.ndarray,
             leave_out: np.ndarray, queries: np.ndarray, k: int, bar: tqdm | None = None):
    """Add KB rows lo..hi to `index` under `ids` (aligned with those rows), except where `leave_out`;
    return the exact top-k (scores, ids) of `queries` among the added rows, found in the same pass."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, vectors in _row_chunks(kb, kind, lo, hi):
        rows = slice(start - lo, start - lo + len(vectors))
        keep = ~leave_out[rows]
        vectors, chunk_ids = vectors[keep], ids[rows][keep]
        if len(vectors):
            index.add_with_ids(vectors, chunk_ids)
            scores, found = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, np.where(found >= 0, chunk_ids[found], -1))
        if bar is not None:
            bar.update(len(vectors))
    heap.finalize()
    return heap.D, heap.I


def exact_top_k(kb: KnowledgeBase, kind: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k of each query over every vector of the KB (one pass, part by part)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for part in kb.parts:
        emb = kb.part_embeddings(KINDS[kind], part)
        ids = kb.part_ids(part)
        for lo in range(0, len(emb), 100_000):
            block = np.asarray(emb[lo:lo + 100_000], dtype=np.float32)
            scores, found = faiss.knn(queries, block, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, ids[lo:lo + len(block)][found])
    heap.finalize()
    return heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k ids that the index returns in its top-k."""
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def _latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(ms per query of one batch search, the ids found)."""
    start = time.perf_counter()
    _, found = index.search(queries, k)
    return 1000 * (time.perf_counter() - start) / len(queries), found


def tune(index: faiss.Index, factory: str, queries: np.ndarray, truth: np.ndarray, k: int,
         target_recall: float) -> dict:
    """Cheapest search setting reaching `target_recall`@k (else the most accurate one), with its latency."""
    space = faiss.ParameterSpace()
    best = None
    for params in search_candidates(factory):
        if params:
            space.set_index_parameters(index, params)
        latency, found = _latency_ms(index, queries, k)
        result = {"params": params, "recall": recall_at_k(found, truth, k), "latency_ms": latency}
        if best is None or result["recall"] > best["recall"]:
            best = result
        if result["recall"] >= target_recall:
            best = result
            break
    if best["params"]:
        space.set_index_parameters(index, best["params"])
    return {**best, "target_reached": best["recall"] >= target_recall}


def _default_blocks(factory: str, count: int, dim: int, memory_budget: str | int, processes: int) -> int:
    """Blocks for a build: one when the index fits in RAM and one process adds; else enough that the
    `processes` blocks being filled at once fit the budget together, and at least one per process."""
    if not stores_on_disk(factory, count, dim, memory_budget) and processes == 1:
        return 1
    return max(processes, math.ceil(processes * _list_bytes(factory, count, dim) / parse_size(memory_budget)))


def build_index(kb: KnowledgeBase, kind: str, memory_budget: str | int = "4GB", target_recall: float = 0.95,
                k: int = 10, n_queries: int = 1000, factory: str | None = None, seed: int = 0,
                shards: int | None = None, processes: int = 1) -> dict:
    """Build, tune and write KB/{kind}.index (and KB/{kind}.ivfdata when built in blocks) and its
    infos JSON; return the infos.

    shards: blocks the vectors are added in, `processes` at a time, then merged on disk (IVF
    indexes only). None: one in-RAM build when the index fits the budget and one process adds;
    else one block per process, or more when that many blocks filled at once would not fit.
    """
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {sorted(KINDS)}, got {kind!r}")
    started = time.perf_counter()
    count, dim = len(kb), kb.dim
    factory = factory or choose_factory(count, dim, memory_budget)
    blocks = shards or _default_blocks(factory, count, dim, memory_budget, processes)
    in_blocks = "IVF" in factory and (blocks > 1 or stores_on_disk(factory, count, dim, memory_budget))
    rng = np.random.default_rng(seed)
    kb_ids = kb.ids()
    fingerprint = ids_fingerprint(kb_ids)
    train_rows = np.sort(rng.choice(count, train_size(factory, count), replace=False))
    # Tuning queries: captions of held-out pairs (REACT's queries are text; images where a KB has no
    # captions). Their pairs are added only after tuning, so no query finds itself, its own image,
    # or its graph links for free.
    held_out = np.sort(rng.choice(count, min(n_queries, count // 10 or 1), replace=False))
    queries = read_rows(kb, "text" if kb.has_text else "image", held_out)
    job = {"kb": kb, "kind": kind, "factory": factory, "train_rows": train_rows, "held_out": held_out,
           "kb_ids": kb_ids, "queries": queries, "k": k, "target_recall": target_recall}
    if in_blocks:
        plan = {"factory": factory, "count": count, "dim": dim, "ids_sha256": fingerprint,
                "seed": seed, "blocks": blocks, "k": k, "queries": len(held_out)}
        tuned = _build_in_blocks(**job, plan=plan, processes=processes)
    else:
        tuned = _build_in_memory(**job)
    path, data = kb.path / f"{kind}.index", kb.path / f"{kind}.ivfdata"
    infos = {
        "kind": kind, "factory": factory, "params": tuned["params"], "k": k,
        "target_recall": target_recall, f"recall_at_{k}": tuned["recall"],
        "target_reached": tuned["target_reached"], "latency_ms_per_query": tuned["latency_ms"],
        "n_queries": len(queries), "memory_budget_bytes": parse_size(memory_budget),
        "estimated_memory_bytes": estimate_memory(factory, count, dim, on_disk=in_blocks),
        "on_disk": in_blocks, "ivfdata": str(data.resolve()) if in_blocks else None,
        "blocks": blocks if in_blocks else 1, "blocks_resumed": tuned.get("blocks_resumed", 0),
        "size_bytes": path.stat().st_size + (data.stat().st_size if in_blocks else 0),
        "count": count, "dim": dim, "model": kb.info.get("model"), "pretrained": kb.info.get("pretrained"),
        "ids_sha256": fingerprint, "build_s": time.perf_counter() - started,
    }
    write_json(infos, kb.path / f"{kind}.index.json")
    return infos


def _build_in_memory(kb, kind, factory, train_rows, held_out, kb_ids, queries, k, target_recall) -> dict:
    """Build the index in one piece in RAM, tune it, add the held-out pairs and write KB/{kind}.index."""
    index = make_index(factory, kb.dim)
    if len(train_rows):
        train_index(index, read_rows(kb, kind, train_rows))
    is_held_out = np.zeros(len(kb_ids), dtype=bool)
    is_held_out[held_out] = True
    with tqdm(total=len(kb_ids), desc=f"index {kind} ({factory})", unit="vec", unit_scale=True) as bar:
        _, truth = add_rows(index, kb, kind, 0, len(kb_ids), kb_ids, is_held_out, queries, k, bar)
        tuned = tune(index, factory, queries, truth, k, target_recall)
        index.add_with_ids(read_rows(kb, kind, held_out), kb_ids[held_out])
        bar.update(len(held_out))
    with atomic_path(kb.path / f"{kind}.index") as tmp:
        faiss.write_index(index, str(tmp))
    (kb.path / f"{kind}.ivfdata").unlink(missing_ok=True)  # the lists of an earlier on-disk build
    return tuned


def _build_in_blocks(kb, kind, factory, train_rows, held_out, kb_ids, queries, k, target_recall, plan,
                     processes) -> dict:
    """Train once, add row ranges into block indexes in parallel, tune on the blocks searched as one
    (faiss.IndexShards), then merge every block and the held-out pairs into one on-disk index."""
    work = _work_dir(kb.path / f"{kind}.blocks", plan)
    trained = work / "trained.index"
    if not trained.exists():
        index = make_index(factory, kb.dim)
        train_index(index, read_rows(kb, kind, train_rows))
        with atomic_path(trained) as tmp:
            faiss.write_index(index, str(tmp))
    bounds = np.linspace(0, len(kb_ids), plan["blocks"] + 1).astype(int)
    resumed = _add_blocks(kb, kind, work, bounds, kb_ids, held_out, queries, k, processes)

    truth = faiss.ResultHeap(len(queries), k, keep_max=True)
    for b in range(plan["blocks"]):
        with np.load(work / f"block_{b}.truth.npz") as block_truth:
            truth.add_result(block_truth["scores"], block_truth["ids"])
    truth.finalize()
    block_paths = [work / f"block_{b}.index" for b in range(plan["blocks"])]
    blocks = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) for p in block_paths]
    searched_as_one = faiss.IndexShards(kb.dim, True, False)
    for block in blocks:
        searched_as_one.add_shard(block)
    tuned = tune(searched_as_one, factory, queries, truth.I, k, target_recall)
    del searched_as_one, blocks

    # The held-out pairs join as one more block: adding them to the merged on-disk lists afterwards
    # returned wrong neighbours (OnDiskInvertedLists, faiss 1.15.1).
    held_out_block = faiss.read_index(str(trained))
    held_out_block.add_with_ids(read_rows(kb, kind, held_out), kb_ids[held_out])
    with atomic_path(work / "block_held_out.index") as tmp:
        faiss.write_index(held_out_block, str(tmp))
    index = _merge_blocks(kb.path, kind, trained, block_paths + [work / "block_held_out.index"])
    if tuned["params"]:
        faiss.ParameterSpace().set_index_parameters(index, tuned["params"])
    tuned["latency_ms"], _ = _latency_ms(index, queries, k)  # of the merged index, as it will search
    shutil.rmtree(work)
    return {**tuned, "blocks_resumed": resumed}


def _work_dir(work: Path, plan: dict) -> Path:
    """KB/{kind}.blocks for this build: an interrupted run's blocks are kept when it had the same
    plan (factory, data, seed, blocks), cleared otherwise."""
    if (work / "plan.json").exists() and read_json(work / "plan.json") != plan:
        shutil.rmtree(work)
    if not (work / "plan.json").exists():
        write_json(plan, work / "plan.json")
    return work


def _add_blocks(kb, kind, work, bounds, kb_ids, held_out, queries, k, processes) -> int:
    """Fill the blocks not yet written, `processes` at a time, each in its own process; return how
    many were already written (by an interrupted run)."""
    todo = [b for b in range(len(bounds) - 1) if not (work / f"block_{b}.index").exists()]
    done = len(kb_ids) - sum(int(bounds[b + 1] - bounds[b]) for b in todo)
    threads = max(1, (os.cpu_count() or 1) // processes)
    with tqdm(total=len(kb_ids), initial=done, desc=f"index {kind} blocks", unit="vec", unit_scale=True) as bar, \
            ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for b in todo:
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            leave_out = np.zeros(hi - lo, dtype=bool)
            leave_out[held_out[(held_out >= lo) & (held_out < hi)] - lo] = True
            futures[pool.submit(_add_block, kb.path, kind, work, b, lo, hi, kb_ids[lo:hi], leave_out,
                                queries, k, threads)] = hi - lo
        for future in as_completed(futures):
            future.result()
            bar.update(futures[future])
    return len(bounds) - 1 - len(todo)


def _add_block(kb_path: Path, kind: str, work: Path, block: int, lo: int, hi: int, ids: np.ndarray,
               leave_out: np.ndarray, queries: np.ndarray, k: int, threads: int) -> None:
    """Worker: add KB rows lo..hi to a copy of the trained index and write it as block_N.index, after
    the exact top-k of the queries among those rows (block_N.truth.npz)."""
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(work / "trained.index"))
    scores, found = add_rows(index, KnowledgeBase(kb_path), kind, lo, hi, ids, leave_out, queries, k)
    with atomic_path(work / f"block_{block}.truth.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, scores=scores, ids=found)
    with atomic_path(work / f"block_{block}.index") as tmp:  # written last: the block is finished
        faiss.write_index(index, str(tmp))


def _merge_blocks(kb_path: Path, kind: str, trained: Path, block_paths: list[Path]) -> faiss.Index:
    """Merge the blocks' inverted lists into KB/{kind}.ivfdata and write KB/{kind}.index beside it."""
    path, data = kb_path / f"{kind}.index", kb_path / f"{kind}.ivfdata"
    for stale in (kb_path / f"{kind}.index.json", path):  # an old index would read the new lists
        stale.unlink(missing_ok=True)
    index = faiss.read_index(str(trained))
    merge_ondisk(index, [str(p) for p in block_paths], str(data.resolve()))  # the index records this path
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return index


def build_indexes(kb_path: str | Path, memory_budget: str | int = "4GB", target_recall: float = 0.95,
                  k: int = 10, kinds: tuple[str, ...] = ("image", "text"), n_queries: int = 1000,
                  shards: int | None = None, processes: int = 1) -> dict:
    """Build KB/image.index and KB/text.index (each gets the whole budget, built one after the other);
    a KB without caption embeddings (LAION-5B's image-only folders) gets the image index only."""
    kb = KnowledgeBase(kb_path)
    kinds = [kind for kind in kinds if kind != "text" or kb.has_text]
    return {kind: build_index(kb, kind, memory_budget, target_recall, k, n_queries, shards=shards,
                              processes=processes) for kind in kinds}


def load_index(kb: KnowledgeBase | str | Path, kind: str, mmap_min_bytes: int = MMAP_MIN_BYTES) -> faiss.Index:
    """Read KB/{kind}.index, check it against the KB and apply its tuned search parameters.

    Raises ValueError naming what differs (vector count, ids, dimension or model) when the
    index was built for other data; large indexes are memory-mapped instead of read into RAM, and
    the inverted lists of an on-disk index (KB/{kind}.ivfdata) always are.
    """
    kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
    path, info_path, data = kb.path / f"{kind}.index", kb.path / f"{kind}.index.json", kb.path / f"{kind}.ivfdata"
    if not path.exists() or not info_path.exists():
        raise FileNotFoundError(f"no {kind} index in {kb.path} ({path.name} / {info_path.name} missing): "
                                f"run `react-vl index {kb.path}` first")
    infos = read_json(info_path)
    if infos["on_disk"] and not data.exists():
        raise FileNotFoundError(f"{path} keeps its inverted lists in {data.name}, which is missing: "
                                f"rebuild it with `react-vl index {kb.path}`")
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
    if infos["on_disk"]:  # a KB moved since: the lists file is looked for beside the index
        moved = infos["ivfdata"] != str(data.resolve())
        flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_ONDISK_SAME_DIR if moved else 0)
    else:
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
