import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from react_vl.loss import UniCLLoss, caption_ids


def _features(n, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1),
            F.normalize(torch.randn(n, dim, generator=g), dim=-1))


def test_one_to_one_batch_equals_open_clip_clip_loss():
    image, text = _features(12)
    scale = torch.tensor(14.3)
    expected = ClipLoss()(image, text, scale)
    assert torch.allclose(UniCLLoss()(image, text, scale), expected, atol=1e-6)
    # distinct captions give distinct ids, hence the same one-to-one targets
    ids = caption_ids([f"a photo of shape {i}" for i in range(12)])
    assert torch.allclose(UniCLLoss()(image, text, scale, ids), expected, atol=1e-6)


def test_identical_captions_are_positives_of_each_other():
    image, text = _features(4, seed=1)
    scale = torch.tensor(10.0)
    ids = caption_ids(["a red star", "a blue square", "a red star", "a sketch"])
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3
    logits = scale * image @ text.T
    targets = torch.tensor([[.5, 0, .5, 0], [0, 1, 0, 0], [.5, 0, .5, 0], [0, 0, 0, 1]])
    by_hand = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    loss = UniCLLoss()(image, text, scale, ids)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert not torch.allclose(loss, ClipLoss()(image, text, scale), atol=1e-3)


def test_gradients_reach_both_feature_sets_and_the_scale():
    image, text = (f.clone().requires_grad_() for f in _features(6, seed=2))
    scale = torch.tensor(5.0, requires_grad=True)
    UniCLLoss()(image, text, scale).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and scale.grad != 0


def test_gradient_scale_makes_the_ddp_average_the_global_gradient():
    # without a differentiable gather each rank's gradient holds only its own features' part
    assert UniCLLoss(0, 4).gradient_scale == 4
    assert UniCLLoss(0, 4, gather_with_grad=True).gradient_scale == 1
    assert UniCLLoss(0, 4, local_loss=True, gather_with_grad=True).gradient_scale == 1
    image, text = _features(5, seed=3)
    scale = torch.tensor(7.0)
    ids = caption_ids(["a", "b", "a", "c", "d"])
    assert torch.equal(UniCLLoss(local_loss=True, gather_with_grad=True)(image, text, scale, ids),
                       UniCLLoss()(image, text, scale, ids))  # one process: local rows are all rows
