"""fit(): train K packed members (K=1 is a single model) with validation-driven control.

Every decision — learning-rate lowering, batch growth, early stopping, which weights to keep — looks only at each
member's validation images (a split carved from train/, or its out-of-bag images). The test split never enters.

Images stay a uint8 tensor on the training device; each step gathers one batch per member, augments the whole
stack at once and runs it through the grouped network, so K members cost one pass.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lungxray.config import TrainConfig
from lungxray.io.files import atomic_write, write_json
from lungxray.models.kernels.inference import kernels_for_inference
from lungxray.models.nets import member_rows, scatter_members, select_members
from lungxray.runtime import autocast, eval_mode, normalize
from lungxray.training import distributed
from lungxray.training.averaging import WeightAverage, decay_for
from lungxray.training.checkpoint import has_checkpoint, load_checkpoint, load_member, member_record, save_checkpoint
from lungxray.training.plan import MemberPlan
from lungxray.transforms.geometric import Augmenter
from lungxray.transforms.photometric import PhotometricAugmenter

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything that changes during training; checkpointed every epoch so training can resume."""

    epoch: int = 0
    lr: float = 0.0
    batch_size: int = 32
    plateau_wait: int = 0
    best_monitor: float = math.inf
    member_best: list[float] = field(default_factory=list)
    member_best_epoch: list[int] = field(default_factory=list)
    member_wait: list[int] = field(default_factory=list)
    member_stopped: list[bool] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0


def member_slice(tensor: torch.Tensor, members: int, k: int) -> torch.Tensor:
    """Member k's part of a packed tensor (leading dimension member-major), or the tensor if it is shared."""
    if tensor.dim() == 0 or tensor.shape[0] % members != 0 or members == 1:
        return tensor.reshape(-1) if members == 1 else tensor
    return tensor.reshape(members, -1)[k]


def copy_member(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], members: int, k: int) -> None:
    """Overwrite member k's weights in `dst` (contiguous tensors) with those of `src`."""
    for name, target in dst.items():
        if target.dim() == 0 or target.shape[0] % members != 0:
            continue
        target.view(members, -1)[k].copy_(src[name].reshape(members, -1)[k])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer, fused (one kernel for all parameters) where PyTorch has it for the device.

    Fused AdamW measured ~5x faster than the default multi-tensor one on the seed CNN's 14.7 M-weight dense layer
    (2 CPU cores, see docs/performance.md); the update is mathematically the same.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, fused=fused)


def _augment_shard(augmenter: Augmenter, images: torch.Tensor, index: torch.Tensor, total: int,
                   offset: int | torch.Tensor) -> torch.Tensor:
    """`normalize(images[index])` (n, 1, H, W) augmented as rows [offset, offset + n) of a `total`-row batch.

    The parameters are drawn for the whole batch: on N data-parallel ranks every rank draws the same ones for the
    global batch and keeps its rows, so a run on N ranks sees the same augmentations as a run on one. `offset`
    may also be a tensor of row indices (the still-active members' rows when stopped members were pruned).
    """
    if augmenter.params.is_identity():
        return normalize(images[index]).unsqueeze(1)
    p = augmenter.sample(total, images.shape[-2], images.shape[-1])
    if total != index.numel():
        rows = offset if isinstance(offset, torch.Tensor) else slice(offset, offset + index.numel())
        p = {k: v[rows.to(v.device) if isinstance(rows, torch.Tensor) else rows] for k, v in p.items()}
    return augmenter.apply_gathered(images, index, p)


def _photometric_rows(photometric: PhotometricAugmenter, x: torch.Tensor, total: int,
                      rows: torch.Tensor | None) -> torch.Tensor:
    """Photometric changes of `x` with the draws rows `rows` of a `total`-row batch get (all of x when None)."""
    if rows is None or photometric.params.is_identity():
        return photometric(x)
    p = photometric.sample(total)
    noise = None
    if bool((p["noise"] > 0).any()):
        noise = torch.randn((total, *x.shape[1:]), generator=photometric.generator, dtype=torch.float32)[rows]
    return photometric.apply(x, {k: v[rows] for k, v in p.items()}, noise)


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Coupled L2 on weight matrices and kernels (not biases or norms), like Keras kernel_regularizer=l2."""
    terms = [p.pow(2).sum() for name, p in model.named_parameters() if p.dim() > 1 and "norm" not in name]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def class_weight_table(labels: torch.Tensor, plan: MemberPlan, num_classes: int) -> torch.Tensor:
    """(K, C) inverse-frequency weights of each member's own sample (mean weight 1 per member)."""
    idx = torch.as_tensor(plan.train_index, device=labels.device)
    counts = torch.stack([torch.bincount(labels[i], minlength=num_classes) for i in idx]).float()
    return counts.sum(1, keepdim=True) / (num_classes * counts.clamp(min=1))


def member_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    smoothing: float,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy per member. logits (B, K, C), targets (B, K) -> (K,).

    `mix` = (partner targets, weights lam) from `mixup_batch`: each image's loss is lam * CE(target) +
    (1 - lam) * CE(partner), the cross-entropy against the mixed label.
    """
    b, k, c = logits.shape
    flat = logits.float().reshape(b * k, c)

    def ce(t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(flat, t.reshape(b * k), reduction="none", label_smoothing=smoothing).view(b, k)

    if weights is None and mix is None:
        return ce(targets).mean(0)
    rows = torch.arange(k, device=targets.device)
    parts = [(targets, 1.0)] if mix is None else [(targets, mix[1]), (mix[0], 1.0 - mix[1])]
    loss, norm = flat.new_zeros(b, k), flat.new_zeros(b, k)
    for t, share in parts:
        w = share * weights[rows, t] if weights is not None else share  # a (B, K) tensor or a number
        loss, norm = loss + w * ce(t), norm + w
    return loss.sum(0) / norm.sum(0)


def mixup_batch(
    x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator, total: int, offset: int,
    columns: list[int] | None = None, members: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Mixup (Zhang et al., 2018) within each member's batch: image i blends with image i+1 of the shard.

    x (B, K, H, W), y (B, K). The batch order is already a fresh random permutation per member, so the
    neighbour is a random partner. Weights lam ~ Beta(alpha, alpha) per image and member, folded to >= 0.5 so
    that the image's own label dominates and training accuracy keeps its meaning. They are drawn for the whole
    `total`-row batch from the run's checkpointed generator (every rank the same draws, a resume the same too);
    a rank keeps rows [offset, offset + B). With `columns` (pruned members) x holds those of `members` members;
    the weights are drawn for all of them and the columns kept. Returns the mixed batch and (partner targets, lam).
    """
    lam_all = rng.beta(alpha, alpha, size=(total, members or x.shape[1]))
    lam_np = np.maximum(lam_all, 1.0 - lam_all)[offset : offset + x.shape[0]]
    lam_np = lam_np[:, columns] if columns is not None else lam_np
    lam = torch.as_tensor(lam_np, device=x.device, dtype=torch.float32)
    # partner + lam * (x - partner) in one pass over a copy: 3.5x faster than w * x + (1 - w) * partner on 2 cores
    mixed = torch.roll(x, -1, 0).lerp_(x, lam.view(*lam.shape, 1, 1).to(x.dtype))
    return mixed, (torch.roll(y, -1, 0), lam)


@dataclass(frozen=True)
class EpochInputs:
    """What an epoch reads and never changes: the images, labels and member plan, the augmenters, the precision.

    images: uint8 (N, H, W) on the training device; labels: (N,) int64. `class_weights`: the (K, C) table of
    `class_weight_table`, or None for an unweighted loss.
    `photometric` (gamma, contrast, blur, noise, JPEG) runs after the geometric augmentation; it is reseeded
    from the epoch number, so a resumed run draws the same changes without a checkpointed generator.
    `members`: the plan's members that the model computes (a network pruned to the active members, see `fit`;
    None: all of them); every random draw (order, augmentation, photometric, mixup) is still made for all members
    and the rows of these kept, so each member sees the images and augmentations it would have seen unpruned.
    """

    images: torch.Tensor
    labels: torch.Tensor
    plan: MemberPlan
    augmenter: Augmenter
    photometric: PhotometricAugmenter | None = None
    amp_dtype: torch.dtype = torch.float32
    class_weights: torch.Tensor | None = None
    members: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StepHooks:
    """What follows every optimizer step: the weight average's update (time constant `cfg.ema_epochs`), when one
    is kept, and a callback given the global batch's row count (a progress bar, a timer)."""

    average: WeightAverage | None = None
    on_step: Callable[[int], None] | None = None


@dataclass(frozen=True)
class _EpochDraws:
    """An epoch's fixed parts, drawn once before its first step: each computed member's own image order, which of
    them still train (0/1 loss weights), their class weights, the weight-average decay, the data-parallel ranks."""

    order: np.ndarray  # (K computed, n)
    ks: list[int]  # the plan's members the model computes, in order
    k_plan: int  # the plan's member count
    active: torch.Tensor  # (K computed,) float 0/1
    class_weights: torch.Tensor | None
    decay: float
    world: int  # ranks sharing each batch (1 without torchrun)

    @property
    def pruned(self) -> bool:
        return len(self.ks) < self.k_plan


@dataclass(frozen=True)
class _Batch:
    """One step's input: this rank's augmented (and mixed) images x (B, K, H, W), labels y (B, K), the mixup
    partners (targets, lam) or None, this rank's row count b and the global batch's b_all."""

    x: torch.Tensor
    y: torch.Tensor
    mix: tuple[torch.Tensor, torch.Tensor] | None
    b: int
    b_all: int


@dataclass
class _Tally:
    """The epoch's running training loss and accuracy: means over the active members, weighted by batch rows."""

    loss: float = 0.0
    correct: float = 0.0
    seen: int = 0

    def add(self, losses: torch.Tensor, logits: torch.Tensor, batch: _Batch, active: torch.Tensor) -> None:
        with torch.no_grad():
            correct = (logits.argmax(-1) == batch.y).float().mean(0)
        n_active = float(active.sum().clamp(min=1))
        self.loss += float((losses.detach() * active).sum()) / n_active * batch.b
        self.correct += float((correct * active).sum()) / n_active * batch.b
        self.seen += batch.b

    def means(self, world: int, device: torch.device) -> dict[str, float]:
        """Mean loss and accuracy over every rank's rows (the sums are all-reduced under data-parallel torchrun)."""
        loss, correct, seen = self.loss, self.correct, self.seen
        if world > 1:
            sums = distributed.all_reduce_sum(torch.tensor([loss, correct, seen], dtype=torch.float64, device=device))
            loss, correct, seen = float(sums[0]), float(sums[1]), int(sums[2])
        return {"train_loss": loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def _draw_epoch(inputs: EpochInputs, state: TrainState, cfg: TrainConfig, rng: np.random.Generator) -> _EpochDraws:
    """The epoch's orders from the run's generator, drawn for all the plan's members (a pruned run draws the same)."""
    if inputs.photometric is not None:
        inputs.photometric.set_epoch(state.epoch)
    k_plan, n = inputs.plan.train_index.shape
    ks = list(range(k_plan)) if inputs.members is None else list(inputs.members)
    order = np.stack([row[rng.permutation(n)] for row in inputs.plan.train_index])[ks]  # (K, n), own order per member
    active = torch.tensor([not state.member_stopped[k] for k in ks], device=inputs.images.device, dtype=torch.float32)
    class_weights = inputs.class_weights
    if len(ks) < k_plan and class_weights is not None:
        class_weights = class_weights[ks]
    decay = decay_for(cfg.ema_epochs, math.ceil(n / state.batch_size))
    return _EpochDraws(order, ks, k_plan, active, class_weights, decay, distributed.data_world())


def _augment_batch(inputs: EpochInputs, draws: _EpochDraws, idx: torch.Tensor, b_all: int, lo: int) -> torch.Tensor:
    """The images `idx` (B, K) indexes, standardised, with geometric, then photometric changes: (B, K, H, W), rows
    [lo, lo + B) of the b_all-row global batch.

    The draws are made for the whole global batch of all the plan's members and this rank's (computed) rows kept.
    """
    b, k_members = idx.shape
    h, w = inputs.images.shape[-2:]
    rows = None
    if draws.pruned:
        rows = (torch.arange(lo, lo + b)[:, None] * draws.k_plan + torch.tensor(draws.ks)[None, :]).reshape(-1)
    x = _augment_shard(inputs.augmenter, inputs.images, idx.reshape(-1), b_all * draws.k_plan,
                       rows if rows is not None else lo * k_members)
    x = x.reshape(b, k_members, h, w)
    if inputs.photometric is not None:
        x = _photometric_rows(inputs.photometric, x.reshape(b * k_members, 1, h, w), b_all * draws.k_plan, rows)
        x = x.reshape(b, k_members, h, w)
    return x


def _make_batch(inputs: EpochInputs, draws: _EpochDraws, columns: np.ndarray, cfg: TrainConfig,
                rng: np.random.Generator) -> _Batch | None:
    """This rank's shard of the global batch `columns` (K, B) of image indices, gathered, augmented and mixed.

    None for a batch too small to train on: a batch of one breaks batch norm and adds nothing.
    """
    idx = torch.as_tensor(columns, device=inputs.images.device)  # (K, B) the global batch
    b_all = idx.shape[1]
    if b_all < max(2, draws.world):
        return None
    lo, hi = distributed.batch_shard(b_all)  # this rank's columns: all of them in one process
    idx = idx[:, lo:hi]
    x = _augment_batch(inputs, draws, idx.T, b_all, lo)  # (B, K, H, W)
    y = inputs.labels[idx.T]  # (B, K)
    mix = None
    if cfg.mixup > 0:
        x, mix = mixup_batch(x, y, cfg.mixup, rng, b_all, lo, draws.ks if draws.pruned else None, draws.k_plan)
    # x stays (B, K, H, W) as augmented: the first layers read it by strides (the stem kernels) or reorder it
    # themselves (oneDNN); a channels-last copy of it here cost the reference's step 25 ms and saved nothing
    return _Batch(x, y, mix, hi - lo, b_all)


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: _Batch, draws: _EpochDraws,
                    cfg: TrainConfig, inputs: EpochInputs, average: WeightAverage | None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, the active members' loss, backward, one optimizer step; returns the (K,) losses and the logits."""
    with autocast(inputs.images.device, inputs.amp_dtype):
        logits = model(batch.x)  # (B, K, C)
    losses = member_losses(logits, batch.y, draws.class_weights, cfg.label_smoothing, batch.mix)
    loss = (losses * draws.active).sum() * (batch.b * draws.world / batch.b_all)  # DDP averages ranks: shard size
    if cfg.l2 > 0:
        loss = loss + cfg.l2 * l2_penalty(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if average is not None:
        average.update(draws.decay)
    return losses, logits


def train_one_epoch(
    model: nn.Module,
    inputs: EpochInputs,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: TrainConfig,
    rng: np.random.Generator,
    hooks: StepHooks | None = None,
) -> dict[str, float]:
    """One pass over each member's sample; returns mean training loss and accuracy over active members.

    `model` computes the members `inputs.members` (all of the plan's by default); `hooks` run after every
    optimizer step. `state.images_seen` counts the images of the members still training.
    """
    hooks = hooks or StepHooks()
    draws = _draw_epoch(inputs, state, cfg, rng)
    model.train()
    tally = _Tally()
    bs = state.batch_size
    for start in range(0, draws.order.shape[1], bs):
        batch = _make_batch(inputs, draws, draws.order[:, start : start + bs], cfg, rng)
        if batch is None:
            continue
        losses, logits = _optimizer_step(model, optimizer, batch, draws, cfg, inputs, hooks.average)
        tally.add(losses, logits, batch, draws.active)
        state.images_seen += batch.b_all * int(draws.active.sum())
        if hooks.on_step is not None:
            hooks.on_step(batch.b_all)
    return tally.means(draws.world, inputs.images.device)


def predict_members(
    model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype, batch_size: int = 64,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of every member on every image: uint8 (N, H, W) -> float32 (N, K, C). With `index` (M, K) of image
    indices, member k sees its own image index[m, k] in row m instead: -> (M, K, C), one pass for all members."""
    members = model.members
    rows = len(images) if index is None else len(index)
    outs = []
    with eval_mode(model), kernels_for_inference():  # the training kernels, forward only: ~2x oneDNN's on AVX2
        for start in range(0, rows, batch_size):
            if index is None:
                x = normalize(images[start : start + batch_size]).unsqueeze(1)
                x = x.expand(-1, members, -1, -1)  # type: ignore[call-overload]
            else:
                x = normalize(images[index[start : start + batch_size]])  # (B, K, H, W)
            x = x.contiguous(memory_format=torch.channels_last)  # type: ignore[call-overload]
            with autocast(images.device, amp_dtype):
                outs.append(model(x).float())
    return torch.cat(outs)


def member_columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's validation images side by side, for one packed pass: (K, L) image indices and (K, L) validity,
    L the largest member's count; a shorter row repeats its first image there, marked invalid.

    Why: out-of-bag sets differ per member (~37% of the pool each, their union nearly all of it); scoring every
    member on the union scored 2.5x the member-images that matter (the reference: 249 rows against 98), and
    took 2x the time (`bench/validation.py`).
    """
    counts = mask.sum(1)
    width = int(counts.max()) if len(counts) else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]  # own images first, pool order
    valid = torch.arange(width, device=mask.device) < counts[:, None]
    return torch.where(valid, order, order[:, :1]), valid


def evaluate_members(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, plan: MemberPlan, amp_dtype: torch.dtype,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Validation loss and accuracy of each member on its own validation images, `batch_size` rows at a time (the
    training batch's: the 3x3 kernels' plans measured for it apply, none are measured for another size).

    Under data-parallel torchrun each rank scores a shard of the columns and the sums are all-reduced.
    """
    index, valid = member_columns(torch.as_tensor(plan.val_mask, device=images.device))  # (K, L)
    lo, hi = distributed.batch_shard(index.shape[1])
    index, valid = index[:, lo:hi].T, valid[:, lo:hi].T  # (M, K)
    sums = torch.zeros(3, plan.members, device=images.device)
    if len(index):
        logits = predict_members(model, images, amp_dtype, batch_size, index)  # (M, K, C)
        m = valid.float()
        y = labels[index]
        ce = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none")  # (M, K)
        correct = (logits.argmax(-1) == y).float()
        sums = torch.stack([(ce * m).sum(0), (correct * m).sum(0), m.sum(0)])
    sums = distributed.all_reduce_sum(sums)
    count = sums[2].clamp(min=1)
    loss_k = (sums[0] / count).tolist()
    acc_k = (sums[1] / count).tolist()
    return {"member_val_loss": loss_k, "member_val_accuracy": acc_k}


def _monitor_value(cfg: TrainConfig, loss: float, acc: float) -> float:
    """Lower is better for both monitors."""
    return loss if cfg.monitor == "val_loss" else -acc


def _on_plateau(state: TrainState, cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> str:
    """Lower the learning rate or grow the batch, as configured; returns what was done (for the log)."""
    grow = cfg.plateau_action in ("batch", "batch_then_lr") and state.batch_size < cfg.max_batch_size
    if grow:
        state.batch_size = min(state.batch_size * cfg.batch_growth, cfg.max_batch_size)
        return f"batch size -> {state.batch_size}"
    if cfg.plateau_action in ("lr", "batch_then_lr") and state.lr > cfg.min_lr:
        state.lr = max(state.lr * cfg.lr_factor, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = state.lr
        return f"learning rate -> {state.lr:.2e}"
    return ""


def end_of_epoch(
    state: TrainState, cfg: TrainConfig, optimizer: torch.optim.Optimizer, val: dict[str, Any],
    model_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor], members: int,
) -> list[str]:
    """Update per-member early stopping and the shared plateau rule; returns log events."""
    events = []
    for k in range(members):
        if state.member_stopped[k]:
            continue
        score = _monitor_value(cfg, val["member_val_loss"][k], val["member_val_accuracy"][k])
        if score < state.member_best[k] - 1e-6:
            state.member_best[k], state.member_best_epoch[k], state.member_wait[k] = score, state.epoch, 0
            copy_member(best_state, model_state, members, k)
        else:
            state.member_wait[k] += 1
            if cfg.early_stopping_patience and state.member_wait[k] >= cfg.early_stopping_patience:
                state.member_stopped[k] = True
                events.append(f"member {k} stopped early (best epoch {state.member_best_epoch[k]})")
    active = [k for k in range(members) if not state.member_stopped[k]] or list(range(members))
    monitor = float(np.mean([
        _monitor_value(cfg, val["member_val_loss"][k], val["member_val_accuracy"][k]) for k in active
    ]))
    if monitor < state.best_monitor - 1e-6:
        state.best_monitor, state.plateau_wait = monitor, 0
    else:
        state.plateau_wait += 1
        if cfg.plateau_action != "none" and state.plateau_wait >= cfg.plateau_patience:
            state.plateau_wait = 0
            if event := _on_plateau(state, cfg, optimizer):
                events.append(event)
    return events


@dataclass
class _Work:
    """The network the epoch loop trains: the whole packed model, or a smaller one of the still-active members."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None
    ks: list[int]  # the plan's members it computes, in order
    step_model: Any = None

    def plan(self, plan: MemberPlan) -> MemberPlan:
        return plan if len(self.ks) == plan.members else MemberPlan(plan.train_index[self.ks],
                                                                    plan.val_mask[self.ks], plan.bootstrap)


def _optimizer_rows(dst: torch.optim.Optimizer, src: torch.optim.Optimizer, dst_params: list[nn.Parameter],
                    src_params: list[nn.Parameter], ks: list[int], members: int, gather: bool) -> None:
    """Move per-parameter optimizer state between a full packed model (`members`) and one of members `ks`.

    gather=True: dst is the small one and gets rows ks of src's state; False: src's (small) state is written into
    rows ks of dst's. State tensors shaped like their parameter are sliced and take the destination parameter's
    strides (the fused optimizers walk raw memory); others (AdamW's shared `step`) are copied.
    """
    for pd, ps in zip(dst_params, src_params, strict=True):
        st = src.state.get(ps)
        if not st:
            continue
        out = dst.state.setdefault(pd, {})
        for key, value in st.items():
            if not (torch.is_tensor(value) and value.dim() > 0 and value.shape == ps.shape):
                out[key] = value.clone() if torch.is_tensor(value) else value
            elif gather:
                out[key] = torch.empty_like(pd, dtype=value.dtype).copy_(member_rows(value, ks, members))
            else:
                if key not in out:
                    out[key] = torch.zeros_like(pd, dtype=value.dtype)
                scatter_members({key: out[key]}, {key: value}, ks, members)
    for group in dst.param_groups:
        group["lr"] = src.param_groups[0]["lr"]


def _shrink(full: _Work, ks: list[int], cfg: TrainConfig, members: int) -> _Work:
    """A network of members `ks` of the full one, with their optimizer moments and weight average."""
    small = select_members(full.model, ks)
    optimizer = make_optimizer(small, cfg)
    _optimizer_rows(optimizer, full.optimizer, list(small.parameters()), list(full.model.parameters()), ks, members,
                    gather=True)
    average = None
    if full.average is not None:
        average = WeightAverage(small)
        average.load({k: member_rows(v, ks, members).to(v.dtype) for k, v in full.average.shadow.items()})
    return _Work(small, optimizer, average, ks)


def _write_back(full: _Work, work: _Work, members: int) -> None:
    """Copy the small network's weights, moments and average into members work.ks of the full one."""
    if work is full:
        return
    scatter_members(full.model.state_dict(), work.model.state_dict(), work.ks, members)
    _optimizer_rows(full.optimizer, work.optimizer, list(full.model.parameters()), list(work.model.parameters()),
                    work.ks, members, gather=False)
    if full.average is not None and work.average is not None:
        scatter_members(full.average.shadow, work.average.shadow, work.ks, members)


def _full_val(val: dict[str, Any], ks: list[int], members: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-member validation lists over all members: those not computed keep their last recorded value."""
    if len(ks) == members:
        return val
    out = {}
    for key, values in val.items():
        last = history[-1][key] if history else [math.nan] * members
        out[key] = list(last)
        for j, k in enumerate(ks):
            out[key][k] = values[j]
    return out


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: training stops, and no bundle is written from them."""


def check_finite(loss: float, model: nn.Module, epoch: int) -> None:
    """Once per epoch: a non-finite training loss or weight ends the run with one line (and a non-zero exit)."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged in epoch {epoch}: the training loss is {loss} (lower train.lr?)")
    bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None)
    if bad is not None:
        raise TrainingDiverged(f"training diverged in epoch {epoch}: weight {bad} holds NaN or infinite values "
                               "(lower train.lr?)")


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar on a terminal or in a notebook; None (plain log lines) when output is redirected."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    in_notebook = "ipykernel" in sys.modules
    if not (sys.stderr.isatty() or in_notebook):
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False)


@dataclass
class _Run:
    """One fit()'s moving parts from epoch to epoch: the full packed network and its optimizer (`full`, what is
    checkpointed), the network the loop trains (`work`: the full one, or one of the still-active members), the
    training state, each member's best weights and the run's generator (checkpointed with them, so a resumed run
    draws what an uninterrupted one would)."""

    full: _Work
    work: _Work
    state: TrainState
    best_state: dict[str, torch.Tensor]
    rng: np.random.Generator
    prune: bool  # members that stopped early leave the computation

    @property
    def members(self) -> int:
        return len(self.full.ks)

    def active(self) -> list[int]:
        return [k for k in range(self.members) if not self.state.member_stopped[k]]


@dataclass(frozen=True)
class _EpochClock:
    """When the epoch started, how long its training steps took and the images seen before it (for images/s)."""

    start: float
    train_seconds: float
    images_before: int


def _start_run(model: nn.Module, plan: MemberPlan, cfg: TrainConfig, augmenter: Augmenter, seed: int,
               resume_from: Path | None) -> _Run:
    """A fresh run, or the one checkpointed in `resume_from` (when it holds a checkpoint)."""
    members = plan.members
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(seed)
    best_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    average = WeightAverage(model) if cfg.ema_epochs > 0 else None  # validated and kept instead of the weights
    state = TrainState(
        lr=cfg.lr, batch_size=cfg.batch_size, member_best=[math.inf] * members,
        member_best_epoch=[0] * members, member_wait=[0] * members, member_stopped=[False] * members,
    )
    if resume_from is not None and has_checkpoint(resume_from):
        state, best_state, rng = load_checkpoint(resume_from, model, optimizer, augmenter, TrainState, plan=plan,
                                                 average=average)
        log.info("resuming %s after epoch %d", resume_from, state.epoch)
    # Members that stopped early leave the computation: the loop trains a smaller packed network of the active
    # ones (`_Work`), written back into `model` every epoch (checkpoint, best weights) and at the end.
    prune = cfg.prune_stopped and distributed.data_world() == 1 and members > 1
    full = _Work(model, optimizer, average, list(range(members)))
    run = _Run(full, full, state, best_state, rng, prune)
    active_ks = run.active()
    if prune and 0 < len(active_ks) < members:
        run.work = _shrink(full, active_ks, cfg, members)
    return run


def _timed_epoch(run: _Run, inputs: EpochInputs, cfg: TrainConfig) -> tuple[dict[str, float], _EpochClock]:
    """`train_one_epoch` on the network being trained (wrapped once: DDP, torch.compile), behind a progress bar."""
    work, state = run.work, run.state
    if work.step_model is None:
        work.step_model = distributed.wrap(work.model)  # DistributedDataParallel under data-parallel torchrun
        work.step_model = torch.compile(work.step_model) if cfg.compile else work.step_model
    bar = progress_bar(inputs.plan.train_index.shape[1], f"epoch {state.epoch + 1}/{cfg.epochs}")
    start = time.perf_counter()
    seen_before = state.images_seen
    metrics = train_one_epoch(
        work.step_model, replace(inputs, members=tuple(work.ks) if work is not run.full else None), work.optimizer,
        state, cfg, run.rng, StepHooks(work.average, bar.update if bar is not None else None),
    )
    clock = _EpochClock(start, time.perf_counter() - start, seen_before)
    if bar is not None:
        bar.close()
    return metrics, clock


def _validate(run: _Run, inputs: EpochInputs) -> dict[str, Any]:
    """Every member's validation loss and accuracy (the trained network's weight average where one is kept);
    then the trained members are written back into the full network."""
    work = run.work
    # rank 0's BatchNorm statistics (and their average) everywhere: all ranks validate one model
    distributed.sync_buffers(work.model, *(work.average.shadow.values() if work.average is not None else ()))
    with work.average.applied(work.model) if work.average is not None else nullcontext():
        val = evaluate_members(work.model, inputs.images, inputs.labels, work.plan(inputs.plan), inputs.amp_dtype,
                               run.state.batch_size)
    val = _full_val(val, work.ks, run.members, run.state.history)
    _write_back(run.full, work, run.members)
    return val


def _epoch_record(state: TrainState, metrics: dict[str, float], val: dict[str, Any], clock: _EpochClock,
                  computed: int) -> dict[str, Any]:
    """The history record of the epoch just ended (its events are added by the caller)."""
    return {
        "epoch": state.epoch, "lr": state.lr, "batch_size": state.batch_size, **metrics,
        "val_loss": float(np.mean(val["member_val_loss"])),
        "val_accuracy": float(np.mean(val["member_val_accuracy"])), **val,
        "seconds": time.perf_counter() - clock.start,
        "images_per_second": (state.images_seen - clock.images_before) / max(clock.train_seconds, 1e-9),
        "members_computed": computed,
    }


def _decide(run: _Run, cfg: TrainConfig, val: dict[str, Any]) -> list[str]:
    """Early stopping, best weights and the plateau rule on the validated weights; returns the log events."""
    full = run.full
    validated = full.average.shadow if full.average is not None else full.model.state_dict()
    events = end_of_epoch(run.state, cfg, run.work.optimizer, val, validated, run.best_state, run.members)
    for group in full.optimizer.param_groups:  # the full optimizer (checkpointed) follows a lowered rate too
        group["lr"] = run.state.lr
    return events


def _run_epoch(run: _Run, inputs: EpochInputs, cfg: TrainConfig) -> dict[str, Any]:
    """Train, validate and decide one epoch; appends its record to the history, logs it and returns it."""
    state = run.state
    metrics, clock = _timed_epoch(run, inputs, cfg)
    val = _validate(run, inputs)
    state.epoch += 1
    check_finite(metrics.get("train_loss", 0.0), run.full.model, state.epoch)
    state.train_seconds += clock.train_seconds
    record = _epoch_record(state, metrics, val, clock, len(run.work.ks))
    events = _decide(run, cfg, val)
    record["events"] = events
    state.history.append(record)
    log.info(
        "epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_acc %.3f  %.0f img/s%s%s",
        state.epoch, cfg.epochs, record["train_loss"], record["train_accuracy"], record["val_loss"],
        record["val_accuracy"], record["images_per_second"], "".join(f"  [{e}]" for e in events),
        time_left(state.history, cfg.epochs - state.epoch),
    )
    return record


def _save(run: _Run, run_dir: Path, inputs: EpochInputs) -> None:
    """The epoch's checkpoint of the full network (all members, also those that left the computation)."""
    full = run.full
    save_checkpoint(run_dir, full.model, run.best_state, full.optimizer, run.state, run.rng, inputs.augmenter,
                    plan=inputs.plan, average=full.average.shadow if full.average is not None else None)


def _prune_stopped(run: _Run, cfg: TrainConfig) -> None:
    """Train only the still-active members from the next epoch on, once some have stopped (when pruning)."""
    active_ks = run.active()
    if run.prune and active_ks and active_ks != run.work.ks:
        run.work = _shrink(run.full, active_ks, cfg, run.members)
        log.info("training %d of %d members from epoch %d (stopped members leave the packed network)",
                 len(active_ks), run.members, run.state.epoch + 1)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: MemberPlan,
    cfg: TrainConfig,
    augmenter: Augmenter,
    *,
    seed: int = 0,
    amp_dtype: torch.dtype = torch.float32,
    run_dir: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    photometric: PhotometricAugmenter | None = None,
) -> TrainState:
    """Train `model` (K packed members) in place; on return it holds each member's best validation weights.

    images: uint8 (N, H, W) on the training device; labels: (N,) int64. With `run_dir`, a checkpoint is written
    atomically after every epoch and `resume=True` continues from it.
    """
    run = _start_run(model, plan, cfg, augmenter, seed, run_dir if resume else None)
    weights = class_weight_table(labels, plan, int(labels.max()) + 1) if cfg.class_weights else None
    inputs = EpochInputs(images, labels, plan, augmenter, photometric, amp_dtype, weights)
    while run.state.epoch < cfg.epochs and not all(run.state.member_stopped):
        record = _run_epoch(run, inputs, cfg)
        if on_epoch is not None:
            on_epoch(record)
        if run_dir is not None and distributed.should_write():
            _save(run, run_dir, inputs)
        _prune_stopped(run, cfg)
    if cfg.restore_best:
        model.load_state_dict(run.best_state)
    elif run.full.average is not None:
        model.load_state_dict(run.full.average.shadow)
    return run.state


def time_left(history: list[dict[str, Any]], epochs_left: int) -> str:
    """'  ~2.5 min left at most' from the mean of the last epochs' durations (early stopping may end sooner)."""
    recent = [h["seconds"] for h in history[-5:] if "seconds" in h]
    if epochs_left <= 0 or not recent:
        return ""
    left = epochs_left * sum(recent) / len(recent)
    return f"  ~{left / 60:.1f} min left at most" if left >= 90 else f"  ~{left:.0f} s left at most"


def fit_sequential(
    build: Callable[[], nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: MemberPlan,
    cfg: TrainConfig,
    make_augmenter: Callable[[int], Augmenter],
    *,
    seed: int = 0,
    amp_dtype: torch.dtype = torch.float32,
    run_dir: Path | None = None,
    resume: bool = False,
    make_photometric: Callable[[int], PhotometricAugmenter | None] | None = None,
) -> tuple[list[dict[str, torch.Tensor]], TrainState]:
    """The fallback to packed training: members one after another, each a plain (K=1) network.

    Each member's finished weights are saved under run_dir/members/ so a resumed run skips finished members.
    Returns the members' state dicts (stack them with models.stack_members) and a merged TrainState.
    """
    states: list[dict[str, torch.Tensor]] = []
    merged = TrainState(lr=cfg.lr, batch_size=cfg.batch_size)
    for k in range(plan.members):
        member_dir = run_dir / "members" / str(k) if run_dir is not None else None
        done = member_dir / "member.safetensors" if member_dir is not None else None
        torch.manual_seed(seed + 1000 * k)
        model = build()
        finished = done is not None and done.is_file() and (done.parent / "member.json").is_file()
        if resume and finished:
            state = load_member(member_dir, model, TrainState)  # type: ignore[arg-type]  # digest-checked
        else:
            if member_dir is not None:
                member_dir.mkdir(parents=True, exist_ok=True)
            state = fit(model, images, labels, plan.member(k), cfg, make_augmenter(k), seed=seed + 1000 * k,
                        amp_dtype=amp_dtype, run_dir=member_dir, resume=resume,
                        photometric=make_photometric(k) if make_photometric is not None else None)
            if member_dir is not None:
                sd = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
                write_json(member_dir / "member.json", member_record(state, sd))  # first: the weights mark "done"
                atomic_write(done, lambda tmp, sd=sd: save_file(sd, str(tmp)))  # type: ignore[arg-type, misc]
        states.append(model.state_dict())
        merged.epoch = max(merged.epoch, state.epoch)
        merged.train_seconds += state.train_seconds
        merged.images_seen += state.images_seen
        merged.member_best_epoch += state.member_best_epoch
        merged.member_stopped += state.member_stopped
        merged.history += [{**h, "member": k} for h in state.history]
    return states, merged
