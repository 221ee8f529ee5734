"""The nucleus model of wsi-nuclei: network, targets, training, watershed, metrics,
pruning and checkpoints (Mahbod et al. 2022, two-branch U-Net + marker watershed)."""
