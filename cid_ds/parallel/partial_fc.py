"""The sharded centroid classifier of CLIP-CID's cluster discrimination (the PartialFC idea).

Rank r of W owns rows ``[start, start + C//W + (r < C%W))`` of the C x D classifier, initialised from
the k-means centroids. Each step:

1. the student embeddings of the global batch are all-gathered with gradient;
2. a fixed number of this rank's classes is sampled (insightface's partial_fc_v2): a random key per row,
   2 for every row that is a positive in the global batch, and the top k keys, with
   ``k = min(C_local, max(ceil(sample_rate * C_local), label slots of the global batch))``. Every positive is
   scored, and no shape depends on the labels, so the host never waits for the device to learn how many
   rows a step scores (CUDA graphs can replay the step). The set depends on the sharding: two world sizes
   score different random negatives;
3. cosine logits against the local sampled rows, the margin on the target logit, times the scale;
4. a softmax over all ranks' rows: row max all-reduced (MAX), exp-sums all-reduced (SUM).

Only the sampled rows are touched: they are cut out of the shard as a leaf tensor, and a row-wise
("lazy") AdamW updates just those rows and their moments. An optimizer over the whole shard would
write every row every step, as costly at sample rate 0.1 as at 1.0, and a dense gradient of the full
shard would be allocated each step.

Gradient convention: rank r's local embeddings receive ``W * dL/dE_r``. The student is data
parallel and DeepSpeed averages its gradients over W ranks, so it ends up with exactly ``dL/dtheta``,
the same convention as the gathered contrastive losses. The classifier rows receive exactly
``dL/dW_shard`` and are never averaged: they are not engine parameters and have their own optimizer.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cid_ds.parallel.collectives import all_gather_no_grad, all_gather_with_grad, world

MARGINS = ("arcface", "cosface", "none")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of the rows rank ``rank`` owns: the first ``C % W`` ranks own one extra row."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _DistLogSumExp(torch.autograd.Function):
    """Row-wise logsumexp over the class dimension split across ranks.

    Every rank holds the same result; the backward sums the upstream gradient over ranks (each rank's
    loss used its copy) and multiplies by the local softmax, the exact gradient for the local shard."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        row_max = logits.max(dim=1).values if logits.shape[1] else torch.full_like(logits[:, 0], -math.inf)
        if world()[1] > 1:
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
        if world()[1] > 1:
            dist.all_reduce(sum_exp)
        lse = row_max + torch.log(sum_exp)
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        logits, lse = ctx.saved_tensors
        grad = grad.contiguous()
        if world()[1] > 1:
            dist.all_reduce(grad)
        return grad[:, None] * torch.exp(logits - lse[:, None])


def dist_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax of the local class columns, normalised over every rank's columns."""
    return logits - _DistLogSumExp.apply(logits)[:, None]


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A value that is a sum of per-rank parts, differentiable: each rank's part receives the upstream
    gradient (every rank computes the same loss from it, so only one copy should count: see callers)."""
    if world()[1] == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


class ShardedCentroidClassifier(nn.Module):
    """This rank's shard of the C x D centroid classifier and the cluster-discrimination losses."""

    def __init__(self, centroids: torch.Tensor, margin: str = "arcface", scale: float = 32.0,
                 margin_value: float = 0.3, sample_rate: float = 1.0, learnable: bool = True, soft: bool = False,
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        default_rank, default_world = world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.num_classes, self.dim = centroids.shape
        self.start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        rows = F.normalize(centroids[self.start:self.start + self.num_local].float(), dim=-1)
        self.learnable = learnable
        self.register_buffer("weight", rows)
        # The teacher side of the soft-label loss scores against the fixed k-means centroids (a copy only
        # when the rows move: it costs as much memory as the shard itself).
        self.register_buffer("centroids", (rows.clone() if learnable else self.weight) if soft else torch.empty(0),
                             persistent=False)
        self.register_buffer("exp_avg", torch.zeros_like(rows) if learnable else torch.empty(0))
        self.register_buffer("exp_avg_sq", torch.zeros_like(rows) if learnable else torch.empty(0))
        # on the device: a step skipped there (cid_ds.step_guard) must not count, and the host never reads it
        self.register_buffer("updates", torch.zeros(()), persistent=False)
        self.margin, self.scale, self.margin_value = margin, scale, margin_value
        self.sample_rate, self.seed = sample_rate, seed
        self._sampled: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._warned_of_label_slots = False

    def num_sampled(self, label_slots: int, rank: Optional[int] = None) -> int:
        """How many rows rank ``rank`` (default: this one) scores per step when the global batch holds
        ``label_slots`` labels: at least the sample rate's share, and room for every label to be a different
        positive of this rank."""
        _, num_local = shard_range(self.num_classes, self.rank if rank is None else rank, self.world_size)
        if self.sample_rate >= 1:
            return num_local
        return min(num_local, max(math.ceil(self.sample_rate * num_local), label_slots))

    def sample(self, global_labels: torch.Tensor, step: int) -> torch.Tensor:
        """Sorted local row indices to score this step (all of them at sample_rate 1); ``global_labels`` of
        any shape, each one kept."""
        device = self.weight.device
        if self.sample_rate >= 1 or self.num_local == 0:  # a rank may own no class when C < W
            return torch.arange(self.num_local, device=device)
        # on the classifier's device: at C = 1M a CPU draw took 4.3 ms of the host's step
        generator = torch.Generator(device).manual_seed((self.seed * 1_000_003 + step) * 1_009 + self.rank)
        keys = torch.rand(self.num_local, generator=generator, device=device)
        global_labels = global_labels.reshape(-1)
        owned = (global_labels >= self.start) & (global_labels < self.start + self.num_local)
        at = (global_labels - self.start).clamp(0, self.num_local - 1)
        keys.scatter_reduce_(0, at, owned.to(keys.dtype) * 2, reduce="amax")  # positives above every draw
        count = self.num_sampled(len(global_labels))
        share = math.ceil(self.sample_rate * self.num_local)
        if count > share and self.rank == 0 and not self._warned_of_label_slots:
            self._warned_of_label_slots = True
            warnings.warn(f"cluster.sample_rate {self.sample_rate}: rank 0 scores {count} of its {self.num_local} "
                          f"classes, not {share}: the global batch holds {len(global_labels)} labels, which could all "
                          "be positives of one rank, and every positive is scored")
        return keys.topk(count, sorted=False).indices.sort().values

    def _sampled_rows(self, global_labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.sample(global_labels, step)
        rows = self.weight[index].requires_grad_(self.learnable)
        self._sampled = (index, rows)
        return index, rows

    def sampled_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(local row indices, their gradient) from the last backward."""
        index, rows = self._sampled
        return index, rows.grad if rows.grad is not None else torch.zeros_like(rows)

    @torch.no_grad()
    def update(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               skip: Optional[torch.Tensor] = None) -> None:
        """One AdamW step (no weight decay) on the rows sampled in the last forward, then forget them. ``skip``:
        a device flag (cid_ds.step_guard); where it is 1 the rows, their moments and the count stay as they were,
        decided without the host reading it."""
        if not self.learnable or self._sampled is None:
            return
        index, grad = self.sampled_grad()
        beta1, beta2 = betas
        go = torch.ones((), dtype=torch.bool, device=grad.device) if skip is None else skip == 0
        updates = self.updates + go.to(self.updates.dtype)
        old_m, old_v, old_w = self.exp_avg[index], self.exp_avg_sq[index], self.weight[index]
        m = torch.where(go, old_m * beta1 + grad * (1 - beta1), old_m)
        v = torch.where(go, old_v * beta2 + grad * grad * (1 - beta2), old_v)
        step = m / (1 - beta1 ** updates) / ((v / (1 - beta2 ** updates)).sqrt() + eps)
        self.exp_avg[index], self.exp_avg_sq[index] = m, v
        self.weight[index] = torch.where(go, old_w - lr * step, old_w)
        self.updates = updates
        self._sampled = None

    def _gather(self, embeddings: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None):
        scaled = _ScaleGrad.apply(embeddings, float(self.world_size)) if self.world_size > 1 else embeddings
        weights = torch.ones(len(labels), device=embeddings.device) if weights is None else weights.float()
        return F.normalize(all_gather_with_grad(scaled), dim=-1), all_gather_no_grad(labels), all_gather_no_grad(weights)

    def _local_targets(self, global_labels: torch.Tensor, index: torch.Tensor):
        """Column of each label ([N, l]) among the sampled local rows, -1 where another rank owns it."""
        if len(index) == 0:
            return torch.full_like(global_labels, -1)
        global_index = index + self.start
        pos = torch.searchsorted(global_index, global_labels.contiguous()).clamp(max=len(index) - 1)
        return torch.where(global_index[pos] == global_labels, pos, torch.full_like(pos, -1))

    def _with_margin(self, cosine: torch.Tensor, target_cols: torch.Tensor) -> torch.Tensor:
        """The margin on each row's target columns where this rank owns them (``target_cols`` [N, l]); computed
        for every row and added as a delta (zero where not owned), so that the host never waits for which
        rows those are and a clamped placeholder column is never overwritten."""
        if self.margin == "none" or cosine.shape[1] == 0:
            return cosine * self.scale
        cols = target_cols.clamp(min=0)
        target = cosine.gather(1, cols)
        if self.margin == "arcface":
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            adjusted = torch.cos((theta + self.margin_value).clamp(max=math.pi))
        else:
            adjusted = target - self.margin_value
        delta = torch.where(target_cols >= 0, adjusted - target, torch.zeros_like(target))
        return cosine.scatter_add(1, cols, delta) * self.scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0,
                weights: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``embeddings`` [B,D] local rows; ``labels`` [B] global class ids (margin softmax) or [B, l] with
        l > 1 (MLCD's multi-label loss: each row's l nearest centroids are all positives); ``weights`` [B]:
        each row's weight in the mean (default 1). Returns the loss (same value on every rank), the top-1
        accuracy against each row's first label (weighted like the loss) and the sampled fraction."""
        labels = labels[:, None] if labels.ndim == 1 else labels
        all_embeddings, all_labels, all_weights = self._gather(embeddings, labels, weights)
        index, rows = self._sampled_rows(all_labels, step)
        cosine = all_embeddings @ F.normalize(rows, dim=-1).T
        target_cols = self._local_targets(all_labels, index)
        logits = self._with_margin(cosine, target_cols)
        row_loss = self._multi_label_loss(logits, target_cols) if all_labels.shape[1] > 1 \
            else self._softmax_loss(logits, target_cols[:, 0])
        return {"loss": (row_loss * all_weights).sum() / all_weights.sum(),
                "accuracy": self._accuracy(cosine, index, all_labels[:, 0], all_weights),
                "sampled_fraction": self._sampled_fraction(all_labels.numel())}

    def _softmax_loss(self, logits: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
        """Per row: -log softmax of its target column over every rank's sampled columns."""
        log_probs = dist_log_softmax(logits)
        if log_probs.shape[1] == 0:  # no class of this rank sampled
            target_log_prob = torch.zeros(len(logits), device=logits.device, dtype=log_probs.dtype)
        else:
            picked = log_probs.gather(1, target_col.clamp(min=0)[:, None])[:, 0]
            target_log_prob = torch.where(target_col >= 0, picked, torch.zeros_like(picked))
        # Every rank computes the same rows; each rank's target part only counts once: the all-reduce
        # of the parts is linear and its gradient goes to the owner's copy.
        return -sum_over_ranks(target_log_prob)

    def _multi_label_loss(self, logits: torch.Tensor, target_cols: torch.Tensor) -> torch.Tensor:
        """Per row, MLCD's loss: log(1 + sum_pos e^-s) + log(1 + sum_neg e^s) over every rank's sampled
        columns."""
        owned = (target_cols >= 0).to(torch.int32)
        positive = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, target_cols.clamp(min=0), owned) > 0
        minus_inf = torch.full_like(logits, -math.inf)
        return (self._log_one_plus_sum_exp(torch.where(positive, -logits, minus_inf))
                + self._log_one_plus_sum_exp(torch.where(positive, minus_inf, logits)))

    def _log_one_plus_sum_exp(self, x: torch.Tensor) -> torch.Tensor:
        """log(1 + sum e^x) over every rank's columns, the same value on every rank. Rank 0 adds the zero
        column and alone carries the gradient: the logsumexp's backward sums the upstream over ranks, so
        one copy must count (the others stay in the graph with weight 0, to join that all-reduce)."""
        if self.rank == 0:
            x = torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
        return sum_over_ranks(_DistLogSumExp.apply(x) * float(self.rank == 0))

    def soft_forward(self, embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, labels: torch.Tensor,
                     step: int = 0, temperature: float = 1.0, weights: Optional[torch.Tensor] = None
                     ) -> dict[str, torch.Tensor]:
        """Soft labels: KL(teacher softmax over the centroids || student softmax), both at scale/temperature.
        ``labels`` ([B] or [B, l]) only choose the classes always scored and the accuracy's target."""
        if not self.centroids.numel():
            raise ValueError("soft_forward needs a classifier built with soft=True")
        labels = labels[:, None] if labels.ndim == 1 else labels
        all_embeddings, all_labels, all_weights = self._gather(embeddings, labels, weights)
        all_teacher = F.normalize(all_gather_no_grad(teacher_embeddings.float()), dim=-1)
        index, rows = self._sampled_rows(all_labels, step)
        cosine = all_embeddings @ F.normalize(rows, dim=-1).T
        student_log_probs = dist_log_softmax(cosine * self.scale / temperature)
        with torch.no_grad():
            teacher_log_probs = dist_log_softmax(all_teacher @ self.centroids[index].T * self.scale / temperature)
        kl_parts = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=1)
        return {"loss": (sum_over_ranks(kl_parts) * all_weights).sum() / all_weights.sum(),
                "accuracy": self._accuracy(cosine, index, all_labels[:, 0], all_weights),
                "sampled_fraction": self._sampled_fraction(all_labels.numel())}

    @torch.no_grad()
    def _accuracy(self, cosine: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
                  ) -> torch.Tensor:
        """Top-1 over the sampled classes (the best local class per row, then the best over ranks), weighted."""
        if len(index):
            best, col = cosine.max(dim=1)
            best_class = index[col] + self.start
        else:
            best = torch.full((len(labels),), -math.inf, device=cosine.device)
            best_class = torch.full((len(labels),), -1, device=cosine.device, dtype=torch.long)
        if self.world_size > 1:
            scores = [torch.empty_like(best) for _ in range(self.world_size)]
            classes = [torch.empty_like(best_class) for _ in range(self.world_size)]
            dist.all_gather(scores, best)
            dist.all_gather(classes, best_class)
            winner = torch.stack(scores).argmax(dim=0)
            best_class = torch.stack(classes).gather(0, winner[None]).squeeze(0)
        return ((best_class == labels).float() * weights).sum() / weights.sum()

    def _sampled_fraction(self, label_slots: int) -> torch.Tensor:
        """The fraction of all classes scored over every rank: known on the host (no all-reduce, no read)."""
        total = sum(self.num_sampled(label_slots, rank) for rank in range(self.world_size))
        return torch.full((), total / self.num_classes, device=self.weight.device)

    # --- checkpoint: one file per rank, re-sharded on load when the world size changed ---------------

    def shard_file(self, directory: str, rank: Optional[int] = None) -> str:
        return os.path.join(directory, f"centroid_classifier_rank{self.rank if rank is None else rank}.pt")

    def save(self, directory: str) -> None:
        from cid_ds.io import atomic_path
        state = {"weight": self.weight.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                 "updates": int(self.updates), "start": self.start, "num_classes": self.num_classes,
                 "world_size": self.world_size}
        with atomic_path(self.shard_file(directory)) as tmp:
            torch.save(state, tmp)

    def load(self, directory: str) -> None:
        """Restore this rank's rows and their Adam moments from the shards any world size saved."""
        first = torch.load(self.shard_file(directory, 0), map_location="cpu", weights_only=True)
        if first["num_classes"] != self.num_classes:
            raise ValueError(f"{self.shard_file(directory, 0)}: {first['num_classes']} classes saved, "
                             f"the classifier has {self.num_classes}")
        shards = [first] + [torch.load(self.shard_file(directory, r), map_location="cpu", weights_only=True)
                            for r in range(1, first["world_size"])]
        rows = slice(self.start, self.start + self.num_local)
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            if getattr(self, name).numel():
                getattr(self, name).copy_(torch.cat([s[name] for s in shards])[rows])
        self.updates.fill_(first["updates"])
