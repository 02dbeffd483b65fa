"""Code the scripts share: data, the code cache, the training loop, sampling, distributed set-up, logging and
command-line helpers. Checkpoint files are models/checkpoint.py's."""
