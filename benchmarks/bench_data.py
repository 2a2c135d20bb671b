"""Training data stream: bytes read per epoch across ranks and workers, and loader vs model speed.

    nice -n 10 python benchmarks/bench_data.py                    # 2 ranks x 2 workers, 8 shards
    nice -n 10 python benchmarks/bench_data.py --shards 16 --per-shard 500 --batch 64

1. Bytes: `torchrun --nproc-per-node RANKS` (CPU, gloo) reads one epoch of a generated shard set
   through the trainer's own stream (react_vl.train_data: StreamChunks in WORKERS DataLoader
   workers per rank, assembled as RankBatches does). Every process (ranks and workers) reports
   its /proc/self/io `rchar` (bytes through read() syscalls, page cache included, so a cached
   file counts as read) from the start of its stream to the epoch's last chunk (a rank's own
   count is taken before its workers exit, since Linux adds a reaped child's count to its parent's). Their sum over
   the shard bytes on disk is the ratio (target <= 1.05; the old trainer: 4.0 at 2 ranks x 1 worker).
   The keys read are checked: every sample once.
2. Speed, one process, side by side: samples/s of the loader alone (RankBatches with the
   default workers, decoding and preprocessing for mini-vit, no model) against samples/s of a
   gated-image mini-vit training step on one batch already in memory, and of the real trainer
   (react_vl.train.train) on the same shards.
"""

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rchar() -> int:
    with open("/proc/self/io") as io_file:
        return next(int(line.split()[1]) for line in io_file if line.startswith("rchar:"))


def write_shards(out: Path, shards: int, per_shard: int, size: int = 96) -> int:
    """JPEG scenes (noise and a shape) with captions, plus summary.json; returns the shard bytes."""
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for s in range(shards):
        names.append(f"shard-{s:06d}.tar")
        with wds.TarWriter(str(out / names[-1])) as sink:
            for i in range(per_shard):
                pixels = np.random.default_rng(s * per_shard + i).integers(0, 255, (size, size, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                colour = tuple(rng.randrange(256) for _ in range(3))
                ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=colour)
                jpeg = io.BytesIO()
                image.save(jpeg, "JPEG", quality=90)
                sink.write({"__key__": f"s{s}_{i:06d}", "jpg": jpeg.getvalue(), "txt": f"a shape of colour {colour}"})
    (out / "summary.json").write_text(json.dumps({"count": shards * per_shard, "shards": names}))
    return sum((out / n).stat().st_size for n in names)


def read_one_epoch(shards: str, batch: int, workers: int, out: str):
    """Under torchrun: this rank's streams for one epoch; writes bytes read per process and the keys."""
    import torch
    from open_clip import create_model_and_transforms, get_tokenizer

    from react_vl.distributed import init_distributed
    import react_vl.models  # noqa: F401 - registers mini-vit with open_clip
    from react_vl.train_data import Source, StreamChunks, open_shard_set

    env = init_distributed("cpu")
    shard_set = open_shard_set(shards, env)
    _, _, preprocess = create_model_and_transforms("mini-vit")
    micro_batches = shard_set.count // batch

    class CountingChunks(StreamChunks):
        """The trainer's stream; the epoch's last chunk carries this process's bytes read."""

        def __iter__(self):
            start = _rchar()
            for n, chunk in enumerate(super().__iter__(), 1):
                if n == micro_batches:
                    chunk["rchar"] = _rchar() - start
                    yield chunk
                    return
                yield chunk

    dataset = CountingChunks([Source(shard_set, batch)], preprocess, get_tokenizer("mini-vit"), seed=0, start=0,
                             cursors=[{}], rank=env.rank, world_size=env.world_size, workers=workers)
    main_start = _rchar()
    started = time.perf_counter()
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))
    chunks = [next(loader) for _ in range(micro_batches * workers)]
    main_rchar = _rchar() - main_start  # before the workers exit: a reaped child's reads are added to its parent's
    seconds = time.perf_counter() - started
    del loader
    record = {"rank": env.rank, "main_rchar": main_rchar, "seconds": seconds,
              "worker_rchar": [c["rchar"] for c in chunks if "rchar" in c],
              "keys": [k for c in chunks for k in c["keys"]]}
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))
    env.close()


def bytes_per_epoch(folder: Path, shard_bytes: int, args) -> dict:
    port = __import__("socket").create_server(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
                    "--master-port", str(free), __file__, "--read-epoch", str(folder / "shards"), str(args.batch),
                    str(args.workers), str(folder)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    keys = [k for r in ranks for k in r["keys"]]
    total = sum(r["main_rchar"] + sum(r["worker_rchar"]) for r in ranks)
    return {"processes": [(r["main_rchar"], r["worker_rchar"]) for r in ranks], "bytes_read": total,
            "shard_bytes": shard_bytes, "ratio": total / shard_bytes, "samples": len(keys),
            "distinct": len(set(keys)), "epoch_s": max(r["seconds"] for r in ranks)}


def speeds(folder: Path, args) -> dict:
    """samples/s: loader alone, a gated-image mini-vit step on an in-memory batch, the real trainer."""
    import open_clip
    import torch

    from react_vl.distributed import init_distributed
    from react_vl.loss import UniCLLoss
    from react_vl.strategies import build_model, set_trainable
    from react_vl.train import TrainConfig, attention_kernels, default_workers, make_optimizer, train
    from react_vl.train_data import RankBatches, Source, open_shard_set
    from react_vl.utils import autocast_dtype

    env = init_distributed("cpu")
    shard_set = open_shard_set(folder / "shards", env)
    workers = default_workers([shard_set], 1)
    _, _, preprocess = open_clip.create_model_and_transforms("mini-vit")
    batches = RankBatches([Source(shard_set, args.batch)], preprocess, open_clip.get_tokenizer("mini-vit"), seed=0,
                          start=0, workers=workers)
    batch = batches.next()  # workers started
    started = time.perf_counter()
    for _ in range(args.steps):
        batches.next()
    loader = args.steps * args.batch / (time.perf_counter() - started)
    batches.close()

    torch.manual_seed(0)
    model, _, _ = build_model("mini-vit", None, "gated-image")
    set_trainable(model, "gated-image")
    optimizer, loss_fn = make_optimizer(model, 1e-4, 0.05), UniCLLoss()
    dtype = autocast_dtype("auto", torch.device("cpu"))
    model.train()
    timings = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with attention_kernels(torch.device("cpu")), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            image_features, text_features, scale = model(batch["images"], batch["tokens"])[:3]
            loss_fn(image_features.float(), text_features.float(), scale.float(), batch["text_ids"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    step = args.batch / (sum(timings[1:]) / args.steps)
    summary = train(TrainConfig(folder / "shards", folder / "run", model="mini-vit", steps=args.steps + 2,
                                batch_size=args.batch, workers=workers, log_every=1000, checkpoint_every=1000))
    return {"workers": workers, "loader_samples_per_s": loader, "step_samples_per_s": step,
            "trainer_samples_per_s": summary["samples_per_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64, help="global batch (a multiple of ranks x workers)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank for the bytes run")
    parser.add_argument("--steps", type=int, default=10, help="timed batches / steps for the speeds")
    parser.add_argument("--read-epoch", nargs=4, default=None, help=argparse.SUPPRESS)  # internal, under torchrun
    args = parser.parse_args()
    if args.read_epoch:
        shards, batch, workers, out = args.read_epoch
        read_one_epoch(shards, int(batch), int(workers), out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shard_bytes = write_shards(folder / "shards", args.shards, args.per_shard)
        io_result = bytes_per_epoch(folder, shard_bytes, args)
        print(f"bytes read in one epoch, {args.ranks} ranks x {args.workers} workers, {args.shards} shards: "
              f"{io_result['bytes_read'] / 2**20:.2f} MiB of {shard_bytes / 2**20:.2f} MiB of shards = "
              f"{io_result['ratio']:.3f}x; samples {io_result['samples']} ({io_result['distinct']} distinct) "
              f"of {args.shards * args.per_shard}; per process (main, [workers]) bytes: {io_result['processes']}")
        rates = speeds(folder, args)
        print(f"one process, batch {args.batch}, {rates['workers']} loader workers: loader alone "
              f"{rates['loader_samples_per_s']:.0f} samples/s, gated-image mini-vit step "
              f"{rates['step_samples_per_s']:.0f} samples/s (loader / step = "
              f"{rates['loader_samples_per_s'] / rates['step_samples_per_s']:.2f}x), real trainer "
              f"{rates['trainer_samples_per_s']:.0f} samples/s")


if __name__ == "__main__":
    main()
