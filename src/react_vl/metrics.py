"""The metrics REACT reports, computed the way CLIP_benchmark and ELEVATER compute them.

Classification metrics take `logits` (N x C scores) and integer `labels` (N,); each benchmark
names its own metric (ELEVATER: accuracy for most datasets, mean-per-class for caltech-101 /
aircraft / flowers / pets, 11-point mAP for VOC 2007, ROC AUC for hateful memes), so
`task_metric` dispatches on the task's metric name. Retrieval recall takes image and caption
features plus the caption -> image mapping (several captions per image, COCO/Flickr style).
"""

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .tasks import METRICS


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest scores."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """C x C counts: row = true class, column = predicted class."""
    num_classes = logits.shape[1]
    predicted = logits.argmax(dim=1)
    flat = labels.long() * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN for a class with no sample)."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / support, np.nan)


def mean_per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of the per-class recalls over the classes that have samples (balanced accuracy)."""
    return float(np.nanmean(per_class_accuracy(confusion_matrix(logits, labels))))


def eleven_point_average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """VOC 2007 AP: mean over recall levels 0, 0.1, ..., 1 of the best precision at that recall or above."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / max(hits.sum(), 1)
    levels = np.linspace(0, 1, 11)
    return float(np.mean([precision[recall >= level].max(initial=0.0) for level in levels]))


def eleven_point_map(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes (one-vs-rest, classes with positives) of the 11-point AP."""
    scores, labels = logits.numpy(), labels.numpy()
    present = np.unique(labels)
    return float(np.mean([eleven_point_average_precision(scores[:, c], labels == c) for c in present]))


def roc_auc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary tasks: AUC of the softmax probability of class 1; more classes: macro one-vs-rest."""
    probabilities = logits.float().softmax(dim=1).numpy()
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels.numpy(), probabilities[:, 1]))
    return float(roc_auc_score(labels.numpy(), probabilities, multi_class="ovr",
                               labels=list(range(probabilities.shape[1]))))


def task_metric(metric: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The benchmark's own headline metric by name (one of tasks.METRICS)."""
    if metric == "accuracy":
        return topk_accuracy(logits, labels, 1)
    if metric == "mean-per-class":
        return mean_per_class_accuracy(logits, labels)
    if metric == "11-point-mAP":
        return eleven_point_map(logits, labels)
    if metric == "roc-auc":
        return roc_auc(logits, labels)
    raise ValueError(f"unknown task metric {metric!r}; expected one of {METRICS}")


def classification_report(logits: torch.Tensor, labels: torch.Tensor, metric: str,
                          classnames: list[str]) -> dict:
    """Everything the evaluation JSON holds for one model on one classification task."""
    confusion = confusion_matrix(logits, labels)
    return {
        "metric": metric,
        "score": task_metric(metric, logits, labels),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "mean_per_class": mean_per_class_accuracy(logits, labels),
        "per_class_accuracy": {name: (None if np.isnan(acc) else float(acc))
                               for name, acc in zip(classnames, per_class_accuracy(confusion))},
        "confusion_matrix": confusion.tolist(),
        "count": int(len(labels)),
    }


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways on L2-normalised features.

    image->text: an image counts as found if any of its captions is in its top k.
    text->image: a caption counts as found if its own image is in its top k.
    """
    similarity = image_features @ text_features.T  # images x captions
    results = {}
    for k in ks:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        image_hit = (text_to_image[top_texts] == torch.arange(len(image_features))[:, None]).any(dim=1)
        top_images = similarity.T.topk(min(k, similarity.shape[0]), dim=1).indices
        text_hit = (top_images == text_to_image[:, None]).any(dim=1)
        results[f"image_to_text_R@{k}"] = image_hit.float().mean().item()
        results[f"text_to_image_R@{k}"] = text_hit.float().mean().item()
    return results
