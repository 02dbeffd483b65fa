"""Metric tracking: a metrics.jsonl file in the output folder, and W&B when --wandb is given (rank 0 only).

Names: `train/...` for training figures, `val/...` for validation ones, and `<metric>/<level>` for one level of codes,
e.g. `val/bits_per_code/top`.
"""

import json
import os
import shutil

from .errors import UserError

WANDB_INIT_TIMEOUT_S = 15  # W&B's own default waits minutes for a network that is not there


def add_wandb_flags(parser, project):
    """--wandb and its project/entity/run-name flags."""
    parser.add_argument('--wandb', action='store_true',
                        help='log to Weights & Biases (set WANDB_MODE=offline to log without a network)')
    parser.add_argument('--wandb_project', default=project, help=f'W&B project (default: {project})')
    parser.add_argument('--wandb_entity', default=None, help='W&B entity (default: your default entity)')
    parser.add_argument('--wandb_run_name', default=None, help='W&B run name (default: chosen by W&B)')


def wandb_settings(args):
    """The W&B run settings from the flags, or None without --wandb."""
    if not args.wandb:
        return None
    return {'project': args.wandb_project, 'entity': args.wandb_entity, 'name': args.wandb_run_name}


class Tracker:
    """Appends metrics to <out_dir>/metrics.jsonl and, with W&B settings, logs them and images to one W&B run."""

    def __init__(self, out_dir, config, wandb=None, enabled=True, run_id=None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, 'metrics.jsonl')
        self.run = None
        if enabled and wandb is not None:
            self.run = _start_wandb(out_dir, config, wandb, run_id)

    @property
    def run_id(self):
        """The W&B run id, stored in checkpoints so that --resume continues the same run; None without W&B."""
        return self.run.id if self.run is not None else None

    def log(self, metrics, step, write_file=False):
        """Log a dict of numbers at `step`; with write_file, also append it to metrics.jsonl."""
        if not self.enabled:
            return
        if write_file:
            with open(self.path, 'a') as f:
                f.write(json.dumps({'step': step, **metrics}) + '\n')
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, name, path, step):
        """Log a saved PNG to W&B."""
        if self.enabled and self.run is not None:
            import wandb
            self.run.log({name: wandb.Image(path)}, step=step)

    def log_histograms(self, counts, step):
        """Log {name: counts [K]} to W&B as histograms over the K bins (e.g. how often each code is used)."""
        if self.enabled and self.run is not None:
            import numpy as np
            import wandb
            self.run.log({name: wandb.Histogram(np_histogram=(value.cpu().numpy(), np.arange(len(value) + 1)))
                          for name, value in counts.items()}, step=step)

    def finish(self):
        """Close the W&B run."""
        if self.run is not None:
            self.run.finish()


def _start_wandb(out_dir, config, settings, run_id):
    """Start (or resume) the W&B run; on failure remove what W&B wrote and raise a one-line UserError."""
    import wandb
    existed = os.path.isdir(os.path.join(out_dir, 'wandb'))
    try:
        return wandb.init(project=settings['project'], entity=settings['entity'], name=settings['name'],
                          config=config, dir=out_dir, id=run_id, resume='allow' if run_id else None,
                          settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S))
    except Exception as e:  # W&B reports login and network problems with its own exception types
        if not existed:
            shutil.rmtree(os.path.join(out_dir, 'wandb'), ignore_errors=True)
        raise UserError(f'could not start W&B ({type(e).__name__}: {str(e).strip().splitlines()[0]}); '
                        f'run `wandb login` or set WANDB_MODE=offline') from e
