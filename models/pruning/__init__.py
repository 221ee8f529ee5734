"""Pruning of the two-branch nucleus network.

* :mod:`.unstructured`: layer-wise and network-wide (global) magnitude pruning, as in
  Mahbod et al. 2022 (zeros in place; smaller checkpoints, no speed-up by itself);
* :mod:`.structured`: filter pruning into a physically smaller network (real speed-up);
* :mod:`.finetune`: masked fine-tuning on the dense model's training images;
* :mod:`.sweep`: pruning a checkpoint and the sparsity sweep (CSV + plot).
"""

from models.pruning.finetune import finetune
from models.pruning.structured import (
    KEEP_PRESETS,
    channel_plan,
    conv_graph,
    conv_macs,
    keep_schedule,
    structured_prune,
)
from models.pruning.sweep import METHODS, plot_sweep, prune_bundle, sweep
from models.pruning.unstructured import (
    BRANCHES,
    apply_masks,
    global_masks,
    layerwise_masks,
    magnitude_masks,
    mask_gradients,
    prunable_layers,
    sparsity_report,
)

__all__ = ["BRANCHES", "KEEP_PRESETS", "METHODS", "apply_masks", "channel_plan", "conv_graph",
           "conv_macs", "finetune", "keep_schedule",
           "global_masks", "layerwise_masks", "magnitude_masks", "mask_gradients",
           "plot_sweep", "prunable_layers", "prune_bundle", "sparsity_report",
           "structured_prune", "sweep"]
