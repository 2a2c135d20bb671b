"""Step time and peak memory of the customization strategies through the real trainer, side by side.

    nice -n 10 python benchmarks/bench_customize.py                           # ViT-B-32, CPU, batch 16
    python benchmarks/bench_customize.py --model mini-vit --batch 64 --steps 4
    python benchmarks/bench_customize.py --device cuda --batch 256 --workers 8 --json OUT/bench.json

Every variant is one `react_vl.train.train` run (random weights) in a fresh subprocess, on the
same shard set of random images and captions, written once with a caption embedding per sample:
  full                     every weight trains
  locked-text              the image tower trains
  gated-image              only the gated blocks train (REACT's default), the locked text tower runs
  gated-image-cached       the same with the shards' caption embeddings instead of the text tower
  gated-image-ckpt         gated-image with --grad-checkpointing
  gated-image-batch-first  gated-image in open_clip's batch-first layout, which set_trainable's
                           models.sequence_first replaces (what that switch is worth; not in the
                           default list, name it in --variants)
  *-compile                with --compile: full and gated-image under torch.compile
The trainer is not changed; two global PyTorch hooks observe it. The first module forward (model
built, optimizer made) resets the peak: CPU /proc/self/clear_refs (VmHWM), CUDA
reset_peak_memory_stats, and notes the memory then. After every optimizer step the wall clock,
the process's CPU time (all its threads; the loader workers are other processes) and the peak so
far are read. Step time: median over the steps after the first `--skip`; peak training memory:
the peak over the run minus the memory at the first forward (gradients, optimizer state,
activations). glibc is told to return every large block to the system on free
(MALLOC_MMAP_THRESHOLD_), so freed activations do not hide in the heap. On a machine shared
with other jobs, CPU time per step is less disturbed than wall time.
The targets: gated-image <= 0.6x full in step time and <= 0.5x in peak memory.
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("full", "locked-text", "gated-image", "gated-image-cached", "gated-image-ckpt")
COMPILED = ("full-compile", "gated-image-compile")


def write_shards(folder: Path, model_name: str, samples: int, shards: int, seed: int = 0) -> Path:
    """`shards` webdataset shards of random JPEGs, captions and unit caption embeddings, with the
    summary.json (count, text_embeddings) that materialize writes."""
    import numpy as np
    import open_clip
    import webdataset as wds
    from PIL import Image

    import react_vl.models  # noqa: F401 - registers the package's model configs (mini-vit) with open_clip

    dim = open_clip.get_model_config(model_name)["embed_dim"]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(s, samples, shards):
                image = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image, format="jpeg")
                embedding = rng.standard_normal(dim).astype(np.float32)
                npy = io.BytesIO()
                np.save(npy, embedding / np.linalg.norm(embedding))
                sink.write({"__key__": f"{i:08d}", "jpg": image.getvalue(), "txt": f"a photo of thing {i % 97}",
                            "text_emb.npy": npy.getvalue()})
    record = {"model": model_name, "pretrained": None, "dim": dim, "text_tower_sha256": None}
    (folder / "summary.json").write_text(json.dumps({"count": samples, "text_embeddings": record}))
    return folder


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


class StepProbe:
    """Global hooks that read time and memory around the trainer's own steps."""

    def __init__(self, device: str, batch_first: bool):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.torch, self.cuda, self.batch_first = torch, device == "cuda", batch_first
        self.start_memory, self.peak, self.wall, self.cpu = None, 0, [], []
        self.hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self.first_forward),
                      register_optimizer_step_post_hook(self.after_step)]

    def memory(self, peak: bool) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() if peak else self.torch.cuda.memory_allocated()
        return 1024 * _rss_kib("VmHWM" if peak else "VmRSS")

    def first_forward(self, module, args):
        self.hooks.pop(0).remove()
        if self.batch_first:  # undo models.sequence_first: open_clip's own layout
            from open_clip.transformer import Transformer
            for m in module.modules():
                if isinstance(m, (Transformer, self.torch.nn.MultiheadAttention)):
                    m.batch_first = True
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # the peak resident size starts again from the current one
        self.start_memory = self.memory(peak=False)

    def after_step(self, optimizer, args, kwargs):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.peak = max(self.peak, self.memory(peak=True))

    def result(self, skip: int) -> dict:
        def per_step(clock):
            return statistics.median(b - a for a, b in zip(clock[skip - 1:], clock[skip:]))
        return {"step_s": per_step(self.wall), "cpu_s": per_step(self.cpu),
                "train_peak_mib": (self.peak - self.start_memory) / 2**20}


def measure(spec: dict) -> dict:
    """One variant in this process: a real training run, observed by a StepProbe."""
    from react_vl.train import train
    from react_vl.train_config import TrainConfig

    variant = spec["variant"]
    strategy = variant.removesuffix("-compile").removesuffix("-cached").removesuffix("-ckpt") \
        .removesuffix("-batch-first")
    probe = StepProbe(spec["device"], batch_first=variant.endswith("-batch-first"))
    with tempfile.TemporaryDirectory() as run:
        summary = train(TrainConfig(
            spec["shards"], run, model=spec["model"], strategy=strategy, steps=spec["skip"] + spec["steps"],
            batch_size=spec["batch"], lr=1e-5, warmup=1, precision=spec["precision"],
            text_embeddings=variant.endswith("-cached"), grad_checkpointing=variant.endswith("-ckpt"),
            torch_compile=variant.endswith("-compile"), log_every=10**6, checkpoint_every=10**6,
            workers=spec["workers"], device=spec["device"], seed=0))
    return {**spec, **probe.result(spec["skip"]), "trainable": summary["trainable_params"],
            "final_loss": summary["final_loss"]}


def _row(row: dict, full: dict) -> str:
    return (f"{row['variant']:24} {row['trainable']:>11,} {row['step_s']:8.3f} {row['step_s'] / full['step_s']:6.2f} "
            f"{row['cpu_s']:8.3f} {row['cpu_s'] / full['cpu_s']:6.2f} {row['train_peak_mib']:9.1f} "
            f"{row['train_peak_mib'] / full['train_peak_mib']:6.2f}")


def run_all(args) -> list[dict]:
    """Every variant in its own subprocess, "full" first (the others are printed as ratios to it)."""
    variants = args.variants.split(",") + (list(COMPILED) if args.compile else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "shards", args.model, max(args.batch * 4, 64), max(args.workers, 4))
        print(f"{args.model} on {args.device}, {args.precision}, batch {args.batch}, {args.steps} timed steps "
              f"after {args.skip}; {args.workers} loader worker(s)\n"
              f"{'variant':24} {'trainable':>11} {'s/step':>8} {'x full':>6} {'cpu s':>8} {'x full':>6} "
              f"{'peak MiB':>9} {'x full':>6}", flush=True)
        for variant in variants:
            spec = {"variant": variant, "model": args.model, "shards": str(shards), "batch": args.batch,
                    "steps": args.steps, "skip": args.skip + variant.endswith("-compile"),
                    "precision": args.precision, "device": args.device, "workers": args.workers}
            result = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=False,
                                    capture_output=True, text=True,
                                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            if result.returncode:
                raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(_row(rows[-1], rows[0]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--skip", type=int, default=1, help="warm-up steps before them (one more with --compile)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; the first is the reference")
    parser.add_argument("--compile", action="store_true", help="also full and gated-image under torch.compile")
    run_or_measure(parser, measure, run_all)


def run_or_measure(parser: argparse.ArgumentParser, measure, run_all):
    """A side-by-side benchmark's entry point: with --one SPEC (how run_all starts each run in a
    fresh subprocess) measure that one run and print it as JSON; else run them all, and with
    --json write their rows to that file."""
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run's spec, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    rows = run_all(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
