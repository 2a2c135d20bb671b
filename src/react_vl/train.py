"""Customize (or pretrain) a CLIP model on image-text webdataset shards: REACT's training stage.

    summary = train("SHARDS/", "mini-vit", "base/model.pt", "RUN/", strategy="gated-image", steps=300)
    torchrun --nproc-per-node 8 -m react_vl.cli customize SHARDS --model ViT-B-32 --pretrained openai --out RUN

What it writes: RUN/model.pt (loads with `load_model(None, "RUN/model.pt")`),
RUN/checkpoints/step_N.pt (the last few, for `resume`), RUN/log.jsonl (loss, lr, throughput,
every gate per layer), RUN/summary.json, RUN/curves.png.

The data stream is a pure function of (seed, position): every epoch reads the shards in a
seeded order through a seeded shuffle buffer, and micro-batch m is the samples at stream
positions [m*B, (m+1)*B). Each DDP rank decodes its own slice of that range, each loader worker
every n-th micro-batch, and a resumed run starts at the position where the checkpoint stopped.
So a resumed run, a run on 2 ranks and a run on 1 rank see the same global batches. Every rank
reads (but does not decode) the whole stream: cheap next to the model for image-text pairs.
Augmentation randomness is seeded per (micro-batch, rank) for the same reason.
"""

import contextlib
import io
import itertools
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
import webdataset as wds
from open_clip import image_transform
from open_clip.transform import AugmentationCfg
from PIL import Image
from tqdm import tqdm

from .gated import gate_values, gated_layers
from .loss import UniCLLoss, caption_ids
from .models import CHECKPOINT_META_KEY, save_model
from .strategies import GATED_STRATEGIES, build_model, set_trainable
from .utils import atomic_path, atomic_save, autocast_dtype, read_json, resolve_device, write_json

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
COUNT_KEYS = ("count", "samples", "num_samples")


@dataclass
class PaperAugmentationCfg(AugmentationCfg):
    """REACT's (UniCL's) training augmentation, through open_clip's timm path.

    open_clip's AugmentationCfg has no RandAugment field; the extra fields here are handed to
    timm's create_transform as they are. timm skips colour jitter under RandAugment unless
    forced. open_clip fixes hflip at 0 on this path (the paper used 0.5).
    """
    scale: tuple = (0.08, 1.0)
    color_jitter: float = 0.4
    re_prob: float = 0.25
    use_timm: bool = True
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    force_color_jitter: bool = True


# --- data --------------------------------------------------------------------------------------
def resolve_shards(spec) -> list[str]:
    """A directory (its *.tar), a brace pattern ("s-{000..009}.tar"), a glob, a file or a list."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in resolve_shards(s)]
    spec = str(spec)
    if Path(spec).is_dir():
        found = sorted(str(p) for p in Path(spec).glob("*.tar"))
    elif "{" in spec:
        found = list(wds.shardlists.expand_urls(spec))
    else:
        found = sorted(str(p) for p in Path().glob(spec)) if any(c in spec for c in "*?[") else [spec]
    missing = [u for u in found if not Path(u).is_file()]
    if not found or missing:
        raise FileNotFoundError(f"no shards found for {spec!r}" + (f" (missing: {missing[:3]})" if missing else ""))
    return found


class SkipCounter(Counter):
    """Counts samples and shards that were skipped, by reason (never fatal)."""

    def handler(self, err: Exception) -> bool:
        self[f"unreadable: {type(err).__name__}"] += 1
        return True

    def complete(self, sample: dict) -> bool:
        ok = "txt" in sample and any(e in sample for e in IMAGE_EXTS)
        if not ok:
            self["missing image or txt"] += 1
        return ok


def _epoch_samples(shards: list[str], seed: int, epoch: int, skipped: SkipCounter, buffer: int):
    """The raw (undecoded) samples of one epoch, in a seeded shard order and seeded shuffle."""
    order = list(shards)
    random.Random(f"{seed}-{epoch}-shards").shuffle(order)
    return wds.DataPipeline(
        wds.SimpleShardList(order),
        wds.tarfile_to_samples(handler=skipped.handler),
        wds.select(skipped.complete),
        wds.shuffle(buffer, initial=buffer, rng=random.Random(f"{seed}-{epoch}-buffer")),
    )


def count_samples(shards: list[str], spec=None) -> int:
    """Samples in a shard set: SHARDS/summary.json's count when there is one, else counted once."""
    summary = Path(str(spec)) / "summary.json" if spec is not None and Path(str(spec)).is_dir() else None
    if summary is not None and summary.is_file():
        counts = [read_json(summary).get(k) for k in COUNT_KEYS]
        if any(isinstance(c, int) for c in counts):
            return next(c for c in counts if isinstance(c, int))
    skipped = SkipCounter()
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=skipped.handler),
                                wds.select(skipped.complete))
    total = sum(1 for _ in tqdm(pipeline, desc="counting samples", unit=" samples", leave=False))
    if total == 0:
        raise ValueError(f"no readable image-text samples (an image and a .txt per key) in {len(shards)} "
                         f"shard(s): {shards[:3]}{' ...' if len(shards) > 3 else ''}; skipped: {dict(skipped)}")
    return total


def _positions(shards, count, seed, start, skipped, buffer):
    """(position, raw sample) from stream position `start` on, epoch after epoch, forever."""
    for epoch in itertools.count(start // count):
        first = start - epoch * count if epoch == start // count else 0
        for i, sample in enumerate(_epoch_samples(shards, seed, epoch, skipped, buffer)):
            if i >= count:
                break
            if i >= first:
                yield epoch * count + i, sample


class _Cursor:
    """Takes position ranges, in increasing order, from a (position, sample) stream."""

    def __init__(self, stream):
        self.stream, self.pending = stream, None

    def take(self, lo: int, hi: int) -> list[dict]:
        taken = []
        while True:
            if self.pending is None:
                self.pending = next(self.stream)
            position, sample = self.pending
            if position >= hi:
                return taken
            if position >= lo:
                taken.append(sample)
            self.pending = None


@dataclass
class Source:
    shards: list[str]
    count: int
    per_batch: int  # global samples per micro-batch from this source


class PairBatches(torch.utils.data.IterableDataset):
    """Decoded micro-batches (images, tokens, caption ids, skip counts) for one rank, from micro-batch `start` on."""

    def __init__(self, sources: list[Source], transform, tokenizer, seed: int, start: int,
                 rank: int = 0, world_size: int = 1, buffer: int = 1000):
        self.sources, self.transform, self.tokenizer = sources, transform, tokenizer
        self.seed, self.start, self.rank, self.world_size, self.buffer = seed, start, rank, world_size, buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skipped = SkipCounter()
        cursors = [_Cursor(_positions(s.shards, s.count, self.seed + 7919 * k, self.start * s.per_batch,
                                      skipped, self.buffer))
                   for k, s in enumerate(self.sources)]
        for micro in itertools.count(self.start + worker, workers):
            raw = []
            for source, cursor in zip(self.sources, cursors):
                local = source.per_batch // self.world_size
                lo = micro * source.per_batch + self.rank * local
                raw += cursor.take(lo, lo + local)
            _seed_everything(self.seed * 1_000_003 + micro * self.world_size + self.rank)
            images, captions = [], []
            for sample in raw:
                try:
                    ext = next(e for e in IMAGE_EXTS if e in sample)
                    image = self.transform(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
                    caption = sample["txt"].decode("utf-8").strip()
                except (OSError, ValueError) as err:  # truncated image, bad encoding
                    skipped[f"undecodable: {type(err).__name__}"] += 1
                    continue
                images.append(image)
                captions.append(caption)
            yield {"micro": micro, "images": torch.stack(images) if images else torch.empty(0),
                   "tokens": self.tokenizer(captions) if captions else torch.empty(0, dtype=torch.long),
                   "text_ids": caption_ids(captions), "skipped": dict(skipped)}
            skipped.clear()


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- optimisation ------------------------------------------------------------------------------
def learning_rate(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 0 (open_clip's and REACT's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def make_optimizer(model, lr: float, weight_decay: float, gate_lr_scale: float = 1.0):
    """AdamW; no weight decay on gains, biases, gates, logit scale (the 0-/1-d tensors)."""
    groups = {"decay": [], "no_decay": [], "gates": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_gate = name.rsplit(".", 1)[-1] in ("alpha_attn", "alpha_dense")
        groups["gates" if is_gate else "decay" if param.ndim >= 2 else "no_decay"].append(param)
    param_groups = [{"params": groups["decay"], "weight_decay": weight_decay, "lr_scale": 1.0},
                    {"params": groups["no_decay"], "weight_decay": 0.0, "lr_scale": 1.0},
                    {"params": groups["gates"], "weight_decay": 0.0, "lr_scale": gate_lr_scale}]
    # fused: one kernel for all tensors (7x faster than the per-tensor loop on a 2-core CPU)
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=True)


def attention_kernels(device: torch.device):
    """The scaled-dot-product-attention kernels a training step may use. On CPU only the plain
    math kernel: PyTorch's CPU flash-attention backward is slow at a ViT's short sequences (in
    mini-vit's 17 tokens, 8x its own forward); with the math kernel 60 gated-image steps of the
    demo took 31 s instead of 36-38 s, same loss (benchmarks/bench_customize.py compares the two
    as gated-image vs gated-image-flash). GPUs keep the fused kernels."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()


# --- checkpoints -------------------------------------------------------------------------------
def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def _save_checkpoint(run: Path, model, optimizer, scaler, step: int, meta: dict, keep: int):
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    atomic_save({"trainable": trainable, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, CHECKPOINT_META_KEY: meta},
                run / "checkpoints" / f"step_{step}.pt")
    for old in _checkpoints(run)[:-keep]:
        old.unlink()


def _load_checkpoint(path: Path, model, optimizer, scaler, meta: dict) -> int:
    """Restore a checkpoint of this very run setup; say what differs when it is another's."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    theirs = ckpt.get(CHECKPOINT_META_KEY, {})
    for key in ("model", "strategy", "gated_layers", "batch_size", "train_logit_scale"):
        if theirs.get(key) != meta[key]:
            raise ValueError(f"checkpoint {path} was written by another run setup: {key} is "
                             f"{theirs.get(key)!r} there, {meta[key]!r} here; resume with the same options")
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(ckpt["trainable"]) != trainable:
        raise ValueError(f"checkpoint {path} holds other trainable weights than this model "
                         f"({len(ckpt['trainable'])} vs {len(trainable)} tensors)")
    with torch.no_grad():
        for name, value in ckpt["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["step"])


# --- logging -----------------------------------------------------------------------------------
def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run / "tensorboard"))


def _restart_log(path: Path, keep_until: int):
    """On resume, drop log lines past the checkpoint's step (they will be written again)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_until]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))


def plot_curves(log_path: Path, out_png: Path):
    """Loss curve and every gate (tanh alpha) per layer against the step, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln]
    steps = [r["step"] for r in records]
    has_gates = bool(records and records[-1]["gates"])
    fig, axes = plt.subplots(1, 2 if has_gates else 1, figsize=(11 if has_gates else 6, 4), squeeze=False)
    axes[0][0].plot(steps, [r["loss"] for r in records])
    axes[0][0].set(xlabel="step", ylabel="contrastive loss", title="training loss")
    if has_gates:
        for layer in records[-1]["gates"]:
            for kind, style in (("attn", "-"), ("dense", "--")):
                axes[0][1].plot(steps, [r["gates"][layer][kind] for r in records], style, label=f"layer {layer} {kind}")
        axes[0][1].set(xlabel="step", ylabel="tanh(alpha)", title="gates per layer")
        axes[0][1].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --- the run -----------------------------------------------------------------------------------
def _distributed(device_spec: str | None):
    """(rank, world_size, device) from torchrun's environment; gloo on CPU, nccl on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_spec)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def train(shards, model_name: str | None, pretrained: str | None, out, *, strategy: str = "gated-image",
          steps: int | None = None, epochs: float = 1.0, batch_size: int = 64, lr: float | None = None,
          weight_decay: float = 0.05, warmup: int | None = None, accum_steps: int = 1, grad_clip: float = 1.0,
          precision: str = "auto", augment: bool = False, gated_layers_spec: list[int] | int | None = None,
          train_logit_scale: bool = True, gate_lr_scale: float = 1.0, mix_shards=None, mix_ratio: float = 0.0,
          checkpoint_every: int = 100, keep_checkpoints: int = 3, resume: str | None = None,
          log_every: int = 10, seed: int = 0, workers: int = 1, shuffle_buffer: int = 1000,
          device: str | None = "auto") -> dict:
    """Train `strategy`'s weights of `model_name` (weights from `pretrained`, random if None) on `shards`.

    `batch_size` is the global batch of one micro-step (all ranks); an optimizer step takes
    `accum_steps` of them. `steps` (optimizer steps) overrides `epochs` over the shard set.
    `lr` defaults to 5e-4 for gated strategies and for training from random init, 5e-5 when
    tuning pretrained base weights (the paper's values). `warmup` defaults to 5% of the steps.
    `mix_shards` / `mix_ratio`: that share of every batch comes from a second (general) shard
    set, to bound forgetting. `resume`: a checkpoint path, or "latest": the newest in
    RUN/checkpoints if there is one, else a fresh start.
    Returns the summary that is also written to RUN/summary.json.
    """
    run = Path(out)
    rank, world_size, device = _distributed(device)
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes {world_size}")
    if not 0 <= mix_ratio < 1:
        raise ValueError(f"--mix-ratio must be in [0, 1), got {mix_ratio}")
    mix_per_batch = world_size * round(mix_ratio * batch_size / world_size) if mix_shards else 0
    main_per_batch = batch_size - mix_per_batch
    shard_list = resolve_shards(shards)
    sources = [Source(shard_list, count_samples(shard_list, shards), main_per_batch)]
    if mix_per_batch:
        mix_list = resolve_shards(mix_shards)
        sources.append(Source(mix_list, count_samples(mix_list, mix_shards), mix_per_batch))
    total_steps = steps or max(1, math.ceil(epochs * sources[0].count / (main_per_batch * accum_steps)))
    lr = lr if lr is not None else 5e-4 if strategy in GATED_STRATEGIES or pretrained is None else 5e-5
    warmup = warmup if warmup is not None else max(1, round(0.05 * total_steps))

    torch.manual_seed(seed)  # the same random init (and gated blocks) on every rank
    model, preprocess, tokenizer = build_model(model_name, pretrained, strategy, gated_layers_spec, device=device)
    model_name = model.react_vl["model"]
    counts = set_trainable(model, strategy, train_logit_scale)
    transform = image_transform(model.visual.image_size, is_train=True,
                                aug_cfg=PaperAugmentationCfg()) if augment else preprocess
    optimizer = make_optimizer(model, lr, weight_decay, gate_lr_scale)
    amp_dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    args = {"shards": str(shards), "model": model_name, "pretrained": pretrained, "strategy": strategy,
            "steps": total_steps, "batch_size": batch_size, "accum_steps": accum_steps, "lr": lr,
            "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip, "precision": precision,
            "augment": augment, "train_logit_scale": train_logit_scale, "gate_lr_scale": gate_lr_scale,
            "mix_shards": str(mix_shards) if mix_shards else None, "mix_ratio": mix_ratio, "seed": seed,
            "world_size": world_size}
    meta = {"model": model_name, "pretrained": pretrained, "strategy": strategy,
            "gated_layers": gated_layers(model), "batch_size": batch_size,
            "train_logit_scale": train_logit_scale, "args": args}

    start = 0
    found = _checkpoints(run)
    if resume == "latest" and not found:
        resume = None  # nothing written yet: a fresh start (so "latest" is safe to pass always)
    if resume:
        path = Path(resume) if resume != "latest" else found[-1]
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {path} (given as --resume)")
        start = _load_checkpoint(path, model, optimizer, scaler, meta)
    if rank == 0:
        print(f"[customize] {model_name} strategy={strategy}: trainable {counts['trainable']:,} / "
              f"{counts['total']:,} parameters ({100 * counts['trainable'] / counts['total']:.1f}%); "
              f"{sources[0].count:,} samples, {total_steps} steps, global batch {batch_size}"
              f"{f' ({mix_per_batch} mixed in)' if mix_per_batch else ''}, lr {lr:g}, "
              f"autocast {amp_dtype or 'off'}, {world_size} process(es) on {device}", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        _restart_log(run / "log.jsonl", start if resume else -1)

    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = UniCLLoss(rank, world_size)
    batches = iter(torch.utils.data.DataLoader(
        PairBatches(sources, transform, tokenizer, seed, start * accum_steps, rank, world_size, shuffle_buffer),
        batch_size=None, num_workers=workers, persistent_workers=False))
    writer = _tensorboard(run) if rank == 0 else None
    skipped, seen, losses = Counter(), 0, []
    progress = tqdm(total=total_steps, initial=start, desc="customize", unit="step", disable=rank != 0)
    started = interval_start = time.time()
    interval_samples = 0
    model.train()
    for step in range(start, total_steps):
        lr_now = learning_rate(step, lr, warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group["lr_scale"]
        step_loss = 0.0
        for micro in range(accum_steps):
            batch = next(batches)
            skipped.update(batch["skipped"])
            images, tokens, text_ids = batch["images"], batch["tokens"], batch["text_ids"]
            if world_size > 1:  # a corrupt sample shortens one rank's batch: all ranks use the shortest
                size = torch.tensor(len(images))
                dist.all_reduce(size, op=dist.ReduceOp.MIN)
                images, tokens, text_ids = images[:size], tokens[:size], text_ids[:size]
            if len(images) == 0:
                raise ValueError(f"empty batch at step {step}: the shards ran out of decodable samples "
                                 f"(skipped so far: {dict(skipped)})")
            torch.manual_seed(seed + step * accum_steps + micro)  # dropout etc., identical on resume
            sync = world_size == 1 or micro == accum_steps - 1
            with attention_kernels(device):  # backward too: a checkpointed block recomputes its forward
                with (net.no_sync() if not sync else contextlib.nullcontext()), \
                        torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    image_features, text_features, logit_scale = net(images.to(device), tokens.to(device))[:3]
                    loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float(),
                                   text_ids.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step} (lr {lr_now:.3g}); the finished checkpoints in "
                        f"{run / 'checkpoints'} are kept: lower --lr, or use --precision fp32, and --resume latest")
                scaler.scale(loss * loss_fn.gradient_scale / accum_steps).backward()
            step_loss += loss.item() / accum_steps
            seen += len(images) * world_size
            interval_samples += len(images) * world_size
        scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(step_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}")
        done = step + 1
        if rank == 0 and (done % log_every == 0 or done == total_steps or done == start + 1):
            now = time.time()
            record = {"step": done, "epoch": done * main_per_batch * accum_steps / sources[0].count,
                      "loss": step_loss, "lr": lr_now, "samples_per_s": interval_samples / max(now - interval_start, 1e-9),
                      "logit_scale": float(model.logit_scale.detach().exp()),
                      "gates": {str(k): v for k, v in gate_values(model).items()} if gated_layers(model) else {}}
            with open(run / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            if writer:
                writer.add_scalar("loss", step_loss, done)
                writer.add_scalar("lr", lr_now, done)
                for layer, gates in record["gates"].items():
                    for kind, value in gates.items():
                        writer.add_scalar(f"gates/{layer}_{kind}", value, done)
            interval_start, interval_samples = now, 0
        if rank == 0 and (done % checkpoint_every == 0 or done == total_steps):
            _save_checkpoint(run, model, optimizer, scaler, done, meta, keep_checkpoints)
    progress.close()
    del batches  # stops the loader workers
    elapsed = time.time() - started

    summary = {"steps": total_steps, "start_step": start, "time_s": elapsed,
               "samples_per_s": seen / max(elapsed, 1e-9), "samples_seen": seen,
               "trainable_params": counts["trainable"], "total_params": counts["total"],
               "strategy": strategy, "model": model_name, "gated_layers": gated_layers(model),
               "final_gates": gate_values(model) if gated_layers(model) else {},
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "losses": losses, "dataset_count": sources[0].count, "skipped": dict(skipped), "args": args}
    if rank == 0:
        save_model(run / "model.pt", model, model_name, pretrained=pretrained, strategy=strategy, args=args)
        write_json(summary, run / "summary.json")
        plot_curves(run / "log.jsonl", run / "curves.png")
        if writer:
            writer.close()
    if world_size > 1:
        dist.barrier()
    return summary
