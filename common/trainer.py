"""The training loop shared by main.py and both prior scripts.

It owns everything that is the same for every stage: the data order, DDP, mixed precision, the optimizer step,
non-finite checks, validation each epoch, `last.pth` / `best.pth`, resume and logging. A script describes its own
part in a `Task`: the model, the data, one training step and the validation metrics.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from models import CheckpointError, save_checkpoint

from .cli import nonnegative_int, positive_float, positive_int
from .distributed import all_reduce_sum, barrier, is_distributed
from .errors import UserError
from .tracking import Tracker, wandb_settings


DEFAULT_LR = 3e-4
MAX_LR = 10.0  # far above any useful Adam rate; beyond it Adam's moments overflow


def learning_rate(text):
    """argparse type: a learning rate in (0, 10]."""
    value = positive_float(text)
    if value > MAX_LR:
        raise argparse.ArgumentTypeError(f'must be at most {MAX_LR:g}, got {text}')
    return value


def add_training_flags(parser, epochs, batch_size):
    """Flags every training script shares."""
    parser.add_argument('--epochs', type=positive_int, default=epochs, help=f'epochs to train (default: {epochs})')
    parser.add_argument('--batch_size', type=positive_int, default=batch_size,
                        help=f'global batch size, split evenly across torchrun processes (default: {batch_size})')
    parser.add_argument('--lr', type=learning_rate, default=None,
                        help=f'Adam learning rate (default: {DEFAULT_LR}; with --resume the checkpoint\'s, which an '
                             f'explicit --lr overrides)')
    parser.add_argument('--lr_schedule', default='constant', choices=['constant', 'cosine'],
                        help='learning-rate schedule over all steps (default: constant)')
    parser.add_argument('--warmup_steps', type=nonnegative_int, default=0,
                        help='raise the learning rate linearly from lr/N to lr over the first N steps, then follow '
                             '--lr_schedule; lets a transformer prior train at a higher --lr (default: 0, no warm-up)')
    parser.add_argument('--max_steps', type=positive_int, default=None,
                        help='stop after this many optimizer steps, e.g. for smoke runs (default: no limit)')
    parser.add_argument('--max_minutes', type=positive_float, default=None,
                        help='stop after this much training time (validation excluded), e.g. to compare models on an '
                             'equal budget; a resume gets a fresh budget (default: no limit)')
    parser.add_argument('--num_workers', type=nonnegative_int, default=0,
                        help='DataLoader worker processes (default: 0)')
    parser.add_argument('--resume', default=None, help='continue from this last.pth (default: start afresh)')
    parser.add_argument('--save_every_steps', type=positive_int, default=None,
                        help='also write last.pth every N steps inside an epoch (default: only at epoch ends)')
    parser.add_argument('--skip_nonfinite', type=nonnegative_int, default=0,
                        help='skip up to N batches whose loss is NaN/inf before stopping (default: 0)')
    parser.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'],
                        help='mixed precision with autocast; fp16 adds a GradScaler (default: none)')
    parser.add_argument('--compile', action='store_true', help='wrap the model in torch.compile')
    parser.add_argument('--log_every', type=positive_int, default=50, help='steps between W&B logs (default: 50)')


@dataclass
class Task:
    """What a training script hands to `train`: its model, data, loss and validation."""

    model: nn.Module  # its `kind`, `config` and weights go into the checkpoints
    train_set: object
    val_set: object
    training_step: Callable  # (model, batch) -> (loss tensor, {name: scalar tensor}); runs under autocast
    evaluate: Callable  # (model, loader) -> ({name: float}, {name: code counts [K]}), summed over ranks by the task
    score_key: str  # validation metric to minimise; decides best.pth
    score_scope: str = ''  # what the score covers (e.g. the trained levels); a resume that changes it resets the best
    checkpoint_extra: dict = field(default_factory=dict)  # data settings, VQ checkpoint info, ...
    on_epoch_end: Optional[Callable] = None  # (model, epoch, tracker, step) on rank 0: image grids
    find_unused_parameters: bool = False
    optimizer_groups: Optional[Callable] = None  # (weight_decay) -> parameter groups of the model
    weight_decay: float = 0.0
    train_module: Optional[nn.Module] = None  # what training steps call, if not the model (e.g. a loss wrapper)


class EpochBatchSampler(Sampler):
    """Batches of a fresh permutation each epoch (seeded by seed and epoch), this rank's share of each global batch.

    Every rank takes its slice of the same global batches, so N processes with global batch B see exactly the samples
    one process with batch B would. `start_batch` skips batches already done, for a resume inside an epoch.
    """

    def __init__(self, num_samples, global_batch, rank, world_size, seed):
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.seed, self.epoch, self.start_batch = seed, 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """Choose the epoch's permutation and where in it to start."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.num_samples // self.global_batch - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        for b in range(self.start_batch, self.num_samples // self.global_batch):
            first = b * self.global_batch + self.rank * self.local_batch
            yield order[first:first + self.local_batch].tolist()


def build_lr_scheduler(optimizer, schedule, total_steps, progress=None, warmup_steps=0):
    """Constant, or cosine decay to zero over the run, after a linear warm-up over the first `warmup_steps` steps;
    a LambdaLR whose state goes into checkpoints.

    The run's progress is step / `total_steps`, or `progress()` (the fraction of a time budget spent) when further.
    """
    time_fraction = progress or (lambda: 0.0)

    def factor(step):
        warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == 'constant':
            return warmup
        return warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, max(step / total_steps, time_fraction()))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Flags that fix the data order and the optimisation; --resume takes them from the checkpoint, so that a resumed run
# continues the same run. --epochs and --max_steps stay as given, to allow training for longer, and an explicit --lr
# overrides the checkpoint's (e.g. a lower one after the loss became NaN).
RESUMED_FLAGS = ('batch_size', 'lr', 'lr_schedule', 'warmup_steps', 'seed', 'amp', 'weight_decay')


def apply_resume_flags(args, state, path):
    """Take RESUMED_FLAGS from the checkpoint (all but an explicit --lr), saying what changed; write next to it."""
    saved = state.get('args')
    if not isinstance(saved, dict):
        raise CheckpointError(f'{path} has no training state (no args entry): it is a model export, not a last.pth '
                              f'that --resume can continue; start a new run instead')
    args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    names = [name for name in RESUMED_FLAGS if name in saved and not (name == 'lr' and args.lr is not None)]
    # A flag left at None (e.g. --lr) simply takes the saved value: only a given value that differs is news.
    changed = [f'--{name} {saved[name]}' for name in names
               if getattr(args, name) is not None and getattr(args, name) != saved[name]]
    for name in names:
        setattr(args, name, saved[name])
    if changed:
        print(f'resuming with the checkpoint\'s {", ".join(changed)}')
    if args.lr is not None and 'lr' in saved and args.lr != saved['lr']:
        print(f'resuming with --lr {args.lr}, overriding the checkpoint\'s {saved["lr"]}')


def _autocast(device, amp):
    """An autocast context for --amp (a disabled one for 'none')."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != 'none')


def check_sizes(args, task, world_size):
    """Raise UserError if the batch cannot be split over the processes or a split is too small for it."""
    if args.batch_size % world_size != 0:
        raise UserError(f'--batch_size {args.batch_size} must be divisible by the {world_size} processes')
    if len(task.train_set) < args.batch_size:
        raise UserError(f'the training set has {len(task.train_set)} items, fewer than --batch_size '
                        f'{args.batch_size}; lower --batch_size')
    if len(task.val_set) < world_size:  # every rank validates a shard of its own, and none may be empty
        raise UserError(f'the validation set has {len(task.val_set)} items, fewer than the {world_size} processes; '
                        f'use more validation images or fewer processes')


def train(args, task, rank, world_size, device, resume_state=None):
    """Train `task.model` for args.epochs (or args.max_steps) and write checkpoints to args.out_dir (rank 0)."""
    check_sizes(args, task, world_size)
    if args.lr is None:
        args.lr = DEFAULT_LR
    trainer = Trainer(args, task, rank, world_size, device)
    if resume_state is not None:
        trainer.restore(resume_state)
    return trainer.run()


class Trainer:
    """The state of one training run and its steps: restore, one epoch, validate, save."""

    def __init__(self, args, task, rank, world_size, device):
        self.args, self.task, self.device = args, task, device
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.raw_model = task.model.to(device)
        self.sampler = EpochBatchSampler(len(task.train_set), args.batch_size, rank, world_size, args.seed)
        # A private generator keeps the loader from drawing on the global RNG, which must replay exactly on resume.
        self.loader = DataLoader(task.train_set, batch_sampler=self.sampler, num_workers=args.num_workers,
                                 generator=torch.Generator().manual_seed(args.seed), persistent_workers=False)
        self.val_loader = DataLoader(Subset(task.val_set, range(rank, len(task.val_set), world_size)),
                                     batch_size=max(1, args.batch_size // world_size), num_workers=args.num_workers)
        self.steps_per_epoch = len(task.train_set) // args.batch_size
        self.total_steps = min(args.max_steps or math.inf, self.steps_per_epoch * args.epochs)
        # AdamW with decoupled weight decay on the groups a model names (else on every weight); plain Adam without.
        if task.weight_decay > 0:
            groups = task.optimizer_groups(task.weight_decay) if task.optimizer_groups is not None else \
                [{'params': list(self.raw_model.parameters()), 'weight_decay': task.weight_decay}]
            self.optimizer = torch.optim.AdamW(groups, lr=args.lr)
        else:
            self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=args.lr)
        self.train_seconds, self.out_of_time, self.epoch_started = 0.0, False, None
        self.scheduler = build_lr_scheduler(self.optimizer, args.lr_schedule, self.total_steps, self.progress,
                                            args.warmup_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
        self.epoch, self.step, self.batch_in_epoch, self.best_score, self.run_id = 0, 0, 0, math.inf, None
        self.metrics, self.skipped = {}, 0

    def restore(self, state):
        """Continue from a last.pth: weights, optimizer, schedule, scaler, position, best score and RNG."""
        self.raw_model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        if self.optimizer.param_groups[0]['initial_lr'] != self.args.lr:  # an explicit --lr overrides the saved one
            self.scheduler.base_lrs = [self.args.lr] * len(self.optimizer.param_groups)
            for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                group['initial_lr'], group['lr'] = self.args.lr, self.args.lr * factor(self.scheduler.last_epoch)
        self.epoch, self.step, self.batch_in_epoch = state['epoch'], state['step'], state['batch_in_epoch']
        self.run_id = state.get('wandb_run_id')
        if state.get('score_scope', '') == self.task.score_scope:
            self.best_score = state['best_score']
        else:  # e.g. a resume that trains the other level: the old best was a score of something else
            print(f'the best score of the checkpoint ({state.get("score_scope")}) is not comparable with this run\'s '
                  f'({self.task.score_scope}); best.pth starts afresh')
        torch.set_rng_state(state['rng']['torch'])
        if self.device.type == 'cuda' and state['rng'].get('cuda') is not None:
            torch.cuda.set_rng_state(state['rng']['cuda'], self.device)
        if self.epoch >= self.args.epochs or self.step >= self.total_steps:
            raise UserError(f'nothing to do: the checkpoint is at epoch {self.epoch} and step {self.step}, already at '
                            f'--epochs {self.args.epochs}' + (f' / --max_steps {self.args.max_steps}'
                                                               if self.args.max_steps else '')
                            + '; raise --epochs to train further')

    def run(self):
        """Train until args.epochs or args.max_steps; returns the last epoch's metrics."""
        args = self.args
        module = self.task.train_module or self.raw_model
        model = torch.compile(module) if args.compile else module
        if is_distributed():
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                find_unused_parameters=self.task.find_unused_parameters)
        self.model = model
        self.tracker = Tracker(args.out_dir, vars(args), wandb_settings(args), enabled=self.is_main,
                               run_id=self.run_id)
        model.train()
        while self.epoch < args.epochs and self.step < self.total_steps and not self.out_of_time:
            started, count = time.time(), self.train_epoch()
            self.train_seconds += time.time() - started
            self.end_epoch(count, time.time() - started)
        self.tracker.finish()
        return self.metrics

    def train_epoch(self):
        """Train until the end of the epoch (or max_steps); returns the mean training figures and batches done."""
        args, sums, count, done = self.args, {}, 0, 0
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        bar = tqdm(self.loader, desc=f'epoch {self.epoch + 1}/{args.epochs}', disable=not self.is_main,
                   dynamic_ncols=True, initial=self.batch_in_epoch, total=self.steps_per_epoch)
        started = self.epoch_started = time.time()
        for batch in bar:
            done += 1
            step_metrics = self.train_step(batch)
            self.batch_in_epoch += 1
            if step_metrics is None:  # a skipped non-finite batch
                continue
            for name, value in step_metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            count += 1
            bar.set_postfix({name: f'{value / count:.4g}' for name, value in list(sums.items())[:3]})
            if self.step % args.log_every == 0:
                self.tracker.log({f'train/{k}': float(v) for k, v in step_metrics.items()}
                                 | {'train/lr': self.scheduler.get_last_lr()[0]}, self.step)
            if args.save_every_steps and self.step % args.save_every_steps == 0 and self.is_main:
                self.save('last.pth')
            if self.step >= self.total_steps or self.time_is_up(time.time() - started):
                break
        bar.close()
        if done and not count:
            raise UserError(f'every batch of epoch {self.epoch + 1} had a NaN/inf loss and was skipped; the model '
                            f'has diverged: resume from an earlier checkpoint with a lower --lr, or use --amp none')
        self.train_means = {k: v / max(count, 1) for k, v in sums.items()}
        return count

    def progress(self):
        """The fraction of --max_minutes spent (0 without a budget), so that a cosine schedule ends with the budget."""
        if self.args.max_minutes is None or self.epoch_started is None:
            return 0.0
        return (self.train_seconds + time.time() - self.epoch_started) / (60 * self.args.max_minutes)

    def time_is_up(self, seconds_this_epoch):
        """Whether --max_minutes of training time are spent; every rank takes rank 0's answer."""
        if self.args.max_minutes is None:
            return False
        spent = torch.tensor([float(self.train_seconds + seconds_this_epoch >= 60 * self.args.max_minutes)])
        if is_distributed():
            torch.distributed.broadcast(spent, src=0)
        self.out_of_time = bool(spent.item())
        return self.out_of_time

    def train_step(self, batch):
        """One optimizer step; returns the step's figures, or None for a skipped non-finite batch."""
        args = self.args
        with _autocast(self.device, args.amp):
            loss, step_metrics = self.task.training_step(self.model, batch)
        finite = all_reduce_sum(torch.isfinite(loss.detach()).float().reshape(1)).item() == self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.skipped += 1
            if self.skipped > args.skip_nonfinite:
                if self.is_main:
                    self.save('last.pth')
                barrier()
                raise UserError(f'the loss became NaN/inf at step {self.step + 1}; the last good state is in '
                                f'{os.path.join(args.out_dir, "last.pth")} (resume it with a lower --lr, or use '
                                f'--amp none or --skip_nonfinite N)')
            return None
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return step_metrics

    def end_epoch(self, count, seconds):
        """Validate, log, and write best.pth / last.pth (rank 0)."""
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        val_metrics, histograms = self.validate()
        score = val_metrics[self.task.score_key]
        if not math.isfinite(score):
            raise UserError(f'validation {self.task.score_key} is {score} after epoch {self.epoch}: the model has '
                            f'diverged; resume from an earlier checkpoint with a lower --lr')
        metrics = {f'train/{k}': v for k, v in self.train_means.items()}
        metrics.update({f'val/{k}': v for k, v in val_metrics.items()})
        metrics.update(epoch=self.epoch + self.batch_in_epoch / self.steps_per_epoch, epoch_seconds=seconds)
        self.metrics = metrics
        if self.is_main:
            self.tracker.log(metrics, self.step, write_file=True)
            self.tracker.log_histograms({f'val/code_counts/{k}': v for k, v in histograms.items()}, self.step)
            summary = ', '.join(f'{k[4:]} {v:.4g}' for k, v in metrics.items() if k.startswith('val/'))
            tqdm.write(f'epoch {metrics["epoch"]:.3g}: {summary}')
            if score < self.best_score:
                self.best_score = score
                self.save('best.pth')
            self.save('last.pth')
            if self.task.on_epoch_end is not None:
                self.task.on_epoch_end(self.raw_model, self.epoch, self.tracker, self.step)
        barrier()

    def validate(self):
        """The task's validation figures over this rank's shard (summed over ranks by the task)."""
        self.model.eval()
        with torch.no_grad(), _autocast(self.device, self.args.amp):
            metrics, histograms = self.task.evaluate(self.raw_model, self.val_loader)
        self.model.train()
        return metrics, histograms

    def save(self, name):
        """Write a checkpoint with everything a resume needs to continue exactly where this run is."""
        state = {'kind': self.raw_model.kind, 'config': self.raw_model.config, 'model': self.raw_model.state_dict(),
                 'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                 'scaler': self.scaler.state_dict(), 'epoch': self.epoch, 'step': self.step,
                 'batch_in_epoch': self.batch_in_epoch, 'metrics': self.metrics, 'best_score': self.best_score,
                 'score_scope': self.task.score_scope, 'args': vars(self.args),
                 'wandb_run_id': self.tracker.run_id,
                 'rng': {'torch': torch.get_rng_state(),
                         'cuda': torch.cuda.get_rng_state(self.device) if self.device.type == 'cuda' else None},
                 **self.task.checkpoint_extra}
        save_checkpoint(state, os.path.join(self.args.out_dir, name))
