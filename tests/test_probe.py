import pytest
import torch
import torch.nn.functional as F

from react_vl.probe import (WEIGHT_DECAYS, ZERO_SHOT_SCALE, few_shot_probe, fit_logistic_regression,
                            sample_few_shot, stratified_split)


def clustered(num_classes=4, per_class=12, dim=16, noise=0.3, seed=0):
    """Separable features: a random unit centre per class plus noise, L2-normalised like CLIP features."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=generator) / dim**0.5,
                           dim=1)
    return features, labels, centres


def test_few_shot_sampler_is_seeded_and_balanced():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)
    chosen = sample_few_shot(labels, 3, seed=4)
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert torch.equal(chosen, sample_few_shot(labels, 3, seed=4))
    assert any(not torch.equal(chosen, sample_few_shot(labels, 3, seed=s)) for s in range(5, 10))
    with pytest.raises(ValueError, match="class 2 has 5 training samples, fewer than 6 shots"):
        sample_few_shot(labels, 6, seed=0)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    first, second = stratified_split(labels, 0.8, seed=1)
    assert sorted(first.tolist() + second.tolist()) == list(range(16))
    assert torch.bincount(labels[first]).tolist() == [8, 3, 1]
    assert torch.bincount(labels[second], minlength=3).tolist() == [2, 1, 1]


def test_probe_on_separable_features_scores_perfectly():
    features, labels, _ = clustered()
    train, test = stratified_split(labels, 0.5, seed=0)
    result = few_shot_probe(features[train], labels[train], features[test], labels[test], shots=[2, "full"], seeds=3)
    assert result["shots"]["full"]["mean"] == 1.0
    assert result["shots"]["2"]["mean"] == 1.0 and len(result["shots"]["2"]["runs"]) == 3
    assert set(result["shots"]["2"]["weight_decay"]) <= set(WEIGHT_DECAYS)


def test_language_initialised_head_is_pulled_towards_the_text_classifier():
    features, labels, centres = clustered(noise=3.0)
    weight, _ = fit_logistic_regression(features[:2], labels[:2], 4, weight_decay=10.0, init_weights=centres)
    assert torch.allclose(weight, ZERO_SHOT_SCALE * centres, rtol=0.05, atol=0.05)
    zero_init, _ = fit_logistic_regression(features[:2], labels[:2], 4, weight_decay=10.0)
    assert zero_init.abs().max() < 0.1
    # with one noisy shot per class, the text-initialised head keeps the zero-shot accuracy the zero head lacks
    shots = sample_few_shot(labels, 1, seed=0)
    with_text = few_shot_probe(features[shots], labels[shots], features, labels, shots=[1], seeds=1,
                               init_weights=centres)
    plain = few_shot_probe(features[shots], labels[shots], features, labels, shots=[1], seeds=1)
    zero_shot = ((features @ centres.T).argmax(1) == labels).float().mean().item()
    assert with_text["shots"]["1"]["mean"] >= zero_shot - 0.05
    assert with_text["shots"]["1"]["mean"] > plain["shots"]["1"]["mean"]
