"""Metric tracking: a metrics.jsonl file in the output folder, and W&B when --wandb is given (rank 0 only)."""

import json
import os

from .errors import UserError


def add_wandb_flags(parser, project):
    """--wandb and its project/entity/run-name flags."""
    parser.add_argument('--wandb', action='store_true',
                        help='log to Weights & Biases (set WANDB_MODE=offline to log without a network)')
    parser.add_argument('--wandb_project', default=project, help=f'W&B project (default: {project})')
    parser.add_argument('--wandb_entity', default=None, help='W&B entity (default: your default entity)')
    parser.add_argument('--wandb_run_name', default=None, help='W&B run name (default: chosen by W&B)')


class Tracker:
    """Appends metrics to <out_dir>/metrics.jsonl and, with --wandb, logs them and images to one W&B run."""

    def __init__(self, args, config, enabled=True, run_id=None):
        self.enabled = enabled
        self.path = os.path.join(args.out_dir, 'metrics.jsonl')
        self.run = None
        if enabled and args.wandb:
            try:
                import wandb
                self.run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_run_name,
                                      config=config, dir=args.out_dir, id=run_id, resume='allow' if run_id else None)
            except Exception as e:  # W&B reports login and network problems with its own exception types
                raise UserError(f'could not start W&B ({type(e).__name__}: {str(e).splitlines()[0]}); '
                                f'run `wandb login` or set WANDB_MODE=offline') from e

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

    def finish(self):
        """Close the W&B run."""
        if self.run is not None:
            self.run.finish()
