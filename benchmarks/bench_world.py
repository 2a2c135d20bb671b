"""Mini-world generation speed: pairs/s at 64x64, one process and one per core, side by side.

    python benchmarks/bench_world.py [--pairs 4000]

Target: >= 1,000 pairs/s per core. Besides wall-clock rates it prints pairs per CPU-second
(this process and its workers), which stays meaningful when other jobs share the cores.
"""

import argparse
import os
import resource
import tempfile
import time

from react_vl.world import WorldConfig, generate_world


def _cpu_seconds() -> float:
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def measure(pairs: int, workers: int) -> dict:
    config = WorldConfig(pretrain_size=pairs, kb_size=0, eval_size=0, shard_size=max(1, pairs // (4 * workers)),
                         workers=workers)
    with tempfile.TemporaryDirectory() as out:
        cpu, wall = _cpu_seconds(), time.perf_counter()
        generate_world(out, config)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return {"workers": workers, "pairs_per_s": pairs / wall, "per_core": pairs / wall / workers,
            "per_cpu_second": pairs / cpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000, help="pairs generated per measurement")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{args.pairs} pairs at 64x64; {cores} cores; load average {os.getloadavg()[0]:.1f}")
    rows = [measure(args.pairs, 1), measure(args.pairs, cores)]
    print(f"{'workers':>8} {'pairs/s':>10} {'per core':>10} {'per CPU-s':>10}")
    for row in rows:
        print(f"{row['workers']:>8} {row['pairs_per_s']:>10.0f} {row['per_core']:>10.0f} "
              f"{row['per_cpu_second']:>10.0f}")
    print(f"speed-up with {cores} workers: {rows[1]['pairs_per_s'] / rows[0]['pairs_per_s']:.2f}x "
          f"(target: >= 1,000 pairs/s per core)")


if __name__ == "__main__":
    main()
