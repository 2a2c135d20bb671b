"""Index benchmark: the build in blocks merged on disk vs one build, and react-vl vs autofaiss.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_index.py    # blocks vs one build, 200k x 512
    nice -n 10 python benchmarks/bench_index.py --compare autofaiss  # 1M x 512, budgets 2GB and 1GB
    nice -n 10 python benchmarks/bench_index.py --compare autofaiss --n 100000 --budgets 400MB,210MB

Synthetic clustered, L2-normalised 512-d vectors are written as a KB. `--compare blocks` (the
default) first prints what the factory rule picks for 400M x 512 at 4/16/32/64 GB, then builds the
same factory twice over the KB, each build in its own process (so its peak RSS is its own): once
in one piece in RAM, once in `--blocks` blocks filled by `--processes` processes and merged into
one on-disk index; both are searched with the same fresh queries. `--compare autofaiss`:
react-vl's `build_index` and autofaiss's `build_index` (run in its own venv, because it pins
numpy<2) index the same npy files. Both are then searched side by side with the same fresh
queries: recall@k against exact search, latency per query (best of 3, batch search), build time, size.

autofaiss venv: python -m venv /work/venv-autofaiss && /work/venv-autofaiss/bin/pip install autofaiss
"pyarrow<15" (recent pyarrow needs numpy>=2, autofaiss pins numpy<2).
"""

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
from faiss.contrib.exhaustive_search import knn_ground_truth

from react_vl.index import build_index, factory_table, load_index, parse_size
from react_vl.kb import KnowledgeBase, make_ids, write_info, write_part

AUTOFAISS_BUILD = """
import json, sys, time
from autofaiss import build_index
embeddings, index_path, infos_path, budget = sys.argv[1:]
start = time.time()
_, infos = build_index(embeddings=embeddings, index_path=index_path, index_infos_path=infos_path,
                       max_index_memory_usage=budget, current_memory_available="16G", metric_type="ip", nb_cores=2)
print(json.dumps({"build_s": time.time() - start, **infos}))
"""


def clustered(n, centres, rng, chunk=100_000):
    """Normalised vectors around the given centres (CLIP embeddings are clustered too), made in chunks."""
    n_clusters, dim = centres.shape
    for lo in range(0, n, chunk):
        size = min(chunk, n - lo)
        x = centres[rng.integers(n_clusters, size=size)] + 0.8 * rng.standard_normal((size, dim), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def make_kb(path, n, centres, rng):
    dim = centres.shape[1]
    for part, vectors in enumerate(clustered(n, centres, rng)):
        meta = pa.table({"caption": [""] * len(vectors), "id": make_ids(part, len(vectors))})
        write_part(path, part, vectors, vectors, meta)
    write_info(path, model="synthetic", pretrained=None, dim=dim, dtype="float32", count=n)
    return KnowledgeBase(path)


def measure(index, queries, truth, k=10, repeats=3):
    """(recall@k, ms per query) of a batch search; latency is the best of `repeats`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = index.search(queries, k)
        times.append(time.perf_counter() - start)
    recall = np.mean([len(np.intersect1d(f, t[:k])) / k for f, t in zip(found, truth)])
    return recall, 1000 * min(times) / len(queries)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=["blocks", "autofaiss"], default="blocks")
    parser.add_argument("--n", type=int, default=None, help="vectors in the synthetic KB (200k for blocks, 1M else)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budgets", default="2GB,1GB", help="autofaiss: comma-separated memory budgets (at 1M x "
                        "512, 2GB fits an HNSW graph and 1GB forces OPQ + IVF + PQ)")
    parser.add_argument("--factory", default="IVF512_HNSW32,Flat", help="blocks: the index both builds make")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--autofaiss-python", default="/work/venv-autofaiss/bin/python")
    parser.add_argument("--child", choices=["one", "blocks", "search"], help=argparse.SUPPRESS)  # one step
    parser.add_argument("--kb", help=argparse.SUPPRESS)
    parser.add_argument("--eval", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_build(args)
    args.n = args.n or (200_000 if args.compare == "blocks" else 1_000_000)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
        kb = make_kb(Path(tmp) / "kb", args.n, centres, rng)
        queries = next(clustered(args.queries, centres, rng))  # fresh vectors from the same distribution
        database = kb.image_embeddings()
        _, truth = knn_ground_truth(queries, (database[lo:lo + 100_000] for lo in range(0, args.n, 100_000)),
                                    max(10, args.k), faiss.METRIC_INNER_PRODUCT)
        truth_ids = kb.ids()[truth]
        print(f"\n{args.n} x {args.dim} clustered vectors, {args.queries} queries, recall@{args.k} vs exact, "
              f"{faiss.omp_get_max_threads()} threads", flush=True)
        compare = compare_blocks if args.compare == "blocks" else compare_autofaiss
        compare(args, kb, queries, truth_ids, Path(tmp))


def compare_blocks(args, kb, queries, truth_ids, tmp):
    """The same factory built in one piece and in blocks merged on disk; each build, and each search
    of what it wrote, in a process of its own, so each peak RSS is that step's own."""
    table = factory_table(400_000_000, 512, ["4GB", "16GB", "32GB", "64GB"])
    print("\nfactory rule at 400M x 512:\n" + "\n".join(table))
    np.save(tmp / "queries.npy", queries)
    np.save(tmp / "truth.npy", truth_ids)
    results = {}
    for how in ("one", "blocks"):
        results[how] = _child(args, kb, tmp, how)
        results[how].update(_child(args, kb, tmp, "search"), found=np.load(tmp / "found.npy"))
    print(f"\n{args.factory}, k={args.k}, blocks: {args.blocks} filled by {args.processes} processes; "
          f"searched with {args.queries} queries in a fresh process. Memory in MiB: peak anonymous RSS (sampled "
          f"every 0.1 s; memory-mapped file pages are page cache, not counted) and VmHWM (peak RSS with them)")
    print(f"{'build':8s} {'params':34s} {'tuned r@k':>9s} {'fresh r@k':>9s} {'ms/query':>9s} {'build s':>8s} "
          f"{'build anon':>10s} {'build HWM':>9s} {'worker anon':>11s} {'search anon':>11s} {'search HWM':>10s} "
          f"{'MiB on disk':>11s}")
    for how, r in results.items():
        print(f"{how:8s} {r['params']:34s} {r['tuned_recall']:9.3f} {r['recall']:9.3f} {r['latency_ms']:9.3f} "
              f"{r['build_s']:8.1f} {r['anon_mib']:10.0f} {r['hwm_mib']:9.0f} {r['worker_anon_mib']:11.0f} "
              f"{r['search_anon_mib']:11.0f} {r['search_hwm_mib']:10.0f} {r['size_mib']:11.1f}", flush=True)
    one, blocks = results["one"], results["blocks"]
    print(f"blocks/one: recall ratio {blocks['recall'] / one['recall']:.3f}, identical result ids "
          f"{np.mean(one['found'] == blocks['found']):.3f}, build-time ratio {blocks['build_s'] / one['build_s']:.2f}, "
          f"build anon-RSS ratio (main process) {blocks['anon_mib'] / one['anon_mib']:.2f}, "
          f"search anon-RSS ratio {blocks['search_anon_mib'] / one['search_anon_mib']:.2f}")


def _child(args, kb, tmp, step):
    out = subprocess.run([sys.executable, __file__, "--child", step, "--kb", str(kb.path), "--eval", str(tmp),
                          "--factory", args.factory, "--blocks", str(args.blocks),
                          "--processes", str(args.processes), "--k", str(args.k)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"the {step} step failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_build(args):
    """One step in this process: build --factory over --kb (one / blocks), or search what was built;
    prints its figures as one JSON line."""
    kb = KnowledgeBase(args.kb)
    if args.child == "search":
        index = load_index(kb, "image")
        queries, truth = np.load(Path(args.eval) / "queries.npy"), np.load(Path(args.eval) / "truth.npy")
        recall, latency = measure(index, queries, truth, k=args.k)
        np.save(Path(args.eval) / "found.npy", index.search(queries, args.k)[1])
        print(json.dumps({"recall": recall, "latency_ms": latency, "search_anon_mib": _status_mib("RssAnon"),
                          "search_hwm_mib": _status_mib("VmHWM")}))
        return
    peaks, stop = {}, threading.Event()
    watcher = threading.Thread(target=_watch, args=(peaks, stop))
    watcher.start()
    shards = {"one": 1, "blocks": args.blocks}[args.child]
    infos = build_index(kb, "image", factory=args.factory, k=args.k, shards=shards, processes=args.processes)
    stop.set()
    watcher.join()
    print(json.dumps({"params": infos["params"], "tuned_recall": infos[f"recall_at_{args.k}"],
                      "build_s": infos["build_s"], "anon_mib": peaks.pop("self"), "hwm_mib": _status_mib("VmHWM"),
                      "worker_anon_mib": max(peaks.values(), default=0), "size_mib": infos["size_bytes"] / 2**20}))


def _watch(peaks: dict, stop: threading.Event):
    """Keep the peak anonymous RSS of this process and of each child (block worker) while the build runs."""
    while True:
        children = [pid for tasks in Path("/proc/self/task").glob("*/children") for pid in tasks.read_text().split()]
        for pid in ["self", *children]:
            with contextlib.suppress(OSError, StopIteration):
                peaks[pid] = max(peaks.get(pid, 0), _status_mib("RssAnon", pid))
        if stop.wait(0.1):
            return


def _status_mib(field: str, pid: str = "self") -> float:
    """A memory figure of /proc/PID/status in MiB (RssAnon: anonymous memory now, VmHWM: peak RSS)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def compare_autofaiss(args, kb, queries, truth_ids, tmp):
    """react-vl's choice and tuning vs autofaiss's, on the same npy files and budgets."""
    rows = []
    print(f"{'who':10s} {'budget':>7s} {'factory':34s} {'params':32s} {'recall@10':>9s} {'ms/query':>9s} "
          f"{'build s':>8s} {'MiB':>7s}", flush=True)
    for budget in args.budgets.split(","):
        infos = build_index(kb, "image", memory_budget=budget, target_recall=0.95, k=10)
        recall, latency = measure(load_index(kb, "image"), queries, truth_ids)
        rows.append(("react-vl", budget, infos["factory"], infos["params"], recall, latency, infos["build_s"],
                     infos["size_bytes"]))
        print_row(*rows[-1])

        af_index = tmp / "autofaiss.index"
        out = subprocess.run([args.autofaiss_python, "-c", AUTOFAISS_BUILD, str(kb.path / "img_emb"),
                              str(af_index), str(tmp / "af.json"), f"{parse_size(budget)}B"],
                             capture_output=True, text=True, check=False)
        if out.returncode:  # keep react-vl's row and the other budgets; say why autofaiss has none
            print(f"autofaiss failed at {budget} (exit {out.returncode}):\n{out.stderr[-2000:]}", flush=True)
            rows.pop()
            continue
        af = json.loads(out.stdout.strip().splitlines()[-1])
        index = faiss.read_index(str(af_index))
        faiss.ParameterSpace().set_index_parameters(index, af["index_param"])
        # autofaiss numbers vectors by file position; map them to the KB's explicit ids
        recall, latency = measure(_PositionIds(index, kb.ids()), queries, truth_ids)
        rows.append(("autofaiss", budget, af["index_key"], af["index_param"], recall, latency, af["build_s"],
                     af_index.stat().st_size))
        print_row(*rows[-1])

    for mine, theirs in zip(rows[::2], rows[1::2]):
        print(f"budget {mine[1]}: recall ratio react-vl/autofaiss {mine[4] / theirs[4]:.3f}, "
              f"latency ratio {mine[5] / theirs[5]:.2f}, build-time ratio {mine[6] / theirs[6]:.2f}")


def print_row(who, budget, factory, params, recall, latency, build_s, size):
    print(f"{who:10s} {budget:>7s} {factory:34s} {params:32s} {recall:9.3f} {latency:9.4f} {build_s:8.1f} "
          f"{size / 2**20:7.1f}", flush=True)


class _PositionIds:
    def __init__(self, index, ids):
        self.index, self.ids = index, ids

    def search(self, queries, k):
        distances, positions = self.index.search(queries, k)
        return distances, self.ids[positions]


if __name__ == "__main__":
    main()
