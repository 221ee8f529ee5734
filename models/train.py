"""Training of the two-branch network on an annotated folder (MoNuSeg layout).

Resumable: ``last.pt`` in the run folder holds weights, optimizer, step and RNG state and
is rewritten atomically every ``checkpoint_every`` steps; ``--resume`` continues from it
with the same schedule. ``log.csv`` gets one row per validation, ``best.pt`` is the
model checkpoint (``models.checkpoints`` format) with the best validation score so far,
``final.pt`` the one at the end of the schedule (validation score = semantic Dice - 10 x
regression MSE, a proxy: the tuned validation AJI of ``wsi-nuclei tune`` can prefer
``final.pt``).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import checkpoints
from models.config import NetConfig, TargetConfig, TrainConfig, WatershedParams, from_dict
from models.data import TrainingImage, as_specs, batch, load_datasets, slide_sampler, soften_targets
from models.datasets import MONUSEG_MPP
from models.inference import predict_image
from models.network import NucleusNet

log = logging.getLogger(__name__)


def semantic_loss(logit: torch.Tensor, target: torch.Tensor,
                  bce_target: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * BCE + (1 - soft Dice), the authors' BCE-Dice up to a constant. With
    distillation the BCE target is the truth blended with the teacher's probability."""
    bce = F.binary_cross_entropy_with_logits(logit, target if bce_target is None else bce_target)
    prob = torch.sigmoid(logit)
    inter = (prob * target).sum()
    dice = (2 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)
    return 0.5 * bce + (1 - dice)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 1 % of the base rate."""
    warmup = min(100, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def validation_score(scores: dict[str, float]) -> float:
    """The selection proxy: semantic Dice - 10 x regression MSE."""
    return scores["val_dice"] - scores["val_mse"] * 10


def balanced_scores(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Validation figures as the mean over datasets (each dataset weighs the same)."""
    if not per_set:
        return {"val_dice": float("nan"), "val_mse": float("nan"), "val_score": float("nan")}
    mean = {k: float(np.mean([s[k] for s in per_set.values()])) for k in ("val_dice", "val_mse")}
    mean["val_score"] = float(np.mean([validation_score(s) for s in per_set.values()]))
    return mean


def validate(net: NucleusNet, items: list[TrainingImage]) -> dict[str, float]:
    """Semantic Dice (prob > 0.5) and regression MSE over whole validation images."""
    net.eval()
    inter = total = 0.0
    sq = n = 0.0
    for item in items:
        prob, dist = predict_image(net, item.image)
        pred = prob > 0.5
        truth = item.mask > 0.5
        inter += float((pred & truth).sum())
        total += float(pred.sum() + truth.sum())
        sq += float(((dist - item.distance) ** 2).sum())
        n += dist.size
    net.train()
    return {"val_dice": 2 * inter / max(total, 1.0), "val_mse": sq / max(n, 1.0)}


def distill_items(items: list[TrainingImage], teacher: NucleusNet, alpha: float,
                  progress: bool = True) -> list[TrainingImage]:
    """Training images whose targets are blended with the teacher's whole-image outputs
    (computed once: the geometric augmentations commute with cropping, so the stored maps
    are cropped, flipped and rotated with the image; see :func:`soften_targets`)."""
    if alpha <= 0:
        return items
    teacher.eval()
    out = []
    for item in tqdm(items, desc="teacher", unit="image", disable=not progress, file=sys.stderr):
        prob, dist = predict_image(teacher, item.image)
        out.append(soften_targets(item, prob, dist, alpha))
    return out


def load_teacher(name: str | Path, mpp: float) -> NucleusNet:
    """The distillation teacher; it must work at the resolution the student trains at."""
    teacher = checkpoints.load(name)
    if abs(teacher.mpp - mpp) > 1e-6 * mpp:
        raise ValueError(f"teacher {teacher.path} works at {teacher.mpp:g} um/px, the student "
                         f"trains at {mpp:g} um/px")
    log.info("distilling from %s", teacher.path)
    return teacher.net


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def train(data: str | Path | None, out: str | Path, net_cfg: NetConfig, target_cfg: TargetConfig,
          cfg: TrainConfig, resume: bool = False, steps: int | None = None,
          init: str | Path | None = None) -> Path:
    """Train and return the path of the best model checkpoint.

    With ``resume`` the stored configuration is used; ``steps`` (if given) extends the
    schedule of a resumed run, otherwise it overrides ``cfg.steps``. ``init`` starts a new
    run from the weights (and architecture) of a model checkpoint, e.g. to continue training
    a shipped model with a fresh schedule."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.pt"
    state: dict[str, Any] | None = None
    if resume:
        if not last_path.exists():
            raise FileNotFoundError(f"--resume: no {last_path} to resume from")
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        net_cfg = from_dict(NetConfig, state["net"])
        target_cfg = from_dict(TargetConfig, state["targets"])
        cfg = from_dict(TrainConfig, state["train"])
        data = data or state["data"]
    if data is None:
        raise ValueError("no training data given")
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if state is not None:
        log.info("resuming %s at step %d of %d", out, state["step"], cfg.steps)

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    datasets = load_datasets(as_specs(data), MONUSEG_MPP * cfg.downsample, cfg.val_fraction, cfg.seed,
                             target_cfg.distance_norm)
    train_items = [item for d in datasets for item in d.all_train]
    if cfg.distill > 0:  # validation keeps the true targets: selection is against the truth
        if not cfg.teacher:
            raise ValueError("distillation needs a teacher checkpoint")
        teacher = load_teacher(cfg.teacher, MONUSEG_MPP * cfg.downsample)
        soft = iter(distill_items(train_items, teacher, cfg.distill))
        for d in datasets:
            d.train = [[next(soft) for _ in slide] for slide in d.train]
        del teacher
    sampler = slide_sampler([d.train for d in datasets])

    # where the weights came from, kept across --resume: a model trained on from a pruned
    # checkpoint stays a pruned model (its "pruning" record is what bench/README read)
    init_record: dict[str, Any] | None = state.get("init") if state is not None else None
    if init is not None and state is None:
        start = checkpoints.load(init)
        net_cfg, target_cfg = start.config, start.targets
        net = start.net.train()
        init_record = {"path": str(start.path), "sha256": start.sha256,
                       "steps": start.provenance.get("steps"),
                       "pruning": start.provenance.get("pruning")}
        log.info("initialised from %s", start.path)
    else:
        net = NucleusNet(net_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step, best, started = 0, -math.inf, time.time()
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step, best = state["step"], state["best"]
        started -= state["elapsed"]
    net.train()

    log_path = out / "log.csv"
    fields = ["step", "loss", "semantic_loss", "regression_loss", "val_dice", "val_mse",
              "val_score", "lr", "elapsed_s", "steps_per_s"]
    if len(datasets) > 1:
        fields += [f"val_dice_{d.name}" for d in datasets] + [f"val_score_{d.name}" for d in datasets]
    if not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)

    provenance = {
        "data": datasets[0].record["folder"],
        "train_images": [n for d in datasets for n in d.record["train_images"]],
        "val_images": [n for d in datasets for n in d.record["val_images"]],
        "datasets": [d.record for d in datasets],
        "train_config": asdict(cfg), "git_commit": git_commit(), "command": " ".join(sys.argv),
        "torch": str(torch.__version__), "started": dt.datetime.now().isoformat(timespec="seconds"),
    }
    if init_record is not None:
        provenance["init"] = init_record
        if init_record.get("pruning"):
            provenance["pruning"] = init_record["pruning"]
    running = np.zeros(3)
    count, window_start = 0, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", mininterval=10,
               file=sys.stderr)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        x, m, d, b = (torch.from_numpy(a) for a in batch(sampler, cfg.patch_size, cfg.batch_size,
                                                         rng, cfg.augmentation))
        logit, dist = net(x)
        l_sem, l_reg = semantic_loss(logit, m, b), regression_loss(dist, d)
        loss = l_sem + l_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running += [loss.item(), l_sem.item(), l_reg.item()]
        count += 1
        bar.update(1)
        bar.set_postfix(loss=f"{running[0] / count:.4f}")

        if step % cfg.val_every == 0 or step == cfg.steps:
            per_set = {d.name: validate(net, d.val) for d in datasets if d.val}
            scores = balanced_scores(per_set)
            score = scores["val_score"]
            means = [float(v) for v in (running / max(count, 1)).round(5)]
            row = [step, *means, round(scores["val_dice"], 5),
                   round(scores["val_mse"], 6), round(score, 5), f"{learning_rate(step, cfg):.2e}",
                   round(time.time() - started, 1), round(count / (time.time() - window_start), 4)]
            if len(datasets) > 1:
                row += [round(per_set[d.name]["val_dice"], 5) if d.name in per_set else "" for d in datasets]
                row += [round(validation_score(per_set[d.name]), 5) if d.name in per_set else ""
                        for d in datasets]
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(row)
            log.info("step %d: %s", step, dict(zip(fields, row)))
            running[:] = 0
            count, window_start = 0, time.time()
            model_record = {"provenance": {**provenance, "steps": step,
                                           "elapsed_s": round(time.time() - started)},
                            "metrics": {**scores, "split": "validation"}}
            if score > best:
                best = score
                checkpoints.save(out / "best.pt", net, mpp=MONUSEG_MPP * cfg.downsample,
                                 watershed=WatershedParams(), targets=target_cfg, **model_record)
            if step == cfg.steps:  # the end of the schedule, for selection by another metric
                checkpoints.save(out / "final.pt", net, mpp=MONUSEG_MPP * cfg.downsample,
                                 watershed=WatershedParams(), targets=target_cfg, **model_record)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoints.atomic_torch_save({
                "model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "best": best, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "elapsed": time.time() - started, "net": asdict(net_cfg),
                "targets": asdict(target_cfg), "train": asdict(cfg),
                "data": [d.spec_text for d in datasets], "init": init_record}, last_path)
    bar.close()
    return out / "best.pt"
