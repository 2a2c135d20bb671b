"""Linear probes on frozen image features: few-shot (k per class, several seeds) and full-shot.

The head is a logistic regression written in torch rather than sklearn so that it can start
from the class-prompt text embeddings (the language-initialised head of ELEVATER / REACT): its
weight decay pulls the head towards that initialisation, so with few shots it stays close to the
zero-shot classifier and with many it learns away from it. With no initialisation it is the
usual L2-regularised logistic regression. The regularisation strength is chosen on a validation
split of the training shots, then the head is refitted on all of them.
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-5, 1e-3, 1e-1)
ZERO_SHOT_SCALE = 100.0  # CLIP's logit scale: a text-initialised head starts as the zero-shot classifier


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, second): `fraction` of each class in the first part (at least one when it has two)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(len(members) * fraction))
        cut = min(max(cut, 1), len(members) - 1) if len(members) > 1 else len(members)
        first.append(members[:cut])
        second.append(members[cut:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def sample_few_shot(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` random indices per class (seeded); every class must have that many."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        if len(members) < shots:
            raise ValueError(f"class {int(cls)} has {len(members)} training samples, fewer than {shots} shots")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


@contextlib.contextmanager
def _one_thread_if_small(features: torch.Tensor, limit: int = 2**20):
    """Small probes run much faster on one thread on a busy CPU: the work is too small to share."""
    threads = torch.get_num_threads()
    if features.numel() < limit:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            weight_decay: float, init_weights: torch.Tensor | None = None,
                            steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on cross-entropy + weight_decay * ||W - W_init||^2; returns (W, b)."""
    anchor = (ZERO_SHOT_SCALE * init_weights if init_weights is not None
              else torch.zeros(num_classes, features.shape[1]))
    weight = anchor.clone(memory_format=torch.contiguous_format).requires_grad_(True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, tolerance_grad=1e-5,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay * (weight - anchor).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _one_thread_if_small(features):
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(weight, bias, features, labels) -> float:
    return ((features @ weight.T + bias).argmax(1) == labels).float().mean().item()


def train_probe(features, labels, num_classes, init_weights=None, seed: int = 0) -> tuple[dict, float]:
    """Choose the weight decay on a validation split (when every class has 2+ samples), refit on all."""
    counts = torch.bincount(labels, minlength=num_classes)
    weight_decay = WEIGHT_DECAYS[len(WEIGHT_DECAYS) // 2]
    if counts[counts > 0].min() >= 2:
        fit_part, val_part = stratified_split(labels, 0.8, seed)
        val_accuracy = {wd: _accuracy(*fit_logistic_regression(features[fit_part], labels[fit_part], num_classes,
                                                               wd, init_weights),
                                      features[val_part], labels[val_part]) for wd in WEIGHT_DECAYS}
        weight_decay = max(WEIGHT_DECAYS, key=lambda wd: (val_accuracy[wd], wd))  # ties -> stronger decay
    head = fit_logistic_regression(features, labels, num_classes, weight_decay, init_weights)
    return {"weight": head[0], "bias": head[1]}, weight_decay


def few_shot_probe(train_features, train_labels, test_features, test_labels, shots=(1, 5, "full"),
                   seeds: int = 3, init_weights=None) -> dict:
    """Test accuracy per shot count: mean and spread over seeds (one run for full-shot)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if init_weights is not None:
        num_classes = init_weights.shape[0]
    results = {"language_init": init_weights is not None, "train": len(train_labels), "test": len(test_labels),
               "shots": {}}
    for shot in shots:
        runs = []
        for seed in range(1 if shot == "full" else seeds):
            chosen = (torch.arange(len(train_labels)) if shot == "full"
                      else sample_few_shot(train_labels, int(shot), seed))
            head, weight_decay = train_probe(train_features[chosen], train_labels[chosen], num_classes,
                                             init_weights, seed)
            runs.append((_accuracy(head["weight"], head["bias"], test_features, test_labels), weight_decay))
        accuracies = np.array([accuracy for accuracy, _ in runs])
        results["shots"][str(shot)] = {"mean": float(accuracies.mean()), "std": float(accuracies.std()),
                                       "runs": accuracies.tolist(), "weight_decay": [wd for _, wd in runs]}
    return results
