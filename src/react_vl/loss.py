"""The symmetric image-text contrastive loss in the UniCL form, as REACT trains with it.

UniCL treats every pair in the batch whose caption equals another pair's caption as a positive
of that pair too (retrieved sets repeat captions such as "a sketch of a star."). The target of
image i is then uniform over the captions equal to its own, and vice versa for texts. With
distinct captions the targets are the identity and the loss is CLIP's loss exactly.

Under DDP the features of all ranks are gathered as open_clip does with `local_loss=False`:
every rank computes the loss over the global batch, and gradients flow only into its local
features. DDP then averages the ranks' gradients, which is 1/world_size of the global-batch
gradient; `UniCLLoss.gradient_scale` says by how much to scale the loss before `backward()`
so that a DDP step equals a single-process step on the same global batch.
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


class UniCLLoss(nn.Module):
    """loss(image_features, text_features, logit_scale, text_ids=None) -> scalar.

    Features are L2-normalised (as open_clip's model returns them); `logit_scale` is the
    already exponentiated temperature; `text_ids` (from `caption_ids`) mark pairs sharing a
    caption; None means every pair is one-to-one.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    @property
    def gradient_scale(self) -> float:
        return float(self.world_size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
        if text_ids is None:
            text_ids = torch.arange(len(image_features), device=image_features.device)
            text_ids = text_ids + self.rank * len(image_features)
        if self.world_size > 1:
            image_features, text_features = gather_features(
                image_features, text_features, local_loss=False, gather_with_grad=False,
                rank=self.rank, world_size=self.world_size)
            gathered_ids = [torch.empty_like(text_ids) for _ in range(self.world_size)]
            dist.all_gather(gathered_ids, text_ids)
            text_ids = torch.cat(gathered_ids)
        logits_per_image = logit_scale * image_features @ text_features.T
        positives = (text_ids[:, None] == text_ids[None, :]).to(logits_per_image.dtype)
        targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric, so rows = columns
        return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2
