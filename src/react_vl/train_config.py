"""The options of a training run, as data (no torch import: the CLI takes its defaults from here).

    from react_vl.train import TrainConfig, train
    summary = train(TrainConfig("SHARDS/", "RUN/", pretrained="base/model.pt", steps=300))
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    """One training run. `shards`: the (retrieved) shard set; `out`: the run folder RUN/."""
    shards: str | list  # a folder, pattern or URL, or a list of them
    out: str | Path
    model: str | None = None  # open_clip name; may be None when `pretrained` is a react-vl checkpoint
    pretrained: str | None = None  # open_clip tag or checkpoint path; None: random init
    strategy: str = "gated-image"
    gated_layers: list[int] | int | None = None  # a count of last layers or indices; None: the default
    steps: int | None = None  # optimizer steps; overrides `epochs`
    epochs: float = 1.0
    train_num_samples: int | None = None  # samples in `shards`, when neither summary.json nor _stats.json says
    batch_size: int = 64  # global batch of one micro-step, over all processes
    accum_steps: int = 1
    lr: float | None = None  # None: 5e-4 for gated strategies and random init, 5e-5 for pretrained base weights
    gate_lr_scale: float = 1.0
    weight_decay: float = 0.05
    warmup: int | None = None  # None: 5% of the steps
    grad_clip: float = 1.0
    precision: str = "auto"
    augment: bool = False
    train_logit_scale: bool = True
    mix_shards: str | None = None  # a general shard set; `mix_ratio` of every batch comes from it
    mix_ratio: float = 0.0
    text_embeddings: bool = True  # use the shards' caption embeddings when the text tower is locked
    local_loss: bool = False
    gather_with_grad: bool = False
    grad_checkpointing: bool = False
    torch_compile: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: str | None = None  # a checkpoint path, or "latest" (a fresh start when there is none)
    log_every: int = 10
    seed: int = 0
    workers: int | None = None  # loader processes per rank; None: min(8, CPUs per process, shards per process)
    shuffle_buffer: int = 1000
    device: str | None = "auto"
