"""Results on real data: all three stages on Fashion-MNIST on the CPU, with fixed seeds, then evaluate.py on each model.

Example:
    apt-get install -y dataset-fashion-mnist     # the real data set, from Debian's packages
    python bench/reproduce_fashion_mnist.py      # writes results/fashion_mnist/{results.md,results.json,*.png}
    python bench/reproduce_fashion_mnist.py --scale 0.02 --num_samples 200 --out_dir /tmp/fm   # a smoke run
    python bench/reproduce_fashion_mnist.py --reuse --seeds 3    # then: two more seeds of the compared priors

It trains, through the real scripts: a VQ-VAE with a flat PixelCNN prior; a VQ-VAE-2 with two hierarchical priors
trained on the same codes for the same wall-clock budget (--prior_minutes each), a gated PixelCNN and a transformer;
and a class-conditional hierarchical prior of the family with the lower held-out bits per code, for the same budget.
Then evaluate.py scores every model on the official test split: reconstruction, code usage, bits per code and bits
per dimension, and FID / KID / precision / recall of --num_samples samples in the classifier feature space (CAS for
the class-conditional prior; FID at temperatures 1.0, 0.9 and 0.8 for the unconditional hierarchical priors). It
writes the results table and the picture grids. With --seeds N the two compared priors are trained N times (seeds 0
to N-1; seed 0 is the run above) and the table ends with each family's test bits per code per seed, mean and spread
(the ratio of the two families moved between 0.893 and 0.900 over three seeds: one run cannot settle a 0.9x target).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.cli import ArgumentParser, positive_int  # noqa: E402
from common.data import FASHION_MNIST_SYSTEM_DIR, build_dataset, denormalize  # noqa: E402
from evaluate import MIN_IMAGES  # noqa: E402
from models import load_model  # noqa: E402

PRIOR_FLAGS = ['--preset', 'small', '--lr_schedule', 'cosine', '--warmup_steps', '50']
# Each family at the learning rate and batch size that gave it the lowest held-out bits in 4-5 minutes on these codes
# (README, "Fashion-MNIST on a CPU"); the transformer also with no top-encoder block instead of the preset's two.
FAMILY_FLAGS = {'pixelcnn': ['--prior', 'pixelcnn', '--lr', '4e-3', '--batch_size', '32'],
                'transformer': ['--prior', 'transformer', '--lr', '5e-3', '--batch_size', '32',
                                '--top_encoder_layers', '0']}
# The flat prior trains for a fixed number of steps, at the settings of the sweep before batch sizes were compared.
FLAT_FLAGS = ['--prior', 'pixelcnn', '--lr', '8e-3', '--batch_size', '64']
# name -> (script, flags, steps at --scale 1 or None for the --prior_minutes budget, the VQ model it uses)
STAGES = {
    'vq_vae': ('main.py', ['--arch', 'vq_vae', '--lr', '1e-3', '--lr_schedule', 'cosine'], 1500, None),
    'vq_vae2': ('main.py', ['--arch', 'vq_vae2', '--lr', '1e-3', '--lr_schedule', 'cosine'], 1500, None),
    'prior_vqvae': ('train_pixelcnn_vqvae.py', PRIOR_FLAGS + FLAT_FLAGS, 1400, 'vq_vae'),
    'prior_vqvae2': ('train_pixelcnn_vqvae2.py', PRIOR_FLAGS + FAMILY_FLAGS['pixelcnn'], None, 'vq_vae2'),
    'prior_vqvae2_transformer': ('train_pixelcnn_vqvae2.py', PRIOR_FLAGS + FAMILY_FLAGS['transformer'], None,
                                 'vq_vae2'),
    'prior_vqvae2_classes': ('train_pixelcnn_vqvae2.py', PRIOR_FLAGS + ['--class_conditional'], None, 'vq_vae2'),
}
# The two hierarchical priors compared at equal budget: (stage, family).
COMPARED = (('prior_vqvae2', 'pixelcnn'), ('prior_vqvae2_transformer', 'transformer'))
TEMPERATURES = (1.0, 0.9, 0.8)  # the unconditional hierarchical priors' FID at each (--temperatures)


def folder(name, seed=0):
    """The folder of a stage trained with `seed`: its name for seed 0 (the main run), else <name>_seed<seed>."""
    return name if seed == 0 else f'{name}_seed{seed}'


def run_stage(name, args, extra=(), seed=0):
    """Run one training script to completion; returns its wall time in seconds."""
    script, flags, steps, vq_name = STAGES[name]
    out_dir = os.path.join(args.out_dir, folder(name, seed))
    command = [sys.executable, script, *flags, *extra, '--epochs', '1000', '--seed', str(seed), '--out_dir', out_dir]
    if steps is None:  # the two families compared at equal budget: the same minutes, as many steps as they fit
        command += ['--max_minutes', str(args.prior_minutes * args.scale)]
    else:
        command += ['--max_steps', str(max(1, round(steps * args.scale)))]
    if vq_name is None:
        command += ['--dataset', 'fashion_mnist', '--data_dir', args.data_dir, '--batch_size', str(args.vq_batch_size)]
        if args.num_train:
            command += ['--num_train', str(args.num_train), '--num_val', str(args.num_val)]
    else:
        vq_flag = '--vqvae_checkpoint' if vq_name == 'vq_vae' else '--vqvae2_checkpoint'
        command += [vq_flag, os.path.join(args.out_dir, vq_name, 'best.pth'), '--num_epoch_samples', '0']
        if args.prior_batch_size is not None:  # after the family's own batch size, so it wins
            command += ['--batch_size', str(args.prior_batch_size)]
    print('$ ' + ' '.join(command[1:]), flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, 'WANDB_MODE': 'disabled'},
                   stdout=subprocess.DEVNULL if args.quiet else None)
    seconds = time.time() - started
    with open(os.path.join(out_dir, 'recipe_seconds.json'), 'w') as f:  # what --reuse reports for this stage later
        json.dump({'seconds': seconds}, f)
    return seconds


def run(name, args, extra=(), seed=0):
    """Train a stage (with `seed`), or with --reuse keep it if an earlier run finished it; returns its seconds."""
    done = os.path.exists(os.path.join(args.out_dir, folder(name, seed), 'best.pth'))
    return trained_seconds(folder(name, seed), args) if args.reuse and done else run_stage(name, args, extra, seed)


def trained_seconds(name, args):
    """For --reuse: the time of a stage that ran before. The wall time the recipe wrote when it ran the stage, or for
    a folder from before that file, the training time its metrics.jsonl records.

    metrics.jsonl gains lines on every run in the same folder; only the last run counts: the lines after the last one
    whose step is not above the step before it (a fresh run starts counting again; a resumed one goes on).
    """
    recorded = os.path.join(args.out_dir, name, 'recipe_seconds.json')
    if os.path.exists(recorded):
        with open(recorded) as f:
            return json.load(f)['seconds']
    seconds, last_step = 0.0, None
    with open(os.path.join(args.out_dir, name, 'metrics.jsonl')) as f:
        for line in filter(str.strip, f):
            entry = json.loads(line)
            if last_step is not None and entry['step'] <= last_step:
                seconds = 0.0
            seconds, last_step = seconds + entry['epoch_seconds'], entry['step']
    return seconds


def evaluate_command(args, vq_name, prior_name=None, temperature=1.0, num_samples=None):
    """The evaluate.py command line for one model (and temperature); its JSON goes to <out_dir>/eval/.
    num_samples: samples to score (default: --num_samples; 0 scores the models only)."""
    name = f'{prior_name or vq_name}_t{temperature:g}'
    num_samples = args.num_samples if num_samples is None else num_samples
    command = [sys.executable, 'evaluate.py', '--vq_checkpoint', os.path.join(args.out_dir, vq_name, 'best.pth'),
               '--data_dir', args.data_dir, '--num_samples', str(num_samples), '--temperature', str(temperature),
               '--classifier_dir', os.path.join(args.out_dir, 'eval_classifier'), '--device', 'cpu',
               '--out_dir', os.path.join(args.out_dir, 'eval', name), '--json',
               os.path.join(args.out_dir, 'eval', f'{name}.json'), *args.eval_flags]
    if prior_name:
        command += ['--prior_checkpoint', os.path.join(args.out_dir, prior_name, 'best.pth')]
    if args.num_test:
        command += ['--num_real', str(args.num_test)]
    return name, command


def run_evaluations(args, commands):
    """Run evaluate.py commands two at a time with one thread each (the classifier is trained by the first one);
    returns {name: results dict}."""
    results, env = {}, {**os.environ, 'WANDB_MODE': 'disabled', 'OMP_NUM_THREADS': '1'}
    first, *rest = commands
    for batch in [[first]] + [rest[i:i + 2] for i in range(0, len(rest), 2)]:
        output = subprocess.DEVNULL if args.quiet else None
        started = [(name, subprocess.Popen(command, cwd=ROOT, env=env, stdout=output)) for name, command in batch]
        for name, process in started:
            if process.wait() != 0:
                raise SystemExit(f'error: evaluate.py failed for {name}')
            with open(os.path.join(args.out_dir, 'eval', f'{name}.json')) as f:
                results[name] = json.load(f)
    return results


@torch.no_grad()
def pictures(args):
    """Reconstructions of ten test images per VQ model, and 100 samples of each prior (class-conditional: a row per
    class)."""
    from torchvision.utils import save_image

    test_set, _ = build_dataset('fashion_mnist', 'test', 32, args.data_dir, num_samples=10)
    images = torch.stack([test_set[i][0] for i in range(10)])
    for vq_name in ('vq_vae', 'vq_vae2'):
        vq_model = load_model(os.path.join(args.out_dir, vq_name, 'best.pth'))
        save_image(denormalize(torch.cat([images, vq_model(images)[0]])),
                   os.path.join(args.out_dir, f'{vq_name}_recon.png'), nrow=10)
    for prior_name in ('prior_vqvae', 'prior_vqvae2', 'prior_vqvae2_transformer', 'prior_vqvae2_classes'):
        vq_model = load_model(os.path.join(args.out_dir, STAGES[prior_name][3], 'best.pth'))
        prior = load_model(os.path.join(args.out_dir, prior_name, 'best.pth'))
        labels = torch.arange(100) // 10 if prior.num_classes else None  # row r: class r
        samples = prior.sample_with_vq(vq_model, 100, class_labels=labels,
                                       generator=torch.Generator().manual_seed(0))
        save_image(denormalize(samples), os.path.join(args.out_dir, f'{prior_name}_samples.png'), nrow=10)


def fmt(value, digits=3):
    """A number for the table, or '-' where there is none."""
    return '-' if value is None else f'{value:.{digits}f}'


def seed_bits(evals, seeds):
    """{family: [test bits per code of seed 0, 1, ...]} of the two compared hierarchical priors."""
    return {family: [evals[f'{folder(prior_name, seed)}_t1']['prior']['bits_per_code'] for seed in range(seeds)]
            for prior_name, family in COMPARED}


def seeds_markdown(bits):
    """The seed table: each compared family's test bits per code per seed, their mean and standard deviation, and
    the transformer / PixelCNN ratio of the means."""
    seeds = len(bits['pixelcnn'])
    lines = ['| prior | ' + ' | '.join(f'seed {seed}' for seed in range(seeds)) + ' | mean | std |',
             '|---|' + '---|' * (seeds + 2)]
    for family, values in bits.items():
        std = f'{statistics.stdev(values):.3f}' if seeds > 1 else '-'  # sample standard deviation; none of one
        lines.append(f'| {family} | ' + ' | '.join(f'{value:.3f}' for value in values) +
                     f' | {statistics.mean(values):.3f} | {std} |')
    ratio = statistics.mean(bits['transformer']) / statistics.mean(bits['pixelcnn'])
    pairs = ', '.join(f'{t / p:.3f}' for t, p in zip(bits['transformer'], bits['pixelcnn']))
    lines.append(f'\nTest bits per code, transformer / PixelCNN: {ratio:.4f}x of the means over {seeds} seed(s) '
                 f'(seed by seed: {pairs}).')
    return '\n'.join(lines) + '\n'


def markdown(evals, wall, conditional_family, temperatures):
    """The results table as Markdown."""
    lines = ['| VQ model | prior | test MSE | PSNR (dB) | bits/code (levels) | bits/dim (latent + decoder) | FID | '
             'KID | precision | recall | CAS (real) | train s (prior) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    rows = [('vq_vae', 'prior_vqvae', 'pixelcnn'), ('vq_vae2', 'prior_vqvae2', 'pixelcnn'),
            ('vq_vae2', 'prior_vqvae2_transformer', 'transformer'),
            ('vq_vae2', 'prior_vqvae2_classes', f'{conditional_family}, class-conditional')]
    for vq_name, prior_name, family in rows:
        e = evals[f'{prior_name}_t1']
        recon, scores = e['reconstruction'], e.get('scores', {})
        levels = ', '.join(f'{level} {bits:.3f}' for level, bits in e['prior'].items() if '/' in level)
        bpd = f"{e['bits_per_dim']:.3f} ({e['latent_bits_per_dim']:.3f} + {e['decoder_bits_per_dim']:.3f})"
        cas = f"{fmt(scores.get('cas'))} ({fmt(scores.get('cas_real_baseline'))})" if 'cas' in scores else '-'
        lines.append(f"| {vq_name} | {family} | {recon['mse']:.4f} | {recon['psnr']:.2f} | "
                     f"{e['prior']['bits_per_code']:.3f} ({levels.replace('bits_per_code/', '')}) | {bpd} | "
                     f"{fmt(scores.get('fid'))} | {fmt(scores.get('kid_mean'))} | {fmt(scores.get('precision'))} | "
                     f"{fmt(scores.get('recall'))} | {cas} | {wall[prior_name]:.0f} |")
    lines += ['', '| prior | ' + ' | '.join(f'FID at temperature {t:g}' for t in temperatures) + ' |',
              '|---|' + '---|' * len(temperatures)]
    for prior_name, _ in COMPARED:
        lines.append(f'| {prior_name} | ' + ' | '.join(fmt(evals[f'{prior_name}_t{t:g}']['scores'].get('fid'))
                                                      for t in temperatures) + ' |')
    floor = evals['prior_vqvae2_t1']['scores'].get('fid_train_vs_test')
    lines.append(f'\nFID reference (real training vs test images, same feature space): {fmt(floor)}. '
                 f'Training wall time: {sum(wall.values()):.0f} s in all.')
    return '\n'.join(lines) + '\n'


def main(args):
    if not os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, 't10k-images-idx3-ubyte.gz')) and \
            not os.path.isdir(os.path.join(args.data_dir, 'FashionMNIST')):
        sys.exit('error: Fashion-MNIST not found; run `apt-get install -y dataset-fashion-mnist` first')
    os.makedirs(os.path.join(args.out_dir, 'eval'), exist_ok=True)
    wall = {name: run(name, args) for name in list(STAGES)[:-1]}
    for seed in range(1, args.seeds):  # the two compared priors again, with other seeds: their spread
        for prior_name, _ in COMPARED:
            wall[folder(prior_name, seed)] = run(prior_name, args, seed=seed)
    # The class-conditional prior is of the family that won the comparison at equal budget.
    bits = {}
    for prior_name, family in COMPARED:
        bits[family] = torch.load(os.path.join(args.out_dir, prior_name, 'best.pth'),
                                  weights_only=True)['metrics']['val/bits_per_code']
    conditional_family = min(bits, key=bits.get)
    wall['prior_vqvae2_classes'] = run('prior_vqvae2_classes', args, FAMILY_FLAGS[conditional_family])

    started = time.time()
    commands = [evaluate_command(args, 'vq_vae', 'prior_vqvae'),
                evaluate_command(args, 'vq_vae2', 'prior_vqvae2_classes')]
    commands += [evaluate_command(args, 'vq_vae2', prior_name, t) for prior_name, _ in COMPARED
                 for t in args.temperatures]
    commands += [evaluate_command(args, 'vq_vae2', folder(prior_name, seed), num_samples=0)
                 for seed in range(1, args.seeds) for prior_name, _ in COMPARED]  # bits per code only
    evals = run_evaluations(args, commands)
    pictures(args)
    bits_by_seed = seed_bits(evals, args.seeds)
    table = markdown(evals, wall, conditional_family, args.temperatures) + '\n' + seeds_markdown(bits_by_seed)
    with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
        f.write(table)
    with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
        json.dump({'evaluations': evals, 'train_seconds': wall, 'evaluation_seconds': time.time() - started,
                   'validation_bits_per_code': bits, 'test_bits_per_code_by_seed': bits_by_seed,
                   'conditional_family': conditional_family, 'scale': args.scale,
                   'prior_minutes': args.prior_minutes, 'torch': torch.__version__,
                   'threads': torch.get_num_threads()}, f, indent=1)
    print(table)


class Parser(ArgumentParser):
    """The recipe's flags, with the checks that would otherwise fail only after the training."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.num_samples < MIN_IMAGES:
            self.error(f'--num_samples must be at least {MIN_IMAGES} (evaluate.py\'s precision and recall), got '
                       f'{parsed.num_samples}')
        if 1.0 not in parsed.temperatures:
            self.error('--temperatures must include 1.0, the temperature of the results table')
        return parsed


def build_parser():
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument('--out_dir', default='results/fashion_mnist', help='(default: %(default)s)')
    parser.add_argument('--data_dir', default='data', help='where the unpacked data set goes (default: data)')
    parser.add_argument('--scale', type=float, default=1.0,
                        help='multiply every stage\'s steps and budget, e.g. 0.02 for a smoke run (default: 1)')
    parser.add_argument('--prior_minutes', type=float, default=5.0,
                        help='wall-clock budget of each of the two compared hierarchical priors (default: 5)')
    parser.add_argument('--seeds', type=positive_int, default=1,
                        help='train the two compared priors with seeds 0 to N-1 (seed 0 is the main run; the others '
                             'get test bits per code only) and report each family\'s mean and spread (default: 1)')
    parser.add_argument('--vq_batch_size', type=int, default=64, help='(default: 64)')
    parser.add_argument('--prior_batch_size', type=int, default=None,
                        help='batch size of every prior (default: each family its own, FAMILY_FLAGS)')
    parser.add_argument('--num_train', type=int, default=None,
                        help='training images for stage 1, with --num_val; for smoke runs (default: all 55000)')
    parser.add_argument('--num_val', type=int, default=500, help='validation images with --num_train (default: 500)')
    parser.add_argument('--num_test', type=int, default=None,
                        help='real test images the sample scores compare with (evaluate.py --num_real), for smoke '
                             'runs; reconstruction and bits/dim always use the whole test split (default: all 10000)')
    parser.add_argument('--num_samples', type=int, default=10000,
                        help='samples each evaluation generates and scores (default: 10000)')
    parser.add_argument('--temperatures', type=lambda text: [float(t) for t in text.split(',')],
                        default=list(TEMPERATURES), help='temperatures of the FID sweep (default: 1.0,0.9,0.8)')
    parser.add_argument('--eval_flags', nargs=argparse.REMAINDER, default=[],
                        help='further evaluate.py flags, e.g. a faster classifier for smoke runs (default: none)')
    parser.add_argument('--reuse', action='store_true',
                        help='keep the stages an earlier run finished in --out_dir (their best.pth), train the rest, '
                             'then evaluate everything (default: train every stage)')
    parser.add_argument('--quiet', action='store_true', help='hide the training scripts\' progress output')
    return parser


if __name__ == '__main__':
    main(build_parser().parse_args())
