"""Which weights a customization run trains: the paper's strategies (REACT Table 6), in one place.

    model = build_model("mini-vit", "base.pt", "gated-image")   # gated blocks injected
    counts = set_trainable(model, "gated-image")               # {"trainable": ..., "total": ...}

| strategy           | image tower          | text tower | paper (B/32, IN-1k zero-shot) |
|--------------------|----------------------|------------|-------------------------------|
| `gated-image`      | gated blocks only    | locked     | 68.6 (REACT's default)        |
| `gated-image-text` | gated blocks only    | trained    | 68.7                          |
| `locked-text`      | whole tower          | locked     | 66.9                          |
| `locked-image`     | locked (LiT)         | trained    | 63.7                          |
| `full`             | whole tower          | trained    | 64.3 (and how the mini world's base is pretrained) |

The logit scale (temperature) is a separate switch: trainable by default, as in the public
REACT code; `train_logit_scale=False` keeps the base model's value.

Frozen weights get `requires_grad=False`: autograd then records no graph for the layers in
front of the first trainable one (their inputs and weights need no gradient), so those layers
store no activations and get no backward pass. `tests/test_train.py` and
`benchmarks/bench_customize.py` check this rather than assume it. `set_trainable` also runs the
towers sequence-first (`models.sequence_first`), where frozen projections take PyTorch's fast
matrix-product path. `set_grad_checkpointing(model)` recomputes the trainable blocks'
activations in the backward pass instead of storing them.
"""

from torch import nn

from .gated import GATED_CHILD, inject_gated_blocks
from .models import load_model, sequence_first

GATED_STRATEGIES = ("gated-image", "gated-image-text")
STRATEGIES = GATED_STRATEGIES + ("locked-text", "locked-image", "full")


def _part(name: str) -> str:
    """Which part of an open_clip CLIP a parameter belongs to: gated, image, text or scale."""
    if f".{GATED_CHILD}." in name:
        return "gated"
    if name.startswith("visual."):
        return "image"
    if name.startswith("logit_"):
        return "scale"
    return "text"


TRAINED_PARTS = {
    "gated-image": {"gated"},
    "gated-image-text": {"gated", "text"},
    "locked-text": {"gated", "image"},
    "locked-image": {"text"},
    "full": {"gated", "image", "text"},
}


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    return strategy


def build_model(model_name: str | None, pretrained: str | None, strategy: str,
                gated_layers: list[int] | int | None = None, device="cpu"):
    """Load the base model and, for gated strategies, inject gated blocks (identity at init).

    Returns (model, preprocess, tokenizer) like `load_model`. A checkpoint that already holds
    gated blocks (a released REACT model or an earlier react-vl run) keeps them.
    """
    check_strategy(strategy)
    model, preprocess, tokenizer = load_model(model_name, pretrained, device=device)
    if strategy in GATED_STRATEGIES:
        inject_gated_blocks(model, gated_layers)
    return model, preprocess, tokenizer


def set_trainable(model: nn.Module, strategy: str, train_logit_scale: bool = True) -> dict[str, int]:
    """Freeze everything the strategy does not train; return trainable and total parameter counts."""
    trained = TRAINED_PARTS[check_strategy(strategy)] | ({"scale"} if train_logit_scale else set())
    if strategy in GATED_STRATEGIES and not any(_part(n) == "gated" for n, _ in model.named_parameters()):
        raise ValueError(f"strategy {strategy!r} needs gated blocks; build the model with build_model() "
                         f"or react_vl.gated.inject_gated_blocks() first")
    counts = {"trainable": 0, "total": 0}
    for name, param in model.named_parameters():
        param.requires_grad_(_part(name) in trained)
        counts["total"] += param.numel()
        counts["trainable"] += param.numel() if param.requires_grad else 0
    sequence_first(model)
    return counts


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> dict[str, bool]:
    """Checkpoint the blocks of each tower that has trainable weights (call after set_trainable).

    Uses open_clip's own switch: the tower's transformer runs every block under
    torch.utils.checkpoint, so the backward pass recomputes a block's activations instead of
    keeping them. A gated block runs inside its resblock's checkpoint (through the resblock's
    forward pre-hook). Blocks in front of the first trainable one record no graph inside their
    checkpoint either (input and weights need no gradient): they store nothing and are never
    recomputed. A tower without trainable weights is not checkpointed. Returns which towers are.
    """
    trained = {_part(name) for name, param in model.named_parameters() if param.requires_grad}
    towers = {"image": enabled and bool(trained & {"gated", "image"}), "text": enabled and "text" in trained}
    model.visual.set_grad_checkpointing(towers["image"])
    if hasattr(model, "text"):  # open_clip's CustomTextCLIP keeps its text tower in one module
        model.text.set_grad_checkpointing(towers["text"])
    else:
        model.transformer.grad_checkpointing = towers["text"]
    return towers
