"""Linear probe: multinomial logistic regression on frozen image features, on CPU or GPU.

As in clip_benchmark, the L2 penalty is chosen on a held-out part of the train split, then the probe is
refit on the whole train split and scored on the test split. Full-batch L-BFGS: the problem is convex,
and at eval-set sizes (up to ~1M x 1024 features) it converges in tens of iterations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
        max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [C, D], bias [C])`` minimising mean cross-entropy + weight_decay * ||weight||^2."""
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((features @ weight.T + bias).argmax(dim=1) == labels).float().mean())


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                 validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """Top-1 accuracy on the test split of a probe whose L2 penalty was picked on a seeded validation
    part of the train split (ties go to the stronger penalty)."""
    if len(train_features) < 2 or len(test_features) == 0:
        raise ValueError(f"linear probe: need >= 2 train and >= 1 test samples, got {len(train_features)} "
                         f"and {len(test_features)}")
    with torch.inference_mode(False):  # features from an inference_mode evaluation cannot enter autograd as is
        train_features, train_labels, test_features, test_labels = (
            t.clone() for t in (train_features.float(), train_labels, test_features.float(), test_labels))
        return _probe(train_features, train_labels, test_features, test_labels, num_classes, weight_decays,
                      validation_fraction, seed)


def _probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
           test_labels: torch.Tensor, num_classes: int, weight_decays: tuple[float, ...],
           validation_fraction: float, seed: int) -> dict:
    order = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(order) * validation_fraction))
    val, fit_part = order[:n_val].to(train_features.device), order[n_val:].to(train_features.device)
    scores = {}
    for weight_decay in weight_decays:
        weight, bias = fit(train_features[fit_part], train_labels[fit_part], num_classes, weight_decay)
        scores[weight_decay] = accuracy(weight, bias, train_features[val], train_labels[val])
    best = max(weight_decays, key=lambda wd: (scores[wd], wd))
    weight, bias = fit(train_features, train_labels, num_classes, best)
    return {"linear_probe_top1": accuracy(weight, bias, test_features, test_labels),
            "linear_probe_weight_decay": best, "linear_probe_train_samples": len(train_features)}
