"""The linear probe: logistic regression on frozen features, penalty picked on a held-out train part."""
import torch

from cid_ds.linear_probe import linear_probe


def blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_linearly_separable_features_are_classified_perfectly():
    train_x, train_y = blobs(60, 5, 16, spread=0.3, seed=0)
    test_x, test_y = blobs(40, 5, 16, spread=0.3, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=5)
    assert result["linear_probe_top1"] == 1.0
    assert result["linear_probe_train_samples"] == 300


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(800, 32, generator=g), torch.randn(2000, 32, generator=g)
    train_y, test_y = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    accuracy = linear_probe(train_x, train_y, test_x, test_y, num_classes=4)["linear_probe_top1"]
    assert abs(accuracy - 0.25) < 0.04  # chance 0.25; 4 standard errors at n = 2000 is 0.039


def test_features_from_an_inference_mode_evaluation_can_be_probed():
    with torch.inference_mode():
        train_x, train_y = blobs(20, 3, 8, spread=0.2, seed=0)
        test_x, test_y = blobs(10, 3, 8, spread=0.2, seed=1)
        assert linear_probe(train_x, train_y, test_x, test_y, num_classes=3)["linear_probe_top1"] == 1.0
