"""Retrieve benchmark: results/s and peak memory at 20k, 200k and 2M results from a 2.5M-pair, 512-d KB.

    nice -n 10 python benchmarks/bench_retrieve.py                       # the three sizes
    nice -n 10 python benchmarks/bench_retrieve.py --results 20000,200000 --work /tmp/bench_kb

A synthetic LAION-style KB (512-d float16 embeddings in parts of 100k, explicit ids) is made
once in --work and reused: for each of the task's queries (1000 made-up classes x 2 templates,
encoded by an untrained 512-d mini-vit) 1,100 pairs whose image and caption lie near it, 5% of
those again as near-duplicate images under other ids, and unrelated pairs in random directions.
Each class so holds ~2,200 distinct pairs (plus duplicates), so 2M results (2,000 per class)
are possible, which they are not from a KB of exactly 2M pairs once duplicates go. Indexes are
IVF256,Flat tuned for recall@10, so retrieve re-tunes them at its k.

Each size runs `retrieve` (both modes, near-duplicate removal on, per_class = results /
classes) in its own process, so its peak RSS is its own: VmHWM (which counts the pages of the
memory-mapped indexes it touched) and the peak of anonymous memory (sampled every 50 ms: what
the stage itself holds). Results per core-second use the process's CPU time; the paper's
figure is 10M results in under 10 minutes on 64 cores, ~260 per core-second.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa

MODEL, DIM = "bench-vit-512", 512
CLASSES, TEMPLATES = 1000, ("a photo of a {}.", "a drawing of a {}.")
PER_QUERY, DUPLICATES, NOISE, PART = 1100, 0.05, 190_000, 100_000
SPREAD = 0.015  # noise per coordinate: members ~0.95 cosine from their query, ~0.90 from each other
FACTORY = "IVF256,Flat"  # few cells: the indexes build in minutes on 2 cores
PAPER_PER_CORE_S = 10_000_000 / (10 * 60 * 64)


def register_model(work: Path):
    """mini-vit with 512-d embeddings (LAION's ViT-B size), as an open_clip model config."""
    config = json.loads((Path(__file__).parents[1] / "src/react_vl/model_configs/mini-vit.json").read_text())
    (work / "model").mkdir(parents=True, exist_ok=True)
    (work / "model" / f"{MODEL}.json").write_text(json.dumps({**config, "embed_dim": DIM}))
    open_clip.add_model_config(work / "model")


def bench_task():
    from react_vl.tasks import Task
    tokenizer = open_clip.get_tokenizer(MODEL)
    words = [w[:-4] for w in tokenizer.encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 7]
    rng = np.random.default_rng(0)
    return Task("bench", [" ".join(rng.choice(words, 3, replace=False)) for _ in range(CLASSES)], TEMPLATES)


def make_kb(kb_path: Path):
    """Write the KB part by part: pairs around the queries, their near-duplicates, unrelated pairs."""
    from react_vl.kb import KnowledgeBase, make_ids, write_info, write_part
    from react_vl.retrieve import encode_queries
    write_part(kb_path, 0, np.eye(1, DIM, dtype=np.float16), np.eye(1, DIM, dtype=np.float16),
               pa.table({"caption": ["probe"]}))
    write_info(kb_path, model=MODEL, pretrained=None, dim=DIM)
    _, _, queries = encode_queries(KnowledgeBase(kb_path), bench_task())
    rng = np.random.default_rng(1)
    relevant = len(queries) * PER_QUERY
    duplicated = rng.random(relevant) < DUPLICATES
    centre = np.concatenate([np.repeat(np.arange(len(queries)), PER_QUERY),
                             np.repeat(np.arange(len(queries)), PER_QUERY)[duplicated], np.full(NOISE, -1)])
    twin_of = np.concatenate([np.full(relevant, -1), np.flatnonzero(duplicated), np.full(NOISE, -1)])
    count = len(centre)
    image_of = {}  # relevant row -> its image, kept until its duplicate is written
    for part, lo in enumerate(range(0, count, PART)):
        rows = np.arange(lo, min(lo + PART, count))
        base = queries[np.maximum(centre[rows], 0)]
        unrelated = centre[rows] < 0
        base[unrelated] = rng.standard_normal((int(unrelated.sum()), DIM), dtype=np.float32)
        img, text = (base + SPREAD * rng.standard_normal((len(rows), DIM), dtype=np.float32) for _ in range(2))
        twins = twin_of[rows] >= 0
        if twins.any():
            img[twins] = np.stack([image_of.pop(r) for r in twin_of[rows][twins]]) \
                + 0.001 * rng.standard_normal((int(twins.sum()), DIM), dtype=np.float32)
        img, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, text))
        image_of.update({int(r): img[i] for i, r in enumerate(rows) if r < relevant and duplicated[r]})
        meta = pa.table({"key": [f"{part}-{i}" for i in range(len(rows))], "caption": [f"pair {r}" for r in rows],
                         "shard": [f"shard-{part:06d}.tar"] * len(rows), "id": make_ids(part, len(rows))})
        write_part(kb_path, part, img.astype(np.float16), text.astype(np.float16), meta)
        print(f"\rKB part {part} ({rows[-1] + 1:,} / {count:,} pairs)", end="", flush=True)
    write_info(kb_path, model=MODEL, pretrained=None, dim=DIM, dtype="float16", count=count)
    print()


def peak_anon(stop: threading.Event, peak: list):
    while not stop.wait(0.05):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)


def child(kb_path: Path, per_class: int, out: Path):
    """One retrieve run, measured from inside its own process; prints one JSON line."""
    from react_vl.retrieve import retrieve
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_anon, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = retrieve(kb_path, bench_task(), out, per_class=per_class)
    seconds = time.perf_counter() - start
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"per_class": per_class, "seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "vmhwm": int(status["VmHWM"].split()[0]) * 1024, "peak_anon": peak[0],
                      **{key: summary[key] for key in ("retrieved", "hits", "unique_candidates", "removed",
                                                       "short_classes", "stage_seconds", "search")}}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="20000,200000,2000000", help="target result counts, comma-separated")
    parser.add_argument("--work", default="/tmp/bench_retrieve", help="folder for the KB (reused) and the runs")
    parser.add_argument("--child", nargs=3, metavar=("KB", "PER_CLASS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    register_model(work)
    if args.child:
        return child(Path(args.child[0]), int(args.child[1]), Path(args.child[2]))

    from react_vl.index import build_index
    from react_vl.kb import KnowledgeBase
    kb_path = work / "kb"
    start = time.perf_counter()
    if "count" not in (json.loads((kb_path / "kb.json").read_text()) if (kb_path / "kb.json").exists() else {}):
        make_kb(kb_path)
    for kind in ("image", "text"):
        if not (kb_path / f"{kind}.index.json").exists():
            build_index(KnowledgeBase(kb_path), kind, memory_budget="16GB", factory=FACTORY, n_queries=200)
    print(f"KB and indexes ready in {time.perf_counter() - start:.0f} s")
    rows = []
    for target in (int(t) for t in args.results.split(",")):
        shutil.rmtree(work / f"r{target}", ignore_errors=True)  # a fresh run: no chunk files to resume from
        run = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", str(kb_path),
                              str(target // CLASSES), str(work / f"r{target}")], capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"retrieve of {target:,} results failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, len(KnowledgeBase(kb_path)))


def report(rows: list[dict], kb_size: int):
    print(f"\nKB {kb_size:,} pairs x {DIM}-d (float16), {CLASSES} classes x {len(TEMPLATES)} templates, both modes, "
          f"near-duplicates removed")
    print("| per class | hits | results | short classes | s | results/s | results per core-s | x paper | "
          "s per 1k results (search+filter+write) | peak RSS GiB | peak anon GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stages = r["stage_seconds"]
        variable = stages["search"] + stages["filter"] + stages["write"]
        print(f"| {r['per_class']:,} | {r['hits']:,} | {r['retrieved']:,} | {r['short_classes']['count']} | "
              f"{r['seconds']:.1f} | {r['retrieved'] / r['seconds']:,.0f} | {r['retrieved'] / r['cpu_s']:,.0f} | "
              f"{r['retrieved'] / r['cpu_s'] / PAPER_PER_CORE_S:.1f} | {1000 * variable / r['retrieved']:.3f} | "
              f"{r['vmhwm'] / 2**30:.2f} | {r['peak_anon'] / 2**30:.2f} |")
    first, last = rows[0], rows[-1]
    per_result = [r["seconds"] / r["retrieved"] for r in (first, last)]
    print(f"time per result, {last['retrieved']:,} vs {first['retrieved']:,} results: "
          f"{per_result[1] / per_result[0]:.2f}x (whole stage); peak anonymous memory "
          f"{last['peak_anon'] / first['peak_anon']:.1f}x for {last['retrieved'] / first['retrieved']:.0f}x the "
          f"results and {last['hits'] / first['hits']:.0f}x the hits")


if __name__ == "__main__":
    main()
