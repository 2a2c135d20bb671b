import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from react_vl.metrics import (classification_report, confusion_matrix, eleven_point_average_precision,
                              eleven_point_map, mean_per_class_accuracy, retrieval_recall, roc_auc,
                              task_metric, topk_accuracy)
from react_vl.tasks import METRICS


@pytest.fixture
def fixed_scores():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 7, generator=generator)
    labels = torch.randint(0, 7, (60,), generator=generator)
    logits[torch.arange(20), labels[:20]] += 2.0  # a third are clearly right, the rest chance
    return logits, labels


def test_accuracies_and_confusion_match_sklearn(fixed_scores):
    logits, labels = fixed_scores
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=range(7))
        assert topk_accuracy(logits, labels, k) == pytest.approx(expected)
    predicted = logits.argmax(1).numpy()
    assert (confusion_matrix(logits, labels) == skm.confusion_matrix(labels.numpy(), predicted, labels=range(7))).all()
    assert mean_per_class_accuracy(logits, labels) == pytest.approx(
        skm.balanced_accuracy_score(labels.numpy(), predicted))


def test_roc_auc_binary_equals_hand_count_of_ordered_pairs():
    logits = torch.tensor([[0.0, 0.1], [0.0, 0.9], [0.0, 0.4], [0.0, 0.8], [0.0, 0.2]])
    labels = torch.tensor([0, 1, 1, 0, 0])
    # positives score 0.9, 0.4; negatives 0.1, 0.8, 0.2: pairs ordered right = 3 + 2 = 5 of 6
    assert roc_auc(logits, labels) == pytest.approx(5 / 6)
    multi = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    multi_labels = torch.arange(40) % 4
    assert roc_auc(multi, multi_labels) == pytest.approx(
        skm.roc_auc_score(multi_labels.numpy(), multi.softmax(1).numpy(), multi_class="ovr"))


def test_eleven_point_ap_hand_computed_and_bounded_by_sklearn_ap():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    positives = np.array([1, 0, 1, 0, 0])
    # precision at the two hits: 1/1 and 2/3; recall levels 0..0.5 -> 1.0, 0.6..1.0 -> 2/3
    assert eleven_point_average_precision(scores, positives) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    generator = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(80, 3, generator=generator), torch.arange(80) % 3
    ours = eleven_point_map(logits, labels)
    sklearn_ap = np.mean([skm.average_precision_score(labels.numpy() == c, logits[:, c].numpy()) for c in range(3)])
    assert abs(ours - sklearn_ap) < 0.08  # the interpolated AP is close to, but not the same as, exact AP
    perfect = torch.nn.functional.one_hot(labels, 3).float()
    assert eleven_point_map(perfect, labels) == pytest.approx(1.0)


def test_task_metric_dispatch_and_report(fixed_scores):
    logits, labels = fixed_scores
    assert task_metric("accuracy", logits, labels) == topk_accuracy(logits, labels)
    with pytest.raises(ValueError, match="unknown task metric 'f1'"):
        task_metric("f1", logits, labels)
    for metric in METRICS:  # every metric a task may name is computed
        assert 0.0 <= task_metric(metric, logits, labels) <= 1.0, metric
    report = classification_report(logits, labels, "mean-per-class", [f"c{i}" for i in range(7)])
    assert report["score"] == report["mean_per_class"] and report["count"] == 60
    assert sum(map(sum, report["confusion_matrix"])) == 60
    assert set(report["per_class_accuracy"]) == {f"c{i}" for i in range(7)}


def test_retrieval_recall_equals_hand_count():
    # 3 images, 6 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.2, 0, 1.0], [0, 1.0, 0], [1.0, 0.1, 0], [0, 0.9, 0.5], [1.0, 0.5, 0]])
    texts = texts / texts.norm(dim=1, keepdim=True)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    recall = retrieval_recall(images, texts, owner, ks=(1, 2))
    # image->text top1: img0 -> c0 hit; img1 -> c2 hit; img2 -> c1 (image 0's) miss => 2/3
    assert recall["image_to_text_R@1"] == pytest.approx(2 / 3)
    # top2: img2 -> {c1, c4}: hit => 3/3
    assert recall["image_to_text_R@2"] == pytest.approx(1.0)
    # text->image top1: c0->0 hit, c1->2 miss, c2->1 hit, c3->0 miss, c4->1 miss, c5->0 miss => 2/6
    assert recall["text_to_image_R@1"] == pytest.approx(2 / 6)
    # top2: c1 {2,0} hit, c3 {0,1} hit, c4 {1,2} hit, c5 {0,1} miss => 5/6
    assert recall["text_to_image_R@2"] == pytest.approx(5 / 6)
