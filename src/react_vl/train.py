"""Customize (or pretrain) a CLIP model on image-text webdataset shards: REACT's training stage.

    summary = train(TrainConfig("SHARDS/", "RUN/", model="mini-vit", pretrained="base/model.pt", steps=300))
    torchrun --nproc-per-node 8 -m react_vl.cli customize SHARDS --model ViT-B-32 --pretrained openai --out RUN

What it writes: RUN/model.pt (loads with `load_model(None, "RUN/model.pt")`),
RUN/checkpoints/step_N.pt (the last few, for `resume`), RUN/log.jsonl (loss, lr, throughput,
every gate per layer), RUN/summary.json, RUN/curves.png. The checkpoints and the summary carry
`lineage`: per shard set trained on, the retrieved set it was materialized from and that set's
fingerprint (from SHARDS/summary.json; None for other shards), which `react-vl serve --runs` reads.

The data stream (react_vl.train_data) splits the shards over N = processes x loader workers
logical streams, so each byte is read once per epoch; the global batches depend on N only, and
a resumed run continues every stream where the checkpoint left it. With a locked text tower
(gated-image, locked-text) and shards that carry their captions' knowledge-base embeddings
(KEY.text_emb.npy, declared in SHARDS/summary.json), those embeddings are the text features
and the text tower does not run for them.
"""

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from open_clip import image_transform
from open_clip.transform import AugmentationCfg
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from .data import SkipLog
from .distributed import DistEnv, init_distributed
from .gated import gate_values, gated_layers
from .loss import UniCLLoss
from .models import CHECKPOINT_META_KEY, save_model, text_tower_fingerprint
from .strategies import (GATED_STRATEGIES, TRAINED_PARTS, build_model, check_strategy, set_grad_checkpointing,
                         set_trainable)
from .train_config import TrainConfig
from .train_data import RankBatches, ShardSet, Source, check_streams, open_shard_set
from .utils import atomic_path, atomic_save, autocast_dtype, keep_freed_memory, write_json


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


def default_workers(shard_sets: list[ShardSet], world_size: int) -> int:
    """min(8, CPUs per process on this node, the fewest shards per process of any shard set)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cpus = len(os.sched_getaffinity(0)) // per_node
    return max(1, min(8, cpus, min(len(s.shards) for s in shard_sets) // world_size))


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


def _save_checkpoint(run: Path, model, optimizer, scaler, step: int, meta: dict, cursors: list[dict], keep: int):
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    atomic_save({"trainable": trainable, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "data_cursors": cursors, CHECKPOINT_META_KEY: meta},
                run / "checkpoints" / f"step_{step}.pt")
    for old in _checkpoints(run)[:-keep]:
        old.unlink()


def _load_checkpoint(path: Path, model, optimizer, scaler, meta: dict) -> tuple[int, list[dict]]:
    """Restore a checkpoint of this very run setup; say what differs when it is another's.

    Returns the step and the data streams' cursors. The data streams must be as many as when it
    was written (processes x loader workers; how they split into the two does not matter).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    theirs = ckpt.get(CHECKPOINT_META_KEY, {})
    if theirs.get("streams") != meta["streams"]:
        was, now = theirs.get("args", {}), meta["args"]
        raise ValueError(f"checkpoint {path} was written with {was.get('world_size')} process(es) x "
                         f"{max(1, was.get('workers') or 0)} loader worker(s) = {theirs.get('streams')} data streams; "
                         f"this run has {now['world_size']} x {max(1, now['workers'])} = {meta['streams']}. "
                         f"Resume with as many streams "
                         f"(e.g. --workers {max(1, (theirs.get('streams') or 1) // now['world_size'])} on "
                         f"{now['world_size']} process(es)), so that every stream continues where it stopped")
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
    return int(ckpt["step"]), ckpt["data_cursors"]


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
@dataclass
class _Run:
    """What a training run holds between steps."""
    config: TrainConfig
    env: DistEnv
    model: torch.nn.Module
    net: torch.nn.Module  # the model as stepped: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: UniCLLoss
    batches: RankBatches
    sources: list[Source]
    amp_dtype: torch.dtype | None
    total_steps: int
    lr: float
    warmup: int
    meta: dict
    counts: dict
    start: int = 0
    skips: SkipLog = field(default_factory=SkipLog)
    losses: list = field(default_factory=list)
    seen: int = 0


def _sources(config: TrainConfig, env: DistEnv) -> tuple[list[Source], int]:
    """The shard sets with their per-batch shares, and the loader workers per rank."""
    if not 0 <= config.mix_ratio < 1:
        raise ValueError(f"--mix-ratio must be in [0, 1), got {config.mix_ratio}")
    sets = [open_shard_set(config.shards, env, config.train_num_samples, need_count=config.steps is None)]
    if config.mix_shards and config.mix_ratio:
        sets.append(open_shard_set(config.mix_shards, env, need_count=False))
    workers = config.workers if config.workers is not None else default_workers(sets, env.world_size)
    streams = env.world_size * max(1, workers)
    if config.batch_size % streams:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the data streams: "
                         f"{env.world_size} process(es) x {max(1, workers)} loader worker(s) = {streams}")
    mix = streams * round(config.mix_ratio * config.batch_size / streams) if len(sets) > 1 else 0
    locked_text = "text" not in TRAINED_PARTS[check_strategy(config.strategy)]
    sources = [Source(s, share, config.text_embeddings and locked_text and s.text_embeddings is not None)
               for s, share in zip(sets, (config.batch_size - mix, mix)) if share]
    check_streams(sources, streams, max(1, workers))
    return sources, workers


def check_text_embeddings(source: Source, model, model_name: str):
    """Refuse caption embeddings another text tower made (name, dimension or weights differ)."""
    record, spec = source.shard_set.text_embeddings, source.shard_set.spec
    dim = model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim
    theirs = (record.get("model"), record.get("dim"))
    if theirs != (model_name, dim):
        raise ValueError(f"{spec}: its caption embeddings (summary.json text_embeddings) are {theirs[1]}-d from "
                         f"{theirs[0]!r}; this run's text tower is {dim}-d {model_name!r}. Materialize the shards "
                         f"from a knowledge base of this model, or pass --no-text-embeddings to run the text tower")
    sha = record.get("text_tower_sha256")
    if sha is not None and sha != text_tower_fingerprint(model):
        raise ValueError(f"{spec}: its caption embeddings come from other {model_name} text-tower weights "
                         f"(sha256 {sha[:12]}..., this model's {text_tower_fingerprint(model)[:12]}...): "
                         f"materialize from a knowledge base embedded with this --pretrained, or pass "
                         f"--no-text-embeddings to run the text tower")


def _build(config: TrainConfig, env: DistEnv, sources: list[Source]):
    """The model, its trainable weights, transform, tokenizer, optimizer and AMP scaler."""
    lr = config.lr if config.lr is not None else \
        5e-4 if config.strategy in GATED_STRATEGIES or config.pretrained is None else 5e-5
    torch.manual_seed(config.seed)  # the same random init (and gated blocks) on every rank
    model, preprocess, tokenizer = build_model(config.model, config.pretrained, config.strategy,
                                               config.gated_layers, device=env.device)
    for source in sources:
        if source.use_text_embeddings:
            check_text_embeddings(source, model, model.react_vl["model"])
    counts = set_trainable(model, config.strategy, config.train_logit_scale)
    if config.grad_checkpointing:
        set_grad_checkpointing(model, True)
    transform = image_transform(model.visual.image_size, is_train=True,
                                aug_cfg=PaperAugmentationCfg()) if config.augment else preprocess
    optimizer = make_optimizer(model, lr, config.weight_decay, config.gate_lr_scale)
    amp_dtype = autocast_dtype(config.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    return model, counts, transform, tokenizer, optimizer, scaler, amp_dtype, lr


def _setup(config: TrainConfig) -> _Run:
    env = init_distributed(config.device)
    if env.device.type == "cpu":
        keep_freed_memory()  # before the loader workers fork, so they keep theirs too
    sources, workers = _sources(config, env)
    model, counts, transform, tokenizer, optimizer, scaler, amp_dtype, lr = _build(config, env, sources)
    main = sources[0]
    per_step = main.per_batch * config.accum_steps
    total_steps = config.steps or max(1, math.ceil(config.epochs * main.shard_set.count / per_step))
    warmup = config.warmup if config.warmup is not None else max(1, round(0.05 * total_steps))
    streams = env.world_size * max(1, workers)
    args = {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "model": model.react_vl["model"], "steps": total_steps, "lr": lr, "warmup": warmup,
            "shards": str(config.shards), "mix_shards": str(config.mix_shards) if config.mix_shards else None,
            "world_size": env.world_size, "workers": workers, "streams": streams,
            "text_embeddings_used": [s.shard_set.spec for s in sources if s.use_text_embeddings]}
    meta = {"model": args["model"], "pretrained": config.pretrained, "strategy": config.strategy,
            "gated_layers": gated_layers(model), "batch_size": config.batch_size,
            "train_logit_scale": config.train_logit_scale, "streams": streams, "args": args,
            "lineage": [{"shards": s.shard_set.spec, "retrieved": None, "fingerprint": None,
                         **(s.shard_set.lineage or {})} for s in sources]}
    start, cursors = _resume(config, model, optimizer, scaler, meta)
    net = model
    if env.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if config.torch_compile:
        net = torch.compile(net)
    batches = RankBatches(sources, transform, tokenizer, config.seed, start * config.accum_steps, env.rank,
                          env.world_size, workers, cursors, config.shuffle_buffer)
    loss_fn = UniCLLoss(env.rank, env.world_size, config.local_loss, config.gather_with_grad)
    run = _Run(config, env, model, net, optimizer, scaler, loss_fn, batches, sources, amp_dtype, total_steps,
               lr, warmup, meta, counts, start)
    if env.is_main:
        _announce(run, workers)
    return run


def _resume(config: TrainConfig, model, optimizer, scaler, meta: dict) -> tuple[int, list | None]:
    """(step, data-stream cursors) of the checkpoint to resume from; (0, None) for a fresh start."""
    found = _checkpoints(Path(config.out))
    if not config.resume or (config.resume == "latest" and not found):
        return 0, None  # nothing written yet: a fresh start (so "latest" is safe to pass always)
    path = Path(config.resume) if config.resume != "latest" else found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path} (given as --resume)")
    return _load_checkpoint(path, model, optimizer, scaler, meta)


def _announce(run: _Run, workers: int):
    config, counts, main = run.config, run.counts, run.sources[0]
    mixed = f" ({run.sources[1].per_batch} mixed in)" if len(run.sources) > 1 else ""
    cached = f"; caption embeddings from {run.meta['args']['text_embeddings_used']}" \
        if run.meta["args"]["text_embeddings_used"] else ""
    print(f"[customize] {run.meta['model']} strategy={config.strategy}: trainable {counts['trainable']:,} / "
          f"{counts['total']:,} parameters ({100 * counts['trainable'] / counts['total']:.1f}%); "
          f"{main.shard_set.count if main.shard_set.count is not None else '?'} samples in "
          f"{len(main.shard_set.shards)} shard(s), {run.total_steps} steps, global batch {config.batch_size}{mixed}, "
          f"lr {run.lr:g}, autocast {run.amp_dtype or 'off'}, {run.env.world_size} process(es) x "
          f"{workers or 'no'} loader worker(s) on {run.env.device}{cached}", flush=True)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    _restart_log(Path(config.out) / "log.jsonl", run.start if run.start else -1)


def _features(run: _Run, batch: dict):
    """(image features, text features, logit scale): the shards' caption embeddings where they have them."""
    device = run.env.device
    images, tokens = batch["images"].to(device), batch["tokens"].to(device)
    if batch["embeddings"] is None:
        return run.net(images, tokens)[:3]
    image_features, _, logit_scale = run.net(images, None)[:3]
    text_features = batch["embeddings"].to(device)
    missing = ~batch["has_embedding"].to(device)
    if missing.any():  # mixed-in general pairs without embeddings: the (locked) text tower, for them only
        with torch.no_grad():
            text_features[missing] = run.model.encode_text(tokens[missing], normalize=True).float()
    return image_features, text_features, logit_scale


def _micro_step(run: _Run, step: int, micro: int) -> float:
    """Forward and backward of one micro-batch; returns its loss."""
    config, env = run.config, run.env
    batch = run.batches.next()
    run.skips.update(batch["skipped"])
    size = env.min(len(batch["images"]))  # a corrupt sample shortens one rank's batch: all use the shortest
    if size == 0:
        raise ValueError(f"empty batch at step {step}: the shards ran out of decodable samples "
                         f"(skipped so far: {dict(run.skips.counts)})")
    batch = {k: v[:size] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    torch.manual_seed(config.seed + step * config.accum_steps + micro)  # dropout etc., identical on resume
    sync = not env.distributed or micro == config.accum_steps - 1
    with attention_kernels(env.device):  # backward too: a checkpointed block recomputes its forward
        with (run.net.no_sync() if not sync else contextlib.nullcontext()), \
                torch.autocast(env.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            image_features, text_features, logit_scale = _features(run, batch)
            loss = run.loss_fn(image_features.float(), text_features.float(), logit_scale.float(),
                               batch["text_ids"].to(env.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step}; the finished checkpoints in {Path(config.out) / 'checkpoints'} "
                f"are kept: lower --lr, or use --precision fp32, and --resume latest")
        run.scaler.scale(loss * run.loss_fn.gradient_scale / config.accum_steps).backward()
    run.seen += size * env.world_size
    return loss.item()


def _train_step(run: _Run, step: int) -> float:
    """One optimizer step (accum_steps micro-batches); returns its loss, averaged over ranks with --local-loss."""
    config = run.config
    lr_now = learning_rate(step, run.lr, run.warmup, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_now * group["lr_scale"]
    step_loss = sum(_micro_step(run, step, micro) for micro in range(config.accum_steps)) / config.accum_steps
    if run.loss_fn.local_loss and run.env.distributed:
        step_loss = sum(run.env.gather(step_loss)) / run.env.world_size
    run.scaler.unscale_(run.optimizer)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        run.model.logit_scale.clamp_(0, math.log(100))
    run.losses.append(step_loss)
    return step_loss


def _log_step(run: _Run, done: int, loss: float, samples_per_s: float, writer):
    count = run.sources[0].shard_set.count
    lr_now = learning_rate(done - 1, run.lr, run.warmup, run.total_steps)
    epoch = done * run.sources[0].per_batch * run.config.accum_steps / count if count else None
    record = {"step": done, "epoch": epoch,
              "loss": loss, "lr": lr_now, "samples_per_s": samples_per_s,
              "logit_scale": float(run.model.logit_scale.detach().exp()),
              "gates": {str(k): v for k, v in gate_values(run.model).items()} if gated_layers(run.model) else {}}
    with open(Path(run.config.out) / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    if writer:
        writer.add_scalar("loss", loss, done)
        writer.add_scalar("lr", lr_now, done)
        for layer, gates in record["gates"].items():
            for kind, value in gates.items():
                writer.add_scalar(f"gates/{layer}_{kind}", value, done)


def _finish(run: _Run, elapsed: float) -> dict:
    """Skip counts summed over ranks; model.pt, summary.json and curves.png from rank 0."""
    per_rank = run.env.gather(run.skips.to_dict())
    skips = SkipLog()
    for log in per_rank:
        skips.update(log)
    model, config = run.model, run.config
    summary = {"steps": run.total_steps, "start_step": run.start, "time_s": elapsed,
               "samples_per_s": run.seen / max(elapsed, 1e-9), "samples_seen": run.seen,
               "trainable_params": run.counts["trainable"], "total_params": run.counts["total"],
               "strategy": config.strategy, "model": run.meta["model"], "gated_layers": gated_layers(model),
               "final_gates": gate_values(model) if gated_layers(model) else {},
               "first_loss": run.losses[0] if run.losses else None,
               "final_loss": run.losses[-1] if run.losses else None, "losses": run.losses,
               "dataset_count": run.sources[0].shard_set.count,
               "skipped": {"total": skips.total(), "per_rank": [sum(log["counts"].values()) for log in per_rank],
                           **skips.to_dict()},
               "args": run.meta["args"], "lineage": run.meta["lineage"]}
    if run.env.is_main:
        out = Path(config.out)
        save_model(out / "model.pt", model, run.meta["model"], pretrained=config.pretrained, strategy=config.strategy,
                   args=run.meta["args"], lineage=run.meta["lineage"])
        write_json(summary, out / "summary.json")
        plot_curves(out / "log.jsonl", out / "curves.png")
    run.env.barrier()
    return summary


def train(config: TrainConfig) -> dict:
    """Train `config.strategy`'s weights of the model on `config.shards`; returns the summary that
    is also written to RUN/summary.json. Runs as it is under torchrun or srun (one process per GPU).

    `batch_size` is the global batch of one micro-step (all ranks); an optimizer step takes
    `accum_steps` of them. `mix_shards` / `mix_ratio`: that share of every batch comes from a
    second (general) shard set, to bound forgetting.
    """
    run = _setup(config)
    env, out = run.env, Path(config.out)
    writer = _tensorboard(out) if env.is_main else None
    progress = tqdm(total=run.total_steps, initial=run.start, desc=f"train ({config.strategy})", unit="step",
                    disable=not env.is_main)
    started = interval_start = time.time()
    interval_seen = 0
    run.model.train()
    for step in range(run.start, run.total_steps):
        loss = _train_step(run, step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if env.is_main and (done % config.log_every == 0 or done == run.total_steps or done == run.start + 1):
            now = time.time()
            _log_step(run, done, loss, (run.seen - interval_seen) / max(now - interval_start, 1e-9), writer)
            interval_start, interval_seen = now, run.seen
        if done % config.checkpoint_every == 0 or done == run.total_steps:
            cursors = env.gather(run.batches.cursors)  # every rank's streams
            if env.is_main:
                merged = [{s: c for rank in cursors for s, c in rank[k].items()} for k in range(len(run.sources))]
                _save_checkpoint(out, run.model, run.optimizer, run.scaler, done, run.meta, merged,
                                 config.keep_checkpoints)
    progress.close()
    run.batches.close()
    summary = _finish(run, time.time() - started)
    if writer:
        writer.close()
    env.close()
    return summary
