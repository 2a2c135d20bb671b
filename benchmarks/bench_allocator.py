"""What the trainer's allocator setting on CPU (utils.keep_freed_memory) is worth, side by side.

    python benchmarks/bench_allocator.py                          # mini-vit, batch 128, full and gated-image
    python benchmarks/bench_allocator.py --strategies full --steps 20 --repeats 3 --json OUT/alloc.json

Each strategy is trained twice per repeat by the real trainer (`react_vl.train.train`, random
weights, bf16 autocast), each run in a fresh subprocess on the same shards of random images
(bench_customize.write_shards), alternating which arm goes first:
  kept   as shipped: the trainer tells glibc to keep freed blocks for reuse
  glibc  the trainer's call is replaced by a no-op, so glibc's default (its dynamic mmap
         threshold, at most 32 MiB) decides
Step time and CPU time per step (bench_customize.StepProbe: medians after the warm-up steps) and
the main process's minor page faults per timed step (median).
Printed: each run, then per strategy the median glibc/kept ratios over the repeats.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_customize import StepProbe, run_or_measure, write_shards  # noqa: E402


def measure(spec: dict) -> dict:
    """One run in this process."""
    import react_vl.train
    from react_vl.train_config import TrainConfig

    if spec["arm"] == "glibc":
        react_vl.train.keep_freed_memory = lambda: False
    from torch.optim.optimizer import register_optimizer_step_post_hook

    probe = StepProbe("cpu", batch_first=False)
    faults = []  # the main process's minor page faults so far, after every optimizer step
    register_optimizer_step_post_hook(lambda *_: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
    with tempfile.TemporaryDirectory() as run:
        react_vl.train.train(TrainConfig(
            spec["shards"], run, model=spec["model"], strategy=spec["strategy"], steps=spec["skip"] + spec["steps"],
            batch_size=spec["batch"], lr=1e-5, warmup=1, precision="bf16", log_every=10**6,
            checkpoint_every=10**6, workers=spec["workers"], device="cpu", seed=0))
    timed = faults[spec["skip"] - 1:]
    return {**spec, **probe.result(spec["skip"]), "faults_per_step": statistics.median(
        b - a for a, b in zip(timed, timed[1:]))}


def run_all(args) -> list[dict]:
    rows = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own defaults
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "shards", args.model, args.batch * 4, max(args.workers, 2))
        print(f"{args.model} on cpu, bf16, batch {args.batch}, {args.steps} timed steps after {args.skip}, "
              f"{args.workers} loader worker(s)\n{'strategy':12} {'arm':6} {'s/step':>7} {'cpu s':>7} "
              f"{'faults/step':>11}", flush=True)
        for repeat in range(args.repeats):
            for strategy in args.strategies.split(","):
                for arm in (("glibc", "kept") if repeat % 2 == 0 else ("kept", "glibc")):
                    spec = {"arm": arm, "strategy": strategy, "model": args.model, "shards": str(shards),
                            "batch": args.batch, "steps": args.steps, "skip": args.skip,
                            "workers": args.workers, "repeat": repeat}
                    result = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                                            capture_output=True, text=True, check=False)
                    if result.returncode:
                        raise SystemExit(f"{strategy} / {arm} failed:\n{result.stderr[-3000:]}")
                    rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                    row = rows[-1]
                    print(f"{strategy:12} {arm:6} {row['step_s']:7.3f} {row['cpu_s']:7.3f} "
                          f"{row['faults_per_step']:11,.0f}", flush=True)
    for strategy in args.strategies.split(","):
        pairs = [(g, k) for g in rows for k in rows if g["strategy"] == k["strategy"] == strategy
                 and g["repeat"] == k["repeat"] and g["arm"] == "glibc" and k["arm"] == "kept"]
        wall = statistics.median(g["step_s"] / k["step_s"] for g, k in pairs)
        cpu = statistics.median(g["cpu_s"] / k["cpu_s"] for g, k in pairs)
        print(f"{strategy}: glibc / kept step time {wall:.2f}x wall, {cpu:.2f}x CPU ({len(pairs)} repeat(s))")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini-vit", help="open_clip model name (random weights)")
    parser.add_argument("--strategies", default="full,gated-image", help="comma-separated")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps before them")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm per strategy")
    run_or_measure(parser, measure, run_all)


if __name__ == "__main__":
    main()
