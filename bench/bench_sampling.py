"""Time prior sampling, both families in one run: the reference sampler (one full forward pass per position) against
the cached one (PixelCNN: cached rows and horizontal steps; transformer: a KV cache).

Example:
    python bench/bench_sampling.py --threads 1
    python bench/bench_sampling.py --quick   # tiny priors on small grids: a smoke test in seconds

Uses the default presets with untrained weights (the time does not depend on them): PixelCNN(), 512 codes, 128
hidden channels, 15 layers; TransformerPrior(), 512 codes, width 256, 8 layers, 8 heads (2 key/value heads). The
reference sampler costs the same at every position, so when a whole naive run would take
longer than --max_naive_seconds, the first N positions are timed and the time scaled to all H*W positions. Prints the
set-up, a Markdown table and how the results compare with the targets.
"""

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for models/

from common.cli import ArgumentParser, positive_float, positive_int  # noqa: E402
from models import PixelCNN, TransformerPrior, sample_from_logits  # noqa: E402

QUICK_CONFIGS = {'pixelcnn': dict(num_embeddings=32, embedding_dim=8, hidden_channels=16, num_layers=3),
                 'transformer': dict(num_embeddings=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1)}
# family -> (grid, batch, naive / cached at least this), (grid, batch, cached / one forward pass at most this)
TARGETS = {'pixelcnn': ((16, 16, 50), (16, 64, 5)), 'transformer': ((16, 16, None), (16, 64, 2))}


def build_prior(family, quick, max_grid):
    """The family's default (or quick) prior, untrained, in eval mode."""
    torch.manual_seed(0)
    if family == 'pixelcnn':
        return PixelCNN(**(QUICK_CONFIGS[family] if quick else {})).eval()
    return TransformerPrior(**(QUICK_CONFIGS[family] if quick else {}), max_height=max_grid,
                            max_width=max_grid).eval()


def int_list(text):
    """argparse type: comma-separated positive integers, e.g. '8,16,32'."""
    try:
        values = [int(value) for value in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers such as 8,16,32, got {text!r}')
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f'every value must be positive, got {text!r}')
    return values


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else whatever the platform module knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fastest(fn, min_total=1.0, max_runs=5):
    """Seconds taken by the fastest of a few calls of fn(); calls stop once together they took `min_total` seconds."""
    times = []
    while not times or (sum(times) < min_total and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_positions(model, batch_size, shape, generator, budget):
    """The reference sampler's loop (PixelCNN.sample with cached=False), stopped after the first position that ends
    `budget` seconds or more after the start: (positions sampled, seconds)."""
    codes = torch.zeros(batch_size, *shape, dtype=torch.long)
    start = time.perf_counter()
    for index in range(shape[0] * shape[1]):
        i, j = divmod(index, shape[1])
        logits = model(codes)[:, :, i, j]  # [B, K]
        codes[:, i, j] = sample_from_logits(logits, generator=generator)
        if time.perf_counter() - start >= budget:
            break
    return index + 1, time.perf_counter() - start


def time_naive(model, batch_size, shape, budget, min_total):
    """(seconds for a whole naive run, None if one was timed or else the number of positions it is scaled from)."""
    generator = torch.Generator().manual_seed(0)
    positions = shape[0] * shape[1]
    count, seconds = naive_positions(model, batch_size, shape, generator, budget)
    if count < positions:
        return seconds / count * positions, count
    # Cheap enough: time the real thing.
    return fastest(lambda: model.sample(batch_size, shape, generator=generator, cached=False), min_total), None


def seconds_text(seconds):
    """Three significant figures or so, without scientific notation."""
    return f'{seconds:.3f}' if seconds < 1 else f'{seconds:.2f}' if seconds < 100 else f'{seconds:.0f}'


def main(args):
    # Setup
    torch.set_grad_enabled(False)  # sampling and timing only
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grids = args.grids or ([4, 8] if args.quick else [8, 16, 32])
    batches = args.batches or ([1, 4] if args.quick else [1, 16, 64])
    min_total = 0 if args.quick else 1.0  # repeat calls shorter than this many seconds, keeping the fastest
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU: {cpu_model()} '
          f'({os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f} at the start)')
    priors = {family: build_prior(family, args.quick, max(grids)) for family in args.families}
    for family, model in priors.items():
        print(f'{family}: {"quick test config" if args.quick else "default preset"} {model.config}, '
              f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, untrained, float32 on the CPU')
        model.sample(1, (2, 2))  # the first call pays one-off set-up costs
    print(f'naive budget {args.max_naive_seconds:g} s per measurement\n')

    # Measure
    print('| prior | grid | batch | naive (s) | cached (s) | speed-up | forward (s) | cached / forward |')
    print('|---|---|---|---|---|---|---|---|')
    results = {}
    for family, model in priors.items():
        for size in grids:
            for batch_size in batches:
                shape = (size, size)
                naive, count = time_naive(model, batch_size, shape, args.max_naive_seconds, min_total)
                generator = torch.Generator().manual_seed(0)
                cached = fastest(lambda: model.sample(batch_size, shape, generator=generator), min_total)
                codes = torch.randint(model.num_embeddings, (batch_size, *shape))
                forward = fastest(lambda: model(codes), min_total)
                results[family, size, batch_size] = (naive / cached, cached / forward)
                naive_text = seconds_text(naive)
                if count is not None:
                    naive_text += f' (extrapolated from {count} position{"s" * (count > 1)})'
                print(f'| {family} | {size}x{size} | {batch_size} | {naive_text} | {seconds_text(cached)} | '
                      f'{naive / cached:.1f}x | {seconds_text(forward)} | {cached / forward:.2f}x |', flush=True)

    # Targets (reported, not enforced: timings on a shared machine vary)
    print()
    for family in priors:
        (size, batch_size, target), (f_size, f_batch, f_target) = TARGETS[family]
        if target is not None and (family, size, batch_size) in results:
            speed_up = results[family, size, batch_size][0]
            print(f'target ({family}): speed-up >= {target}x at {size}x{size} batch {batch_size}: {speed_up:.1f}x, '
                  f'{"met" if speed_up >= target else "NOT met"}')
        if (family, f_size, f_batch) in results:
            ratio = results[family, f_size, f_batch][1]
            print(f'target ({family}): cached within {f_target}x of one forward pass at {f_size}x{f_size} batch '
                  f'{f_batch}: {ratio:.2f}x, {"met" if ratio <= f_target else "NOT met"}')


if __name__ == '__main__':
    parser = ArgumentParser(description='Time the naive and the cached samplers of both prior families.')
    parser.add_argument('--families', type=lambda text: text.split(','), default=['pixelcnn', 'transformer'],
                        help='prior families to time, comma-separated (default: pixelcnn,transformer)')
    parser.add_argument('--grids', type=int_list, default=None,
                        help='square code grid sizes, comma-separated (default: 8,16,32; 4,8 with --quick)')
    parser.add_argument('--batches', type=int_list, default=None,
                        help='batch sizes, comma-separated (default: 1,16,64; 1,4 with --quick)')
    parser.add_argument('--max_naive_seconds', type=positive_float, default=10.0,
                        help='time allowed per naive measurement before it is extrapolated from fewer positions '
                             '(default: 10)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help="torch.set_num_threads; 1 is fastest on a busy machine (default: torch's own choice)")
    parser.add_argument('--quick', action='store_true', help='tiny prior and grids, for a smoke test (default: off)')
    main(parser.parse_args())
