"""Build any open_clip model by name, with weights from a pretrained tag or a local checkpoint.

    model, preprocess, tokenizer = load_model("ViT-B-32", "openai")          # open_clip tag
    model, preprocess, tokenizer = load_model("ViT-B-32", "/ckpt/epoch_32.pt") # local file
    model, preprocess, tokenizer = load_model(None, "runs/gated/model.pt")    # react-vl output

Local files may be plain state dicts, open_clip training checkpoints, released REACT
checkpoints (which carry `gated_attn_block` weights) or react-vl checkpoints (which also
record the model name). The small mini-world configs in `model_configs/` are registered with
open_clip on import, so `mini-vit` is a model name like any other.
"""

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import Transformer
from torch import nn

from .gated import gated_layers, gated_layers_in_state_dict, inject_gated_blocks
from .utils import atomic_save

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

CHECKPOINT_META_KEY = "react_vl"


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The react-vl metadata of a checkpoint ({} for other files); cheap, memory-mapped read."""
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    meta = dict(ckpt.get(CHECKPOINT_META_KEY, {})) if isinstance(ckpt, dict) else {}
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    meta.setdefault("gated_layers", gated_layers_in_state_dict(state_dict))
    return meta


@contextlib.contextmanager
def _without_random_init_warning():
    """open_clip warns "Model initialized randomly" when built without a tag; from a local file
    the weights are loaded right after, so that warning would only mislead."""
    def keep(record):
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_model(name: str | None, pretrained: str | None = None, device: str | torch.device = "cpu",
               precision: str = "fp32"):
    """Return (model, preprocess, tokenizer) for an open_clip model name and a weight source.

    `pretrained` is an open_clip pretrained tag ("openai", "laion2b_s34b_b79k", ...), a path to
    a local checkpoint, or None for random initialisation. `name` may be None when `pretrained`
    is a react-vl checkpoint, which records its model name.
    """
    path = None
    if pretrained is not None and (Path(pretrained).exists() or _looks_like_path(pretrained)):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path} (given as --pretrained)")
    meta = read_checkpoint_meta(path) if path else {}
    name = name or meta.get("model")
    if not name:
        raise ValueError(f"no model name given and {pretrained} does not record one; pass --model")
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown model {name!r}; open_clip knows: {', '.join(open_clip.list_models())}")

    tag = None if path else pretrained
    if tag is not None and not name.startswith(("hf-hub:", "local-dir:")):
        known = open_clip.list_pretrained_tags_by_model(name)
        if tag not in known:
            raise ValueError(f"unknown pretrained tag {tag!r} for {name}; known tags: {known or 'none'}; "
                             f"or pass a local checkpoint path")
    try:
        with _without_random_init_warning() if path else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, precision=precision, device=device)
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        if tag is None:
            raise
        raise RuntimeError(
            f"could not load pretrained weights {name!r} / {tag!r}: {err}. Offline machines cannot "
            f"download them: fetch them where there is network (open_clip caches them under "
            f"~/.cache/huggingface) or pass a local file: --pretrained /path/to/open_clip_model.bin"
        ) from err

    if path:
        if meta["gated_layers"]:
            inject_gated_blocks(model, meta["gated_layers"])
        open_clip.load_checkpoint(model, str(path), strict=True)
        model.to(device)
    model.eval()
    model.react_vl = {"model": name, "pretrained": pretrained, "gated_layers": gated_layers(model)}
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


def sequence_first(model: nn.Module) -> list[Transformer]:
    """Run every open_clip transformer stack of `model` in the (L, N, D) layout; returns those stacks.

    With the batch-first layout nn.MultiheadAttention transposes its (N, L, D) input into an
    (L, N, D) view that is not contiguous, and hands it to its input projection. For such an
    input, a weight that needs no gradient sends F.linear down PyTorch's batched path (the weight
    expanded L times, one `bmm`) instead of a single matrix product: the frozen layers of a
    customization run are then the slow ones on CPU. In the sequence-first layout the stack makes
    its input contiguous once and every projection gets a contiguous input. Only attributes
    change (open_clip's `Transformer.batch_first` and the attention modules' own, gated blocks'
    included), so outputs, parameters and state-dict keys stay as they are.
    """
    stacks = [m for m in model.modules() if isinstance(m, Transformer)
              and all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in m.resblocks)]
    for stack in stacks:
        stack.batch_first = False
        for attention in stack.modules():
            if isinstance(attention, nn.MultiheadAttention):
                attention.batch_first = False
    return stacks


def save_model(path: str | os.PathLike, model: torch.nn.Module, name: str, **meta) -> Path:
    """Write a react-vl checkpoint atomically: state dict + the metadata load_model needs."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    record = {"model": name, "gated_layers": gated_layers(model), **meta}
    return atomic_save({"state_dict": state_dict, CHECKPOINT_META_KEY: record}, path)


def text_tower_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the text tower's weights: every state-dict tensor whose key does not start with
    `visual.`, in key order, as float32 contiguous CPU bytes. Embed records it in kb.json, so caption
    embeddings made by other weights are told apart from the ones a trainer's text tower makes."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        if not key.startswith("visual."):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
