"""Results on real data: all three stages on Fashion-MNIST on the CPU, with fixed seeds, in about 45 minutes.

Example:
    apt-get install -y dataset-fashion-mnist     # the real data set, from Debian's packages
    python bench/reproduce_fashion_mnist.py      # writes results/fashion_mnist/{results.md,results.json,*.png}
    python bench/reproduce_fashion_mnist.py --scale 0.02 --out_dir /tmp/fm   # a few steps per stage (the test)

It trains, through the real scripts: a VQ-VAE with a flat prior, a VQ-VAE-2 with a hierarchical prior, and a
class-conditional hierarchical prior. Then it measures, on the official test split: reconstruction MSE and PSNR, code
usage and perplexity, the priors' bits per code next to a unigram baseline (code frequencies of the training codes),
cached sampling time per image, and the wall time of each stage; and it draws the picture grids.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.codes import load_or_extract_codes  # noqa: E402
from common.data import FASHION_MNIST_SYSTEM_DIR, build_dataset, denormalize  # noqa: E402
from common.sampling import codes_file_key  # noqa: E402
from models import file_sha256, load_checkpoint, load_model  # noqa: E402

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# Steps per stage at --scale 1, chosen so the whole recipe takes about 45 minutes on 2 CPU cores.
STAGES = {
    'vq_vae': ('main.py', ['--arch', 'vq_vae', '--lr', '1e-3', '--lr_schedule', 'cosine'], 1500),
    'vq_vae2': ('main.py', ['--arch', 'vq_vae2', '--lr', '1e-3', '--lr_schedule', 'cosine'], 1500),
    'prior_vqvae': ('train_pixelcnn_vqvae.py', ['--preset', 'small', '--lr', '1e-3', '--lr_schedule', 'cosine'],
                    1400),
    'prior_vqvae2': ('train_pixelcnn_vqvae2.py', ['--preset', 'small', '--lr', '1e-3', '--lr_schedule', 'cosine'],
                     1200),
    'prior_vqvae2_classes': ('train_pixelcnn_vqvae2.py', ['--preset', 'small', '--lr', '1e-3', '--lr_schedule',
                                                          'cosine', '--class_conditional'], 1200),
}


def run_stage(name, args, out_dir, data_dir, scale):
    """Run one training script to completion; returns its wall time in seconds."""
    script, flags, steps = STAGES[name]
    steps = max(2, int(steps * scale))
    command = [sys.executable, script, *flags, '--max_steps', str(steps), '--epochs', '1000', '--seed', '0',
               '--out_dir', os.path.join(out_dir, name), '--num_epoch_samples', '0'] if 'prior' in name else \
              [sys.executable, script, *flags, '--dataset', 'fashion_mnist', '--data_dir', data_dir, '--max_steps',
               str(steps), '--epochs', '1000', '--seed', '0', '--out_dir', os.path.join(out_dir, name)] + \
              (['--num_train', str(args.num_train), '--num_val', str(args.num_val)] if args.num_train else [])
    if 'prior' in name:
        vq = 'vq_vae' if name == 'prior_vqvae' else 'vq_vae2'
        command += ['--vqvae_checkpoint' if vq == 'vq_vae' else '--vqvae2_checkpoint',
                    os.path.join(out_dir, vq, 'best.pth'), '--batch_size', str(args.prior_batch_size)]
    else:
        command += ['--batch_size', str(args.vq_batch_size)]
    print('$ ' + ' '.join(command[1:]), flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, 'WANDB_MODE': 'disabled'},
                   stdout=subprocess.DEVNULL if args.quiet else None)
    return time.time() - started


def prior_bits(prior, test, labels, batch_size=250):
    """Mean cross-entropy of the test codes in bits per code, per level, computed in batches."""
    sums = None
    for start in range(0, len(test[0]), batch_size):
        part = [codes[start:start + batch_size] for codes in test]
        part_labels = labels[start:start + batch_size] if labels is not None else None
        logits = prior(part[0], class_labels=part_labels) if len(part) == 1 else prior(*part, class_labels=part_labels)
        logits = logits if isinstance(logits, tuple) else (logits,)
        batch = torch.tensor([float(torch.nn.functional.cross_entropy(lg, c, reduction='sum'))
                              for lg, c in zip(logits, part)])
        sums = batch if sums is None else sums + batch
    return [float(total) / test[i].numel() / math.log(2) for i, total in enumerate(sums)]


def unigram_bits(train_codes, test_codes, num_embeddings):
    """Bits per code of the test codes under the training codes' frequencies (add-one smoothing)."""
    counts = torch.bincount(train_codes.flatten().long(), minlength=num_embeddings).double() + 1
    log_probs = (counts / counts.sum()).log2()
    return float(-log_probs[test_codes.flatten().long()].mean())


def code_stats(codes, num_embeddings):
    """Perplexity and fraction of the codebook used, over all codes of a split."""
    counts = torch.bincount(codes.flatten().long(), minlength=num_embeddings).double()
    probs = counts / counts.sum()
    return float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())), float((counts > 0).double().mean())


@torch.no_grad()
def evaluate(out_dir, data_dir, wall, num_test):
    """All the figures of the results table, and the picture grids."""
    from torchvision.utils import save_image

    test_set, _ = build_dataset('fashion_mnist', 'test', 32, data_dir, num_samples=num_test)
    loader = torch.utils.data.DataLoader(test_set, batch_size=500)
    results, rows = {}, []
    for vq_name, prior_names in (('vq_vae', ['prior_vqvae']), ('vq_vae2', ['prior_vqvae2', 'prior_vqvae2_classes'])):
        vq_path = os.path.join(out_dir, vq_name, 'best.pth')
        vq_model = load_model(vq_path)
        squared, count = 0.0, 0
        for images, _ in loader:
            recon, _ = vq_model(images)
            squared += float((recon - images).pow(2).sum())
            count += images.numel()
        mse = squared / count
        entry = {'test_mse': mse, 'test_psnr': 10 * math.log10(4 / mse), 'train_seconds': wall[vq_name]}
        grid = torch.stack([test_set[i][0] for i in range(10)])
        save_image(denormalize(torch.cat([grid, vq_model(grid)[0]])), os.path.join(out_dir, f'{vq_name}_recon.png'),
                   nrow=10)

        data = load_checkpoint(vq_path)['data']
        data['num_samples'] = {**data.get('num_samples', {}), 'test': num_test}
        sha = file_sha256(vq_path)
        codes = {split: load_or_extract_codes(vq_model, vq_path, sha, data, vq_model.image_size, split, 500, 'cpu')[0]
                 for split in ('train', 'test')}
        # The cache holds {'levels': {level: codes}, 'labels'}; the table names the levels as codes.pt does.
        codes = {split: {**{codes_file_key(level): value for level, value in part['levels'].items()},
                         'labels': part['labels']} for split, part in codes.items()}
        levels = ['codes'] if vq_name == 'vq_vae' else ['codes_top', 'codes_bottom']
        for level in levels:
            perplexity, usage = code_stats(codes['test'][level], vq_model.num_embeddings)
            entry[f'{level}_perplexity'], entry[f'{level}_usage'] = perplexity, usage
            entry[f'{level}_unigram_bits'] = unigram_bits(codes['train'][level], codes['test'][level],
                                                          vq_model.num_embeddings)
        for prior_name in prior_names:
            prior = load_model(os.path.join(out_dir, prior_name, 'best.pth'))
            labels = codes['test']['labels'] if prior.num_classes else None
            test = [codes['test'][level].long() for level in levels]
            level_bits = dict(zip(levels, prior_bits(prior, test, labels)))
            generator = torch.Generator().manual_seed(0)
            sample_labels = torch.arange(100) % 10 if prior.num_classes else None
            started = time.time()
            if vq_name == 'vq_vae':
                samples = prior.sample_with_vqvae(vq_model, 100, class_labels=sample_labels, generator=generator)
            else:
                samples = prior.sample_with_vqvae2(vq_model, 100, class_labels=sample_labels, generator=generator)
            seconds = (time.time() - started) / 100
            if sample_labels is not None:  # one row per class
                samples = samples.view(10, 10, *samples.shape[1:]).transpose(0, 1).reshape(samples.shape)
            save_image(denormalize(samples), os.path.join(out_dir, f'{prior_name}_samples.png'), nrow=10)
            results[prior_name] = {'test_bits': level_bits, 'sampling_seconds_per_image': seconds,
                                   'train_seconds': wall[prior_name]}
            rows.append((vq_name, prior_name, entry, results[prior_name], levels))
        results[vq_name] = entry
    return results, rows


def markdown(results, rows, wall, extraction_seconds):
    """The results table as Markdown."""
    lines = ['| model | prior | test MSE | test PSNR (dB) | level | code usage | perplexity | prior bits/code | '
             'unigram bits/code | sampling s/image (cached) | train s (VQ / prior) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for vq_name, prior_name, entry, prior_entry, levels in rows:
        for level in levels:
            lines.append(
                f"| {vq_name} | {prior_name} | {entry['test_mse']:.4f} | {entry['test_psnr']:.2f} | "
                f"{level.replace('codes_', '') if level != 'codes' else '-'} | {entry[f'{level}_usage']:.2f} | "
                f"{entry[f'{level}_perplexity']:.1f} | {prior_entry['test_bits'][level]:.3f} | "
                f"{entry[f'{level}_unigram_bits']:.3f} | {prior_entry['sampling_seconds_per_image']:.3f} | "
                f"{wall[vq_name]:.0f} / {wall[prior_name]:.0f} |")
    lines.append(f'\nTotal wall time: {sum(wall.values()) + extraction_seconds:.0f} s '
                 f'(training {sum(wall.values()):.0f} s, evaluation and sampling {extraction_seconds:.0f} s).')
    return '\n'.join(lines) + '\n'


def main(args):
    if not os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, 't10k-images-idx3-ubyte.gz')) and \
            not os.path.isdir(os.path.join(args.data_dir, 'FashionMNIST')):
        sys.exit('error: Fashion-MNIST not found; run `apt-get install -y dataset-fashion-mnist` first')
    os.makedirs(args.out_dir, exist_ok=True)
    wall = {name: run_stage(name, args, args.out_dir, args.data_dir, args.scale) for name in STAGES}
    started = time.time()
    results, rows = evaluate(args.out_dir, args.data_dir, wall, args.num_test)
    table = markdown(results, rows, wall, time.time() - started)
    with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
        f.write(table)
    with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
        json.dump({'results': results, 'wall_seconds': wall, 'scale': args.scale,
                   'torch': torch.__version__, 'threads': torch.get_num_threads()}, f, indent=1)
    print(table)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out_dir', default='results/fashion_mnist', help='(default: %(default)s)')
    parser.add_argument('--data_dir', default='data', help='where the unpacked data set goes (default: data)')
    parser.add_argument('--scale', type=float, default=1.0,
                        help='multiply every stage\'s steps, e.g. 0.02 for a smoke run (default: 1)')
    parser.add_argument('--vq_batch_size', type=int, default=64, help='(default: 64)')
    parser.add_argument('--prior_batch_size', type=int, default=64, help='(default: 64)')
    parser.add_argument('--num_train', type=int, default=None,
                        help='training images for stage 1, with --num_val; for smoke runs (default: all 55000)')
    parser.add_argument('--num_val', type=int, default=500, help='validation images with --num_train (default: 500)')
    parser.add_argument('--num_test', type=int, default=None,
                        help='test images to evaluate on, for smoke runs (default: all 10000)')
    parser.add_argument('--quiet', action='store_true', help='hide the training scripts\' progress output')
    main(parser.parse_args())
