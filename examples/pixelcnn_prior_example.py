"""The whole pipeline in one file, through the Python API: VQ-VAE-2 -> codes -> hierarchical prior -> samples.

Example (CPU, built-in shapes data, a few minutes):
    python examples/pixelcnn_prior_example.py
    python examples/pixelcnn_prior_example.py --vqvae2_checkpoint runs/shapes/vq_vae2/best.pth   # reuse stage 1

The scripts (main.py, train_pixelcnn_vqvae2.py, generate_samples_pixelcnn_vqvae2.py) do the same with checkpoints,
resume, DDP and logging; this file shows the few calls underneath.
"""

import argparse
import math
import os
import sys
import time

import torch
from torch.utils.data import DataLoader
from torchvision.utils import save_image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from common.codes import extract_codes  # noqa: E402
from common.data import build_dataset, denormalize  # noqa: E402
from models import VQVAE2, HierarchicalPixelCNN, load_model  # noqa: E402


def train_vqvae2(dataset, steps, batch_size):
    """Stage 1, briefly: a small VQ-VAE-2 on 32x32 images (4x4 top and 8x8 bottom codes)."""
    model = VQVAE2(hidden_channels=64, res_channels=32, num_embeddings=64, embedding_dim=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    step = 0
    while step < steps:
        for images, _ in loader:
            _, stats = model(images)  # stats['loss'] = reconstruction MSE + commitment terms
            optimizer.zero_grad()
            stats['loss'].backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                perplexity = ' / '.join(f'{level} {s["perplexity"]:.1f}' for level, s in stats['levels'].items())
                print(f'  vq-vae-2 step {step}: mse {stats["recon_loss"]:.4f}, perplexity {perplexity}')
            if step == steps:
                break
    return model.eval()


def train_prior(codes, num_embeddings, steps, batch_size):
    """Stage 2, briefly: a small hierarchical prior, both levels at once; `codes` is {level: LongTensor [N, h, w]}."""
    prior = HierarchicalPixelCNN(num_embeddings=num_embeddings, embedding_dim=32, hidden_channels=64, num_layers=6)
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-3)
    num_grids = len(next(iter(codes.values())))
    for step in range(1, steps + 1):
        batch = torch.randint(0, num_grids, (batch_size,))
        losses = prior.level_losses({level: value[batch] for level, value in codes.items()})  # nats per code
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        if step % 100 == 0:
            print('  prior step {}: bits/code {}'.format(
                step, ', '.join(f'{level} {loss / math.log(2):.3f}' for level, loss in losses.items())))
    return prior.eval()


def main(args):
    torch.manual_seed(args.seed)
    started = time.time()
    dataset, _ = build_dataset('shapes', 'train', image_size=32, num_samples=args.num_images)

    if args.vqvae2_checkpoint:
        vqvae2 = load_model(args.vqvae2_checkpoint, kinds='vq_vae2')
        dataset, _ = build_dataset('shapes', 'train', image_size=vqvae2.image_size, num_samples=args.num_images)
    else:
        print('stage 1: training a small VQ-VAE-2')
        vqvae2 = train_vqvae2(dataset, args.vq_steps, args.batch_size)
    print(f'code grids: {vqvae2.level_shapes()}')

    # The same extraction stage 2 uses (without its cache): {'levels': {level: int16 codes}, 'labels': ...}.
    codes = {level: value.long() for level, value in extract_codes(vqvae2, dataset, 256, 'cpu')['levels'].items()}
    print(f'stage 2: training a hierarchical prior on {len(codes["top"])} code grids')
    prior = train_prior(codes, vqvae2.num_embeddings, args.prior_steps, args.batch_size)

    print('stage 3: sampling (cached) and decoding')
    generator = torch.Generator().manual_seed(args.seed)
    images = prior.sample_with_vqvae2(vqvae2, batch_size=args.num_samples, temperature=args.temperature,
                                      generator=generator)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(denormalize(images), args.out, nrow=math.ceil(math.sqrt(len(images))))
    print(f'wrote {args.out} in {time.time() - started:.0f} s')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--vqvae2_checkpoint', default=None,
                        help='use this trained VQ-VAE-2 instead of training one (default: train one)')
    parser.add_argument('--num_images', type=int, default=5000, help='shapes images to train on (default: 5000)')
    parser.add_argument('--vq_steps', type=int, default=600, help='VQ-VAE-2 training steps (default: 600)')
    parser.add_argument('--prior_steps', type=int, default=600, help='prior training steps (default: 600)')
    parser.add_argument('--batch_size', type=int, default=64, help='batch size for both stages (default: 64)')
    parser.add_argument('--temperature', type=float, default=1.0, help='sampling temperature (default: 1.0)')
    parser.add_argument('--num_samples', type=int, default=64, help='samples in the output grid (default: 64)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    parser.add_argument('--out', default='runs/example/samples.png', help='output grid (default: %(default)s)')
    main(parser.parse_args())
