"""Gated self-attention dense blocks, injected into a frozen open_clip image tower.

REACT adds one new block in front of each of the last k blocks of the ViT image tower:

    x = x + tanh(alpha_attn)  * attn(ln_1(x))
    x = x + tanh(alpha_dense) * mlp(ln_2(x))

Both alphas start at 0, so at injection time the model computes exactly what the base model
computes. The block is registered as the child `gated_attn_block` of
`visual.transformer.resblocks.N` (the released REACT checkpoints use these names) and is run
by a forward pre-hook on that resblock, so the installed open_clip is used as it is.
`scale_gates(model, lam)` multiplies both gates by lam at inference: from the base (0) to the
trained model (1), trading target gain against forgetting.
"""

from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn

GATED_CHILD = "gated_attn_block"


class GatedAttentionBlock(nn.Module):
    """Pre-norm self-attention + MLP, each added through a tanh gate that starts closed."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm,
                 batch_first: bool = True):
        super().__init__()
        self.gate_scale = 1.0  # lambda: an inference-time factor on both gates (scale_gates); never saved
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))
        self.ln_1 = norm_layer(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_2 = norm_layer(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.gate_scale * self.alpha_attn.tanh() * self.attn(h, h, h, need_weights=False)[0]
        x = x + self.gate_scale * self.alpha_dense.tanh() * self.mlp(self.ln_2(x))
        return x


def _run_gated_block(resblock: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: feed the resblock's input through its gated block first."""
    return (resblock.gated_attn_block(args[0]),) + tuple(args[1:]), kwargs


def _resblocks(model: nn.Module) -> nn.ModuleList:
    visual = getattr(model, "visual", model)
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise TypeError(
            f"gated blocks need an open_clip VisionTransformer image tower; this model's image "
            f"tower is {type(visual).__name__}. Use --strategy locked-text or full for it.")
    return transformer.resblocks


def default_gated_layers(depth: int) -> list[int]:
    """The paper's default: the last 6 layers, or the last half of a shallower tower."""
    k = 6 if depth >= 12 else max(1, depth // 2)
    return list(range(depth - k, depth))


def inject_gated_blocks(model: nn.Module, layers: list[int] | int | None = None) -> list[int]:
    """Insert a gated block before each listed image-tower layer (or the last `layers` if an int).

    Returns the layer indices that carry a gated block. Idempotent for layers already gated.
    New blocks use PyTorch's default initialisation and the resblock's own norm / activation.
    """
    resblocks = _resblocks(model)
    depth = len(resblocks)
    if layers is None:
        layers = default_gated_layers(depth)
    elif isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise ValueError(f"number of gated layers must be in 1..{depth}, got {layers}")
        layers = list(range(depth - layers, depth))
    layers = sorted(set(int(i) % depth if i < 0 else int(i) for i in layers))
    if any(i >= depth for i in layers):
        raise ValueError(f"gated layer index out of range for an image tower of depth {depth}: {layers}")
    for i in layers:
        block = resblocks[i]
        if hasattr(block, GATED_CHILD):
            continue
        ref = block.attn
        width, heads = ref.embed_dim, ref.num_heads
        act = type(block.mlp[1]) if isinstance(block.mlp, nn.Sequential) and len(block.mlp) == 3 else nn.GELU
        norm = type(block.ln_1)
        gated = GatedAttentionBlock(width, heads, mlp_ratio=block.mlp.c_fc.out_features / width,
                                    act_layer=act, norm_layer=norm,
                                    batch_first=getattr(ref, "batch_first", True))
        param = next(block.parameters())
        gated.to(device=param.device, dtype=param.dtype)
        block.add_module(GATED_CHILD, gated)
        block.register_forward_pre_hook(_run_gated_block, with_kwargs=True)
    return gated_layers(model)


def gated_layers(model: nn.Module) -> list[int]:
    """Indices of the image-tower layers that carry a gated block."""
    try:
        resblocks = _resblocks(model)
    except TypeError:
        return []
    return [i for i, b in enumerate(resblocks) if hasattr(b, GATED_CHILD)]


def gated_layers_in_state_dict(state_dict: dict) -> list[int]:
    """Layer indices that a (released REACT or react-vl) state dict holds gated blocks for."""
    marker = f".{GATED_CHILD}."
    found = set()
    for key in state_dict:
        if "visual.transformer.resblocks." in key and marker in key:
            found.add(int(key.split("visual.transformer.resblocks.")[1].split(".")[0]))
    return sorted(found)


def gate_values(model: nn.Module) -> dict[int, dict[str, float]]:
    """tanh(alpha) per gated layer: how far each gate has opened."""
    resblocks = _resblocks(model)
    return {i: {"attn": float(resblocks[i].gated_attn_block.alpha_attn.detach().tanh()),
                "dense": float(resblocks[i].gated_attn_block.alpha_dense.detach().tanh())}
            for i in gated_layers(model)}


@contextmanager
def scale_gates(model: nn.Module, lam: float):
    """Within the block, every gated block adds lam * tanh(alpha) * its output (both gates):
    lam = 0 computes exactly what the base model computes, lam = 1 the trained model. An
    inference-time remedy for forgetting, traded against the target gain; the weights stay as saved."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"gate scale must be in [0, 1] (0: the base model, 1: the trained model), got {lam}")
    resblocks = _resblocks(model)
    layers = gated_layers(model)
    if not layers:
        raise ValueError("gate scaling needs a model with gated blocks (a gated-image or gated-image-text "
                         "checkpoint); this model has none")
    blocks = [resblocks[i].gated_attn_block for i in layers]
    previous = [block.gate_scale for block in blocks]
    for block in blocks:
        block.gate_scale = lam
    try:
        yield model
    finally:
        for block, scale in zip(blocks, previous):
            block.gate_scale = scale
