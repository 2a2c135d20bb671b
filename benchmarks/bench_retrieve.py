"""Retrieve benchmark: time to retrieve ~100k results for a 100-class task, vs the bare FAISS searches.

    nice -n 10 python benchmarks/bench_retrieve.py            # 100 classes x 2 templates, 100k results
    nice -n 10 python benchmarks/bench_retrieve.py --kb-size 100000 --results 20000

A synthetic KB (clustered, normalised vectors of the test model's dimension, ids over several
parts) is indexed with `build_indexes`; `retrieve` then runs the whole stage (query encoding,
t2t + t2i search, merge by id, near-duplicate removal, per-class cap, parquet + summary). The
same searches alone are timed in the same run, so the ratio shows what the stage adds to FAISS.
The paper's reference point: 10M results in under 10 minutes (~17k results/s) on 64 cores.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from react_vl.index import build_indexes, load_index
from react_vl.kb import KnowledgeBase, make_ids, write_info, write_part
from react_vl.retrieve import encode_queries, retrieve
from react_vl.tasks import Task

MODEL = "mini-vit-test"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb-size", type=int, default=500_000, help="pairs in the synthetic KB")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--results", type=int, default=100_000, help="target results (per_class = results / classes)")
    args = parser.parse_args()
    task = Task("bench", [f"object {i}" for i in range(args.classes)], ["a photo of a {}.", "a drawing of a {}."])
    per_class = args.results // args.classes
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        kb_path = Path(tmp) / "kb"
        dim = 32  # mini-vit-test's embedding size
        write_part(kb_path, 0, np.eye(1, dim, dtype=np.float32), np.eye(1, dim, dtype=np.float32),
                   pa.table({"caption": ["probe"]}))
        write_info(kb_path, model=MODEL, pretrained=None, dim=dim)
        _, _, queries = encode_queries(KnowledgeBase(kb_path), task)
        # pairs scattered around the real query embeddings and elsewhere, in parts of 100k
        for part, lo in enumerate(range(0, args.kb_size, 100_000)):
            n = min(100_000, args.kb_size - lo)
            centres = np.concatenate([queries, rng.standard_normal((len(queries), dim)).astype(np.float32)])
            img, text = (centres[rng.integers(len(centres), size=n)] + 0.3 * rng.standard_normal((n, dim))
                         for _ in range(2))
            img, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, text))
            meta = pa.table({"key": [f"{part}-{i}" for i in range(n)], "caption": [f"pair {i}" for i in range(n)],
                             "shard": [f"shard-{part:06d}.tar"] * n, "id": make_ids(part, n)})
            write_part(kb_path, part, img.astype(np.float16), text.astype(np.float16), meta)
        write_info(kb_path, model=MODEL, pretrained=None, dim=dim, dtype="float16", count=args.kb_size)
        start = time.perf_counter()
        build_indexes(kb_path, n_queries=200)
        index_s = time.perf_counter() - start

        start = time.perf_counter()
        summary = retrieve(kb_path, task, Path(tmp) / "r", per_class=per_class)
        retrieve_s = time.perf_counter() - start

        kb = KnowledgeBase(kb_path)
        start = time.perf_counter()
        for kind in ("text", "image"):
            load_index(kb, kind).search(queries, per_class)
        search_s = time.perf_counter() - start

    print(f"\nKB {args.kb_size} pairs (indexes built in {index_s:.1f} s), task {args.classes} classes x "
          f"{len(task.templates)} templates, per_class {per_class}, mode both")
    print(f"retrieve: {summary['retrieved']} results from {summary['hits']} hits in {retrieve_s:.2f} s "
          f"({summary['retrieved'] / retrieve_s:,.0f} results/s); removed {summary['removed']}")
    print(f"bare FAISS searches (load + search, both indexes): {search_s:.2f} s; "
          f"stage / bare-search time ratio {retrieve_s / search_s:.1f}x")
    print(f"paper's rate ~17k results/s (10M in < 10 min on 64 cores); ours / paper's {summary['retrieved'] / retrieve_s / 16_667:.2f}")


if __name__ == "__main__":
    main()
