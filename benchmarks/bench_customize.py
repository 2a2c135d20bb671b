"""Step time and peak memory of the customization strategies, measured side by side in one run.

    nice -n 10 python benchmarks/bench_customize.py                      # ViT-B-32 and mini-vit
    nice -n 10 python benchmarks/bench_customize.py --models mini-vit --steps 5

Variants, all one training step of the trainer's own pieces (build_model, set_trainable,
make_optimizer, UniCLLoss, autocast) on random images and captions of the model's size:
  full               every weight trains
  locked-text        the image tower trains
  gated-image        only the gated blocks train (react-vl, no activation checkpointing)
  gated-image-ckpt   the same with every gated block wrapped in activation checkpointing,
                     as the public REACT code does
  gated-image-graph  gated-image with an input that requires grad, so autograd records the
                     frozen layers in front of the gated blocks too: what the no-graph prefix saves
  gated-image-flash  gated-image with PyTorch's default attention kernels (flash attention on
                     CPU) instead of the trainer's choice (train.attention_kernels: math on CPU)
Each variant runs in a fresh subprocess. Training memory is the process's peak resident set
size over the steps (Linux VmHWM, reset through /proc/self/clear_refs once the model is built)
minus its resident size at that moment: gradients, optimizer state and activations. glibc is
told to return every large block to the system on free (MALLOC_MMAP_THRESHOLD_), so freed
activations do not hide in the heap. Time per step is the median of the timed steps after one
warm-up step. The target: gated-image <= 0.6x full in both.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("full", "locked-text", "gated-image", "gated-image-ckpt", "gated-image-graph", "gated-image-flash")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(model_name: str, variant: str, batch: int, steps: int, precision: str) -> dict:
    """One variant in this process: median step seconds and the peak memory one step adds."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from react_vl.loss import UniCLLoss
    from react_vl.strategies import build_model, set_trainable
    from react_vl.train import attention_kernels, make_optimizer
    from react_vl.utils import autocast_dtype

    torch.manual_seed(0)
    strategy = variant.removesuffix("-ckpt").removesuffix("-graph").removesuffix("-flash")
    model, _, tokenizer = build_model(model_name, None, strategy)
    counts = set_trainable(model, strategy)
    if variant.endswith("-ckpt"):
        for block in model.visual.transformer.resblocks:
            if hasattr(block, "gated_attn_block"):
                gated = block.gated_attn_block
                gated.forward = lambda x, f=gated.forward: checkpoint(f, x, use_reentrant=False)
    optimizer = make_optimizer(model, 1e-4, 0.05)
    loss_fn = UniCLLoss()
    dtype = autocast_dtype(precision, torch.device("cpu"))
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, requires_grad=variant.endswith("-graph"))
    tokens = tokenizer([f"a photo of thing number {i}" for i in range(batch)])
    model.train()

    kernels = contextlib.nullcontext if variant.endswith("-flash") else lambda: attention_kernels(torch.device("cpu"))

    def step():
        with kernels():  # backward too: checkpointed blocks recompute their forward
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                image_features, text_features, scale = model(images, tokens)[:3]
                loss = loss_fn(image_features.float(), text_features.float(), scale.float())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak RSS to the current RSS
    resident = _rss_kib("VmRSS")
    step()  # warm-up: allocates the optimizer state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"model": model_name, "variant": variant, "batch": batch, "precision": precision,
            "trainable": counts["trainable"], "total": counts["total"], "step_s": statistics.median(times),
            "train_peak_mib": (_rss_kib("VmHWM") - resident) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-32,mini-vit", help="comma-separated open_clip model names")
    parser.add_argument("--batch", default="ViT-B-32=8,mini-vit=64", help="batch per model, name=size pairs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--precisions", default="bf16,fp32", help="autocast precisions to compare")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: model,variant,batch,steps,precision
    args = parser.parse_args()
    if args.one:
        name, variant, batch, steps, precision = args.one.split(",")
        print(json.dumps(measure(name, variant, int(batch), int(steps), precision)))
        return

    batches = dict(pair.split("=") for pair in args.batch.split(","))
    print(f"{'model':10} {'prec':5} {'variant':18} {'trainable':>11} {'s/step':>8} {'x full':>7} "
          f"{'peak MiB':>9} {'x full':>7}")
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            full = None
            for variant in VARIANTS:  # "full" first: the rows after it are printed as ratios to it
                spec = ",".join([name, variant, batches.get(name, "8"), str(args.steps), precision])
                result = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True,
                                        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
                if result.returncode:
                    raise SystemExit(f"{spec} failed:\n{result.stderr[-2000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                full = full or row
                print(f"{name:10} {precision:5} {row['variant']:18} {row['trainable']:>11,} {row['step_s']:8.3f} "
                      f"{row['step_s'] / full['step_s']:7.2f} {row['train_peak_mib']:9.1f} "
                      f"{row['train_peak_mib'] / full['train_peak_mib']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
