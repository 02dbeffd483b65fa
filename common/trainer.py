"""The training loop shared by main.py and both prior scripts.

It owns everything that is the same for every stage: the data order, DDP, mixed precision, the optimizer step,
non-finite checks, validation each epoch, `last.pth` / `best.pth`, resume and logging. A script describes its own
part in a `Task`: the model, the data, one training step and the validation metrics.
"""

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from models import save_checkpoint

from .cli import nonnegative_int, positive_float, positive_int
from .distributed import all_reduce_sum, barrier, is_distributed
from .errors import UserError
from .tracking import Tracker


def add_training_flags(parser, epochs, batch_size, lr=3e-4):
    """Flags every training script shares."""
    parser.add_argument('--epochs', type=positive_int, default=epochs, help=f'epochs to train (default: {epochs})')
    parser.add_argument('--batch_size', type=positive_int, default=batch_size,
                        help=f'global batch size, split evenly across torchrun processes (default: {batch_size})')
    parser.add_argument('--lr', type=positive_float, default=lr, help=f'Adam learning rate (default: {lr})')
    parser.add_argument('--lr_schedule', default='constant', choices=['constant', 'cosine'],
                        help='learning-rate schedule over all steps (default: constant)')
    parser.add_argument('--max_steps', type=positive_int, default=None,
                        help='stop after this many optimizer steps, e.g. for smoke runs (default: no limit)')
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

    kind: str  # checkpoint kind, e.g. 'vq_vae2'
    model: nn.Module
    train_set: object
    val_set: object
    training_step: Callable  # (model, batch) -> (loss tensor, {name: scalar tensor}); runs under autocast
    evaluate: Callable  # (model, loader) -> {name: float}, summed over ranks by the task
    score_key: str  # validation metric to minimise; decides best.pth
    checkpoint_extra: dict = field(default_factory=dict)  # dataset, image size, VQ checkpoint info, ...
    on_epoch_end: Optional[Callable] = None  # (model, epoch, tracker, step) on rank 0: image grids
    find_unused_parameters: bool = False


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


def build_lr_scheduler(optimizer, schedule, total_steps):
    """Constant, or cosine decay to zero over `total_steps`; a LambdaLR whose state goes into checkpoints."""
    if schedule == 'constant':
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


# Flags that fix the data order and the optimisation; --resume takes them from the checkpoint, so that a resumed run
# continues the same run. --epochs and --max_steps stay as given, to allow training for longer.
RESUMED_FLAGS = ('batch_size', 'lr', 'lr_schedule', 'seed', 'amp')


def apply_resume_flags(args, state):
    """Take RESUMED_FLAGS from the checkpoint, saying which ones changed; write next to the resumed checkpoint."""
    args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    changed = [f'--{name} {state["args"][name]}' for name in RESUMED_FLAGS
               if name in state['args'] and getattr(args, name) != state['args'][name]]
    for name in RESUMED_FLAGS:
        if name in state['args']:
            setattr(args, name, state['args'][name])
    if changed:
        print(f'resuming with the checkpoint\'s {", ".join(changed)}')


def _autocast(device, amp):
    """An autocast context for --amp (a disabled one for 'none')."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != 'none')


def train(args, task, rank, world_size, device, resume_state=None):
    """Train `task.model` for args.epochs (or args.max_steps) and write checkpoints to args.out_dir (rank 0)."""
    # Setup
    is_main = rank == 0
    if args.batch_size % world_size != 0:
        raise UserError(f'--batch_size {args.batch_size} must be divisible by the {world_size} processes')
    if len(task.train_set) < args.batch_size:
        raise UserError(f'the training set has {len(task.train_set)} items, fewer than --batch_size '
                        f'{args.batch_size}; lower --batch_size')
    if len(task.val_set) < world_size:  # every rank validates a shard of its own, and none may be empty
        raise UserError(f'the validation set has {len(task.val_set)} items, fewer than the {world_size} processes; '
                        f'use more validation images or fewer processes')
    raw_model = task.model.to(device)
    sampler = EpochBatchSampler(len(task.train_set), args.batch_size, rank, world_size, args.seed)
    # A private generator keeps the loader from drawing on the global RNG, which must replay exactly on resume.
    loader = DataLoader(task.train_set, batch_sampler=sampler, num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed), persistent_workers=False)
    val_loader = DataLoader(Subset(task.val_set, range(rank, len(task.val_set), world_size)),
                            batch_size=max(1, args.batch_size // world_size), num_workers=args.num_workers)
    steps_per_epoch = len(task.train_set) // args.batch_size
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr)
    scheduler = build_lr_scheduler(optimizer, args.lr_schedule, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    epoch, step, start_batch, best_score, run_id = 0, 0, 0, math.inf, None
    if resume_state is not None:
        raw_model.load_state_dict(resume_state['model'])
        optimizer.load_state_dict(resume_state['optimizer'])
        scheduler.load_state_dict(resume_state['scheduler'])
        scaler.load_state_dict(resume_state['scaler'])
        epoch, step, start_batch = resume_state['epoch'], resume_state['step'], resume_state['batch_in_epoch']
        best_score, run_id = resume_state['best_score'], resume_state.get('wandb_run_id')
        torch.set_rng_state(resume_state['rng']['torch'])
        if device.type == 'cuda' and resume_state['rng'].get('cuda') is not None:
            torch.cuda.set_rng_state(resume_state['rng']['cuda'], device)

    model = torch.compile(raw_model) if args.compile else raw_model
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=task.find_unused_parameters)
    tracker = Tracker(args, vars(args), enabled=is_main, run_id=run_id)
    if is_main:  # temporary files of a save that was killed half-way
        for name in os.listdir(args.out_dir):
            if name.startswith('.tmp_') and name.endswith('.pth'):
                os.remove(os.path.join(args.out_dir, name))

    def save(name, metrics):
        state = {'kind': task.kind, 'config': raw_model.config, 'model': raw_model.state_dict(),
                 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                 'scaler': scaler.state_dict(), 'epoch': epoch, 'step': step, 'batch_in_epoch': start_batch,
                 'metrics': metrics, 'best_score': best_score, 'args': vars(args), 'wandb_run_id': tracker.run_id,
                 'rng': {'torch': torch.get_rng_state(),
                         'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None},
                 **task.checkpoint_extra}
        save_checkpoint(state, os.path.join(args.out_dir, name))

    def validate():
        model.eval()
        with torch.no_grad(), _autocast(device, args.amp):
            metrics = task.evaluate(raw_model, val_loader)
        model.train()
        return metrics

    # Train
    metrics, skipped, stop = {}, 0, step >= total_steps
    model.train()
    while epoch < args.epochs and not stop:
        sampler.set_epoch(epoch, start_batch)
        sums, count, started = {}, 0, time.time()
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', disable=not is_main, dynamic_ncols=True,
                   initial=start_batch, total=steps_per_epoch)
        for batch in bar:
            with _autocast(device, args.amp):
                loss, step_metrics = task.training_step(model, batch)
            finite = all_reduce_sum(torch.isfinite(loss.detach()).float().reshape(1)).item() == world_size
            if not finite:
                skipped += 1
                if skipped > args.skip_nonfinite:
                    if is_main:
                        save('last.pth', metrics)
                    barrier()
                    raise UserError(f'the loss became NaN/inf at step {step + 1}; the last good state is in '
                                    f'{os.path.join(args.out_dir, "last.pth")} (try a lower --lr, --amp none, or '
                                    f'--skip_nonfinite N)')
                optimizer.zero_grad(set_to_none=True)
                start_batch += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            start_batch += 1
            for name, value in step_metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            count += 1
            bar.set_postfix({name: f'{value / count:.4g}' for name, value in list(sums.items())[:3]})
            if step % args.log_every == 0:
                tracker.log({f'train/{k}': float(v) for k, v in step_metrics.items()}
                            | {'train/lr': scheduler.get_last_lr()[0]}, step)
            if args.save_every_steps and step % args.save_every_steps == 0 and is_main:
                save('last.pth', metrics)
            if step >= total_steps:
                stop = True
                break
        bar.close()

        finished_epoch = start_batch >= steps_per_epoch
        if finished_epoch:
            epoch, start_batch = epoch + 1, 0
        metrics = {f'train_{k}': v / max(count, 1) for k, v in sums.items()}
        metrics.update({f'val_{k}': v for k, v in validate().items()})
        metrics.update(epoch=epoch + start_batch / steps_per_epoch, epoch_seconds=time.time() - started)
        score = metrics[f'val_{task.score_key}']
        if is_main:
            tracker.log(metrics, step, write_file=True)
            summary = ', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if k.startswith('val_'))
            tqdm.write(f'epoch {metrics["epoch"]:.3g}: {summary}')
            if score < best_score:
                best_score = score
                save('best.pth', metrics)
            save('last.pth', metrics)
            if task.on_epoch_end is not None:
                task.on_epoch_end(raw_model, epoch, tracker, step)
        barrier()
    tracker.finish()
    return metrics
