"""The symmetric image-text contrastive loss in the UniCL form, as REACT trains with it.

UniCL treats every pair in the batch whose caption equals another pair's caption as a positive
of that pair too (retrieved sets repeat captions such as "a sketch of a star."). The target of
image i is then uniform over the captions equal to its own, and vice versa for texts. With
distinct captions the targets are the identity and the loss is CLIP's loss exactly.

Under DDP the features of all ranks are gathered as open_clip's `ClipLoss` gathers them:
- default: every rank computes the loss over the global batch (N x N logits); gradients flow
  only into its local features. DDP averages the ranks' gradients, which is 1/world_size of
  the global-batch gradient, so `gradient_scale` is world_size.
- `local_loss`: each rank computes only its rows: its local images against all texts and its
  local texts against all images (n x N logits); positives are still found by caption id over
  the global batch.
- `gather_with_grad`: the gather is differentiable, so gradients reach the features of every
  rank; `gradient_scale` is 1. With both flags a DDP step equals a single-process step on the
  same global batch; `local_loss` alone, as in open_clip, drops the gradient through the other
  ranks' features.
"""

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import nn


def caption_ids(captions: list[str]) -> torch.Tensor:
    """A stable 63-bit id per caption (equal captions, equal ids, on every rank)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1
                         for c in captions], dtype=torch.long)


def _soft_cross_entropy(logits: torch.Tensor, row_ids: torch.Tensor, column_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against targets uniform over the columns whose caption id equals the row's."""
    positives = (row_ids[:, None] == column_ids[None, :]).to(logits.dtype)
    return F.cross_entropy(logits, positives / positives.sum(dim=1, keepdim=True))


class UniCLLoss(nn.Module):
    """loss(image_features, text_features, logit_scale, text_ids=None) -> scalar.

    Features are L2-normalised (as open_clip's model returns them); `logit_scale` is the
    already exponentiated temperature; `text_ids` (from `caption_ids`) mark pairs sharing a
    caption; None means every pair is one-to-one.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad

    @property
    def gradient_scale(self) -> float:
        """By how much to scale the loss before `backward()` so that DDP's averaged gradient is the global one."""
        return 1.0 if self.gather_with_grad or self.local_loss else float(self.world_size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
        if text_ids is None:
            text_ids = torch.arange(len(image_features), device=image_features.device)
            text_ids = text_ids + self.rank * len(image_features)
        if self.world_size == 1:
            logits = logit_scale * image_features @ text_features.T
            return (_soft_cross_entropy(logits, text_ids, text_ids)
                    + _soft_cross_entropy(logits.T, text_ids, text_ids)) / 2
        all_images, all_texts = gather_features(image_features, text_features, local_loss=self.local_loss,
                                                gather_with_grad=self.gather_with_grad, rank=self.rank,
                                                world_size=self.world_size)
        gathered_ids = [torch.empty_like(text_ids) for _ in range(self.world_size)]
        dist.all_gather(gathered_ids, text_ids)
        all_ids = torch.cat(gathered_ids)
        if self.local_loss:
            per_image = _soft_cross_entropy(logit_scale * image_features @ all_texts.T, text_ids, all_ids)
            per_text = _soft_cross_entropy(logit_scale * text_features @ all_images.T, text_ids, all_ids)
            return (per_image + per_text) / 2
        logits = logit_scale * all_images @ all_texts.T
        return (_soft_cross_entropy(logits, all_ids, all_ids) + _soft_cross_entropy(logits.T, all_ids, all_ids)) / 2
