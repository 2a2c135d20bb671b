"""Index benchmark: react-vl's index choice and tuning vs autofaiss's, on the same vectors and memory budget.

    nice -n 10 python benchmarks/bench_index.py                      # 1M x 512, budgets 2GB and 1GB
    nice -n 10 python benchmarks/bench_index.py --n 100000 --budgets 400MB,210MB

Synthetic clustered, L2-normalised 512-d vectors are written as a KB; react-vl's `build_index`
and autofaiss's `build_index` (run in its own venv, because it pins numpy<2) index the same
npy files. Both indexes are then searched here, side by side, with the same fresh queries:
recall@10 against exact search, latency per query (best of 3, batch search), build time, size.

autofaiss venv: python -m venv /work/venv-autofaiss && /work/venv-autofaiss/bin/pip install autofaiss
"pyarrow<15" (recent pyarrow needs numpy>=2, autofaiss pins numpy<2).
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
from faiss.contrib.exhaustive_search import knn_ground_truth

from react_vl.index import build_index, load_index, parse_size
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
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the synthetic KB")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budgets", default="2GB,1GB", help="comma-separated memory budgets (at 1M x 512, "
                        "2GB fits an HNSW graph and 1GB forces OPQ + IVF + PQ)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--autofaiss-python", default="/work/venv-autofaiss/bin/python")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
        kb = make_kb(Path(tmp) / "kb", args.n, centres, rng)
        queries = next(clustered(args.queries, centres, rng))  # fresh vectors from the same distribution
        database = kb.image_embeddings()
        _, truth = knn_ground_truth(queries, (database[lo:lo + 100_000] for lo in range(0, args.n, 100_000)), 10,
                                    faiss.METRIC_INNER_PRODUCT)
        truth_ids = kb.ids()[truth]
        print(f"\n{args.n} x {args.dim} clustered vectors, {args.queries} queries, recall@10 vs exact, "
              f"{faiss.omp_get_max_threads()} threads")
        print(f"{'who':10s} {'budget':>7s} {'factory':34s} {'params':32s} {'recall@10':>9s} {'ms/query':>9s} "
              f"{'build s':>8s} {'MiB':>7s}", flush=True)
        for budget in args.budgets.split(","):
            infos = build_index(kb, "image", memory_budget=budget, target_recall=0.95, k=10)
            recall, latency = measure(load_index(kb, "image"), queries, truth_ids)
            rows.append(("react-vl", budget, infos["factory"], infos["params"], recall, latency, infos["build_s"],
                         infos["size_bytes"]))
            print_row(*rows[-1])

            af_index = Path(tmp) / "autofaiss.index"
            out = subprocess.run([args.autofaiss_python, "-c", AUTOFAISS_BUILD, str(kb.path / "img_emb"),
                                  str(af_index), str(Path(tmp) / "af.json"), f"{parse_size(budget)}B"],
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
