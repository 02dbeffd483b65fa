"""Time training steps on the CPU: stage-1 images/s (VQ-VAE, VQ-VAE-2) and stage-2 codes/s (both prior families).

Example:
    python bench/bench_train.py            # default model sizes; about 7 minutes on a busy 2-core machine
    python bench/bench_train.py --steps 10 --max_seconds 60   # steadier numbers, on a quiet machine
    python bench/bench_train.py --only families --family_presets small   # table (d) alone, small presets
    python bench/bench_train.py --quick    # tiny models, a smoke test

A step is what common/trainer.py does: forward under autocast, backward, Adam step (DDP when there are 2 processes).
Inputs are random tensors already in memory (32x32 RGB images, 64x64 for table (d)'s 16x16 grid; codes from an
untrained VQ model, on 8x8, 4x4 + 8x8 or 16x16 grids), so data loading is not timed; neither are the --warmup steps.
The global batch is the same in every column.
Compared:
  (a) 1 process x 1 thread; 1 process x 2 threads (torch.set_num_threads); 2 processes x 1 thread, each taking half of
      the global batch under DDP over gloo, as torchrun runs the scripts;
  (b) --amp none against bf16 autocast, in 1 process with 1 thread;
  (c) a prior trained on cached codes (what the scripts do) against one that encodes the images with the frozen VQ
      model in every step, in 1 process with 1 thread;
  (d) the two prior families at about the same parameter count: the PixelCNN preset against the transformer preset of
      the same name (--family_presets; the presets are sized to match, and both counts are printed), 512 codes, on
      the same cached codes and global batch, in 1 process with 1 thread and --amp none. Each prior is timed in train
      mode as its preset defines it (the default transformer preset has dropout 0.1, small none), with the position
      table the training script gives it (the size of the code grid). Grids: 8x8 (VQ-VAE on 32x32 images), 4x4 + 8x8
      (VQ-VAE-2 on 32x32 images) and 16x16 (VQ-VAE on 64x64 images): attention costs more per code on longer
      sequences, the PixelCNN's convolutions do not. The last column is transformer codes/s over PixelCNN codes/s:
      1 or more means the transformer trains at least as many codes per second. --only families runs this table
      alone.
(b), (c) and (d) use 1 thread because on a shared machine a second OpenMP thread that waits for a busy core can slow a
step down many times over, which would hide what is compared.
codes/s counts the codes the prior is trained on: 64 per 8x8 grid, 16 + 64 per 4x4 + 8x8 pair, 256 per 16x16 grid. A
GPU column is not measured: this machine has no GPU.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for models/

from bench_sampling import cpu_model  # noqa: E402
from common.cli import ArgumentParser, positive_float, positive_int  # noqa: E402
from common.prior_training import FAMILIES, LevelLosses  # noqa: E402
from models import build_model, count_parameters  # noqa: E402

QUICK_VQ = dict(hidden_channels=16, res_channels=8, num_embeddings=32, embedding_dim=8)
QUICK_PRIOR = dict(hidden_channels=16, num_layers=2, embedding_dim=8)
QUICK_SIZES = {'pixelcnn': QUICK_PRIOR, 'transformer': dict(embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1)}
# name -> (unit, VQ model kind, prior kind or None, encode the images in every step)
WORKLOADS = {
    'vq_vae': ('images/s', 'vq_vae', None, False),
    'vq_vae2': ('images/s', 'vq_vae2', None, False),
    'pixelcnn': ('codes/s', 'vq_vae', 'pixelcnn', False),
    'hierarchical_pixelcnn': ('codes/s', 'vq_vae2', 'hierarchical_pixelcnn', False),
    'hierarchical_transformer': ('codes/s', 'vq_vae2', 'hierarchical_transformer', False),
    'pixelcnn, encoding': ('codes/s', 'vq_vae', 'pixelcnn', True),
    'hierarchical_pixelcnn, encoding': ('codes/s', 'vq_vae2', 'hierarchical_pixelcnn', True),
}
# The workloads of tables (a) and (b); (c) times those with an ', encoding' twin.
PARALLEL = ('vq_vae', 'vq_vae2', 'pixelcnn', 'hierarchical_pixelcnn', 'hierarchical_transformer')
# Table (d): code grid label -> (VQ model kind, image size) whose codes the priors are trained on
GRIDS = {'8x8': ('vq_vae', 32), '4x4 + 8x8': ('vq_vae2', 32), '16x16': ('vq_vae', 64)}


# ----------------------------------------------------------------------------------------------------------------
# One workload

def build(name, batch_size, quick):
    """(model to train, loss(model) for one step, items per step): the step's inputs are made here, once."""
    _, vq_kind, prior_kind, encode = WORKLOADS[name]
    torch.manual_seed(0)
    vq_model = build_model(vq_kind, QUICK_VQ if quick else {})
    images = torch.rand(batch_size, 3, 32, 32) * 2 - 1  # [B, 3, 32, 32] in [-1, 1]
    if prior_kind is None:
        return vq_model, lambda model: model(images)[1]['loss'], batch_size

    vq_model.eval().requires_grad_(False)
    quick_sizes = QUICK_SIZES['transformer' if 'transformer' in prior_kind else 'pixelcnn']
    prior = build_model(prior_kind, {**(quick_sizes if quick else {}), 'num_embeddings': vq_model.num_embeddings})

    def codes():
        with torch.no_grad():
            return vq_model.level_codes(images)  # {level: [B, h, w]}

    cached = codes()
    return prior_step(prior, codes if encode else lambda: cached, cached)


def prior_step(prior, codes, cached):
    """(LevelLosses around `prior`, loss(model) for one step on the codes codes() returns, codes per step); `cached`:
    codes of the same shapes, {level: [B, h, w]}."""
    def loss(model):
        # `model` is LevelLosses (maybe inside DDP): its forward prepares DDP's gradient all-reduce.
        return sum(model(codes(), None, prior.levels).values())

    return LevelLosses(prior), loss, sum(grid.numel() for grid in cached.values())


def seconds_per_step(model, loss, amp, args, barrier=None):
    """(seconds per step, whether the warm-up step's time stands in because it alone took over --max_seconds).

    In one process the timed steps stop early once they took --max_seconds (after one at least). Under DDP every rank
    must take the same steps, so all of them run, and `barrier` lines the ranks up around them.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp == 'bf16'):
            value = loss(model)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup = (time.perf_counter() - start) / args.warmup
    if barrier is None and warmup > args.max_seconds:
        return warmup, True
    if barrier is not None:
        barrier()
    start = time.perf_counter()
    for done in range(1, args.steps + 1):
        step()
        if barrier is None and time.perf_counter() - start > args.max_seconds:
            break
    if barrier is not None:
        barrier()
    return (time.perf_counter() - start) / done, False


def measure(name, args, threads, amp='none'):
    """Throughput of one workload in this process: (items/s, whether the warm-up step's time stands in)."""
    torch.set_num_threads(threads)
    model, loss, items = build(name, batch_of(name, args), args.quick)
    seconds, estimated = seconds_per_step(model, loss, amp, args)
    return items / seconds, estimated


def batch_of(name, args):
    """The global batch size of a workload."""
    return args.prior_batch if WORKLOADS[name][2] else args.vq_batch


# ----------------------------------------------------------------------------------------------------------------
# The two prior families, table (d)

def grid_codes(grid, batch_size, quick):
    """(VQ model kind, codebook size, {level: codes [B, h, w]}) of a GRIDS entry: random images through an untrained
    VQ model."""
    vq_kind, image_size = GRIDS[grid]
    torch.manual_seed(0)
    vq_model = build_model(vq_kind, {**(QUICK_VQ if quick else {}), 'image_size': image_size}).eval()
    images = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1  # [B, 3, S, S] in [-1, 1]
    with torch.no_grad():
        return vq_kind, vq_model.num_embeddings, vq_model.level_codes(images)


def family_config(family, preset, vq_kind, num_embeddings, codes, quick):
    """(kind, config) of a family's preset, as the training script builds it: the preset (under the quick sizes with
    --quick), the VQ model's codebook size and, for a family with a position table, the table the grid needs."""
    kind = FAMILIES[family].kind(vq_kind)
    config = {**FAMILIES[family].presets[preset], **(QUICK_SIZES[family] if quick else {}),
              'num_embeddings': num_embeddings}
    if 'max_height' in FAMILIES[family].config_class.__dataclass_fields__:
        config.update(max_height=max(grid.shape[1] for grid in codes.values()),
                      max_width=max(grid.shape[2] for grid in codes.values()))
    return kind, config


def measure_prior(kind, config, codes, args):
    """Throughput of one prior, in train mode, on cached `codes` in 1 process x 1 thread, --amp none: (codes/s,
    whether the warm-up step's time stands in)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, loss, items = prior_step(build_model(kind, config), lambda: codes, codes)
    seconds, estimated = seconds_per_step(model, loss, 'none', args)
    return items / seconds, estimated


def measure_families(args):
    """Table (d): [(preset, grid, {family: (parameters, codes/s, whether the warm-up step's time stands in)})]."""
    encoded = {grid: grid_codes(grid, args.prior_batch, args.quick) for grid in GRIDS}  # the same for both families
    rows = []
    for preset in args.family_presets:
        for grid, (vq_kind, num_embeddings, codes) in encoded.items():
            results = {}
            for family in FAMILIES:
                kind, config = family_config(family, preset, vq_kind, num_embeddings, codes, args.quick)
                results[family] = (count_parameters(kind, config), *measure_prior(kind, config, codes, args))
            rows.append((preset, grid, results))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Two processes

def ddp_worker(rank, world_size, port, args, results_path):
    """Time every workload of PARALLEL under DDP with half of the global batch; rank 0 writes items/s to a file."""
    torch.set_num_threads(1)
    # The PixelCNN's 1x1-conv weight gradients are contiguous but carry other strides on their size-1 dimensions than
    # DDP's buckets; DDP warns once per rank, though the memory order is the same and costs nothing.
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    try:
        results = {}
        for name in PARALLEL:
            model, loss, items = build(name, batch_of(name, args) // world_size, args.quick)
            seconds, _ = seconds_per_step(DistributedDataParallel(model), loss, 'none', args, dist.barrier)
            results[name] = items * world_size / seconds
        if rank == 0:
            with open(results_path, 'w') as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def measure_two_processes(args):
    """{workload: items/s} with 2 gloo processes of 1 thread each."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'results.json')
        mp.start_processes(ddp_worker, args=(2, port, args, path), nprocs=2, start_method='spawn')
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Report

def rate_text(rate, estimated=False, reference=None):
    """'1234', '~12' when the warm-up step's time stands in, plus ' (1.5x)' against a reference rate."""
    text = ('~' if estimated else '') + (f'{rate:.0f}' if rate >= 10 else f'{rate:.2g}')
    return text + (f' ({rate / reference:.2g}x)' if reference else '')


def native_bf16():
    """Whether the CPU advertises bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '').split()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def parameters_text(count):
    """'6.29M', or '21.3k' for a tiny model."""
    return f'{count / 1e6:.2f}M' if count >= 100_000 else f'{count / 1e3:.1f}k'


def print_families(rows):
    """Table (d): for each preset and code grid, both families' parameters and codes/s, and their ratio."""
    print('| preset | code grid | PixelCNN parameters | transformer parameters | PixelCNN codes/s | '
          'transformer codes/s | transformer / PixelCNN |')
    print('|---|---|---|---|---|---|---|')
    for preset, grid, results in rows:
        pixelcnn, transformer = results['pixelcnn'], results['transformer']  # (parameters, codes/s, estimated)
        print(f'| {preset} | {grid} | {parameters_text(pixelcnn[0])} | {parameters_text(transformer[0])} | '
              f'{rate_text(*pixelcnn[1:])} | {rate_text(*transformer[1:])} | {transformer[1] / pixelcnn[1]:.2f}x |')


def main(args):
    # Setup
    if args.quick:
        args.vq_batch, args.prior_batch, args.steps = min(args.vq_batch, 8), min(args.prior_batch, 8), 1
    started = time.time()
    everything = args.only is None
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s) by default, CPU: {cpu_model()} '
          f'({os.cpu_count()} logical cores), native bf16: {"yes" if native_bf16() else "no"}, '
          f'load average {os.getloadavg()[0]:.1f} at the start')
    stage1 = f'{args.vq_batch} (stage 1), ' if everything else ''
    print(f'{"tiny test models" if args.quick else "default model sizes"}; 32x32 images (64x64 for the 16x16 codes '
          f'of table (d)); global batch {stage1}{args.prior_batch} (stage 2); {args.warmup} warm-up + up to '
          f'{args.steps} timed step(s) each; Adam, float32 weights; table (d): presets '
          f'{", ".join(args.family_presets)}\n', flush=True)

    # Measure
    if everything:
        one = {name: measure(name, args, threads=1) for name in PARALLEL}
        two_threads = {name: measure(name, args, threads=2) for name in PARALLEL}
        two_processes = measure_two_processes(args)
        bf16 = {name: measure(name, args, threads=1, amp='bf16') for name in PARALLEL}
        encoding = {name: measure(f'{name}, encoding', args, threads=1) for name in PARALLEL
                    if f'{name}, encoding' in WORKLOADS}
    families = measure_families(args)

    if everything:
        # (a) and (b)
        print('| workload | global batch | unit | 1 proc x 1 thread | 1 proc x 2 threads | '
              '2 procs x 1 thread (DDP, gloo) | bf16 autocast, 1 proc x 1 thread |')
        print('|---|---|---|---|---|---|---|')
        for name in PARALLEL:
            reference = one[name][0]
            print(f'| {name} | {batch_of(name, args)} | {WORKLOADS[name][0]} | {rate_text(*one[name])} | '
                  f'{rate_text(*two_threads[name], reference)} | {rate_text(two_processes[name], False, reference)} | '
                  f'{rate_text(*bf16[name], reference)} |')

        # (c)
        print('\n| prior | global batch | codes/s, cached codes | codes/s, VQ encoding every step | '
              'cached / encoding |')
        print('|---|---|---|---|---|')
        for name, (rate, estimated) in encoding.items():
            print(f'| {name} | {args.prior_batch} | {rate_text(*one[name])} | {rate_text(rate, estimated)} | '
                  f'{one[name][0] / rate:.2f}x |')
        print()

    # (d)
    print_families(families)
    tables = 'Ratios in brackets: against 1 proc x 1 thread, --amp none. Tables (c) and (d) run' if everything \
        else 'Table (d) runs'
    print(f'\n{tables} in 1 process x 1 thread; (d) gives both families the same codes and global batch '
          f'({args.prior_batch}), the 16x16 codes from an untrained VQ-VAE on 64x64 images. ~: the warm-up step alone '
          f'took over {args.max_seconds:g} s, so its time stands in for timed steps. GPU: not measured, this machine '
          f'has none. Took {time.time() - started:.0f} s.')


def preset_list(text):
    """argparse type: comma-separated preset names that both prior families have, e.g. 'small,default'."""
    known = [name for name in FAMILIES['pixelcnn'].presets if name in FAMILIES['transformer'].presets]
    names = text.split(',')
    unknown = [name for name in names if name not in known]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f'expected comma-separated presets out of {", ".join(known)}, got {text!r}')
    return names


if __name__ == '__main__':
    parser = ArgumentParser(description='Time training steps of every stage on the CPU.')
    parser.add_argument('--steps', type=positive_int, default=3, help='timed steps per measurement (default: 3)')
    parser.add_argument('--warmup', type=positive_int, default=1, help='untimed steps first (default: 1)')
    parser.add_argument('--vq_batch', type=positive_int, default=64, help='stage-1 global batch, even (default: 64)')
    parser.add_argument('--prior_batch', type=positive_int, default=32,
                        help='stage-2 global batch, even; 32 keeps the default run near 5 minutes (default: 32)')
    parser.add_argument('--max_seconds', type=positive_float, default=10.0,
                        help='in 1 process, stop timing after this many seconds (one timed step at least); a warm-up '
                             'step that alone takes longer stands in for the timed steps, marked ~ (default: 10)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny models, batch 8 and 1 timed step, for a smoke test (default: off)')
    parser.add_argument('--only', choices=['families'], default=None,
                        help='run one table alone: families = table (d), the PixelCNN against the transformer prior '
                             '(default: every table)')
    parser.add_argument('--family_presets', type=preset_list, default='small,default',
                        help='presets of table (d), comma-separated, out of small, default, large (default: '
                             'small,default)')
    args = parser.parse_args()
    if args.vq_batch % 2 or args.prior_batch % 2:
        parser.error('--vq_batch and --prior_batch must be even: 2 processes take half of each')
    main(args)
