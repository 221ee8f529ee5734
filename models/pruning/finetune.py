"""Fine-tuning of a pruned network with its pruning masks held fixed.

Whether Mahbod et al. fine-tuned after pruning is unknown (method.md §5), so both
"one-shot" (``steps=0``) and "one-shot + masked fine-tune" are supported. Fine-tuning
uses the losses, learning-rate schedule and patch sampler of :mod:`models.train` (the
same objective the dense model was trained on), but only the dense model's *training*
images (``provenance["train_images"]``): its validation images tuned the watershed, and
test images must stay unseen.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.config import DistanceNorm, TrainConfig
from models.data import TrainingImage, batch, load_training_items
from models.network import NucleusNet
from models.pruning.unstructured import Masks, apply_masks, mask_gradients
from models.train import distill_items, learning_rate, regression_loss, semantic_loss

log = logging.getLogger(__name__)


@torch.no_grad()
def recalibrate_batchnorm(net: NucleusNet, items: list[TrainingImage], batches: int, *, patch_size: int = 256,
                          batch_size: int = 8, seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running mean and variance on training patches
    (cumulative average over ``batches`` forward passes), weights untouched.

    Why: pruning changes what each conv outputs, but a BN layer still normalises with the
    dense network's statistics; after one-shot pruning of a BN network that mismatch, not
    the lost weights, can dominate the damage. Returns the number of BN layers reset."""
    layers = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers or batches <= 0:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    device = next(net.parameters()).device
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(batches):
        x = batch(items, patch_size, batch_size, rng, 0.0)[0]
        net(torch.from_numpy(x).to(device))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    net.eval()
    log.info("re-estimated %d BatchNorm layers on %d batches", len(layers), batches)
    return len(layers)


def finetune(net: NucleusNet, data_folder: str | Path, steps: int, *, masks: Masks | None = None,
             lr: float = 1e-4, batch_size: int = 8, patch_size: int = 256, seed: int = 0,
             train_names: list[str] | None = None, downsample: int = 1,
             distance_norm: DistanceNorm = "per_nucleus", color_jitter: float = 0.08,
             weight_decay: float = 1e-5, teacher: NucleusNet | None = None, distill: float = 0.0,
             items: list[TrainingImage] | None = None, progress: bool = True) -> dict[str, float]:
    """Train ``net`` in place for ``steps`` AdamW steps on ``train_names`` of
    ``data_folder`` (all images if None); pruned weights (``masks``) stay exactly zero.
    With a ``teacher`` (the dense network) and ``distill`` > 0 the targets are blended
    with its outputs (:func:`models.train.distill_items`). ``items``: the training images
    already loaded (:func:`load_training_items`), instead of ``train_names`` of the folder.

    Returns the mean semantic and regression loss of the last steps (for the log)."""
    if steps <= 0:
        return {}
    if items is None:
        items = load_training_items(data_folder, train_names, downsample, distance_norm)
    if not items:
        raise ValueError("no training images to fine-tune on")
    if distill > 0:
        if teacher is None:
            raise ValueError("distillation needs a teacher network")
        items = distill_items(items, teacher, distill, progress=progress)
    log.info("fine-tuning %d steps on %d training image(s) of %s (lr %.1e, masks: %s, "
             "distillation weight %g)", steps, len(items), data_folder, lr,
             "fixed" if masks else "none", distill)
    schedule = TrainConfig(steps=steps, lr=lr)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    if masks:
        apply_masks(net, masks)
    net.train()
    device = next(net.parameters()).device
    recent: list[tuple[float, float]] = []
    bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress, file=sys.stderr,
               mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, schedule)
        x, m, d, b = (torch.from_numpy(a).to(device)
                      for a in batch(items, patch_size, batch_size, rng, color_jitter))
        logit, dist = net(x)
        l_sem, l_reg = semantic_loss(logit, m, b), regression_loss(dist, d)
        opt.zero_grad(set_to_none=True)
        (l_sem + l_reg).backward()
        if masks:
            mask_gradients(net, masks)
        opt.step()
        if masks:
            apply_masks(net, masks)  # AdamW's decoupled decay cannot revive, but be exact
        recent = (recent + [(l_sem.item(), l_reg.item())])[-50:]
        bar.set_postfix(loss=f"{sum(a + b for a, b in recent) / len(recent):.4f}")
    bar.close()
    net.eval()
    result = {"semantic_loss": float(np.mean([a for a, _ in recent])),
              "regression_loss": float(np.mean([b for _, b in recent]))}
    log.info("fine-tune done: %s", result)
    return result
