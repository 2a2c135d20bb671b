"""The training speed paths compute what the plain model computes: the sequence-first layout
(set_trainable) and gradient checkpointing (set_grad_checkpointing), each against the model
without it: same features, same loss, same gradients of every trainable weight. And the
allocator setting the trainer makes on CPU (utils.keep_freed_memory) does what it says."""

import copy
import os
import resource
import subprocess
import sys

import pytest
import torch
from open_clip.transformer import Transformer
from torch import nn
from torch.profiler import profile

from react_vl.loss import UniCLLoss
from react_vl.models import sequence_first
from react_vl.strategies import build_model, set_grad_checkpointing, set_trainable
from react_vl.utils import keep_freed_memory


def _batch_first(model):
    """The layout open_clip builds: undo sequence_first (the reference the tests compare with)."""
    for module in model.modules():
        if isinstance(module, (Transformer, nn.MultiheadAttention)):
            module.batch_first = True
    return model


def _model(strategy, name="mini-vit"):
    torch.manual_seed(0)
    model, _, tokenizer = build_model(name, None, strategy)
    for block in model.visual.transformer.resblocks:  # open the gates, so the gated blocks count
        if hasattr(block, "gated_attn_block"):
            block.gated_attn_block.alpha_attn.data.fill_(0.5)
            block.gated_attn_block.alpha_dense.data.fill_(-0.5)
    set_trainable(model, strategy)
    return model.train(), tokenizer


def _inputs(model, tokenizer, n=4):
    size = model.visual.image_size[0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)), \
        tokenizer([f"a sketch of thing {i}" for i in range(n)])


def _loss_and_grads(model, images, tokens):
    image_features, text_features, scale = model(images, tokens)[:3]
    loss = UniCLLoss()(image_features, text_features, scale)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return (image_features.detach(), text_features.detach(), loss.detach()), grads


@pytest.mark.parametrize("strategy", ["gated-image", "locked-text", "full"])
def test_sequence_first_gives_the_same_features_loss_and_gradients(strategy):
    model, tokenizer = _model(strategy)
    stacks = sequence_first(model)
    assert stacks == [model.visual.transformer, model.transformer]  # both towers, set by set_trainable already
    assert all(not m.batch_first for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    reference = _batch_first(copy.deepcopy(model))
    assert list(reference.state_dict()) == list(model.state_dict())  # same keys: released checkpoints load
    images, tokens = _inputs(model, tokenizer)
    (ours, our_grads), (theirs, their_grads) = (_loss_and_grads(m, images, tokens) for m in (model, reference))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 2
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _expanded_weight_products(model, images, tokens) -> list:
    """Input shapes of the `bmm` calls that multiply by an attention in-projection weight expanded
    over the sequence: PyTorch's path for a frozen weight on a non-contiguous 3-d input."""
    width = model.visual.transformer.width
    with profile(record_shapes=True) as prof:
        _loss_and_grads(model, images, tokens)
    return [e.input_shapes for e in prof.events() if e.name == "aten::bmm"
            and any(len(s) == 3 and s[1:] in ([width, 3 * width], [3 * width, width]) for s in e.input_shapes)]


def test_frozen_projections_take_one_matrix_product_in_the_sequence_first_layout():
    model, tokenizer = _model("gated-image")
    images, tokens = _inputs(model, tokenizer)
    assert _expanded_weight_products(model, images, tokens) == []
    slow = _expanded_weight_products(_batch_first(copy.deepcopy(model)), images, tokens)
    assert len(slow) >= 6  # the batch-first layout: every frozen image block, forward and backward


def _calls_per_block(model):
    """Count the calls of every resblock (a checkpointed block runs again in the backward; a
    pre-hook, since the recompute stops once it has what the backward needs) and keep its output."""
    calls, outputs = {}, {}
    for tower, stack in (("image", model.visual.transformer), ("text", model.transformer)):
        for i, block in enumerate(stack.resblocks):
            block.register_forward_pre_hook(lambda m, a, key=(tower, i): calls.__setitem__(key, calls.get(key, 0) + 1))
            block.register_forward_hook(lambda m, a, out, key=(tower, i): outputs.setdefault(key, out))
    return calls, outputs


@pytest.mark.parametrize("strategy, towers", [("gated-image", {"image": True, "text": False}),
                                              ("full", {"image": True, "text": True})])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(strategy, towers):
    model, tokenizer = _model(strategy)
    checkpointed = copy.deepcopy(model)
    assert set_grad_checkpointing(checkpointed) == towers
    images, tokens = _inputs(model, tokenizer)
    calls, outputs = _calls_per_block(checkpointed)
    (ours, our_grads), (theirs, their_grads) = (_loss_and_grads(m, images, tokens) for m in (checkpointed, model))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    first_trained = 3 if strategy == "gated-image" else 0  # mini-vit's gated blocks sit in layers 3, 4, 5
    image_blocks = len(model.visual.transformer.resblocks)
    # the frozen prefix runs once and records no graph; every block after it is recomputed once
    assert [calls["image", i] for i in range(image_blocks)] == \
        [1 if i < first_trained else 2 for i in range(image_blocks)]
    assert [outputs["image", i].grad_fn is None for i in range(image_blocks)] == \
        [i < first_trained for i in range(image_blocks)]
    text_blocks = len(model.transformer.resblocks)
    assert [calls["text", i] for i in range(text_blocks)] == [2 if towers["text"] else 1] * text_blocks
    set_grad_checkpointing(checkpointed, False)
    assert not checkpointed.visual.transformer.grad_checkpointing and not checkpointed.transformer.grad_checkpointing


_FAULTS = """
import resource, sys, torch
from react_vl.strategies import build_model
from react_vl.train import make_optimizer
from react_vl.utils import keep_freed_memory
made = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model, _, tokenizer = build_model("mini-vit", None, "full")
optimizer = make_optimizer(model, 1e-4, 0.1)
images, texts = torch.randn(16, 3, 64, 64), tokenizer(["a sketch of a star"] * 16)

def step():  # a full training step: its token-embedding gradient alone is a 38 MB block
    image, text, scale = model(images, texts)
    (scale * image @ text.T).logsumexp(1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(made, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_a_training_steps_blocks_instead_of_faulting_fresh_pages(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults_per_step(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], float(out[1])

    made, kept = faults_per_step("keep")
    _, plain = faults_per_step("plain")
    assert made == "True"
    gradient_pages = 49408 * 192 * 4 / resource.getpagesize()
    assert plain > 0.5 * gradient_pages, f"glibc's default faults the large blocks fresh every step ({plain:.0f})"
    print(f"page faults a step: {plain:.0f} by default, {kept:.0f} kept")
    assert kept < 0.1 * plain, f"kept blocks are reused: {kept:.0f} page faults a step against {plain:.0f}"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False  # the environment's own glibc setting wins
