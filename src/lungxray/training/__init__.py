"""From a dataset to trained members: the run, member plans, the epoch loop, checkpoints, scale-out."""
