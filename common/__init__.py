"""Code the scripts share: data, checkpoints, the training loop, logging and command-line helpers."""
