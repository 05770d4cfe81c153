"""MatFormer Mix-n-Match: plans, sub-model configs and tensor slices, slicing checkpoints, searching for slices."""
