"""Peak memory of one stage-1 training step on the CPU, with the quantizer's counts made by scattering (this repo)
against the dense one-hot matrix it used before.

Example:
    python bench/bench_memory.py                   # 256x256 images, batch 32, 64x64 bottom codes, 512 codes
    python bench/bench_memory.py --image_size 64   # a quick look

Each variant runs in a fresh process, which reports its peak resident memory (ru_maxrss) after one forward and
backward pass of a VQ-VAE-2 in training mode (EMA updates included), less what the process held before the step.
The dense variant rebuilds the old arithmetic: a one-hot [N, K] matrix for the counts and a [K, N] x [N, D] product
for the sums, with N = batch x 64 x 64 bottom positions and K = 512 codes (268 MB per [N, K] tensor at this size).
"""

import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for models/

from common.cli import ArgumentParser, positive_int  # noqa: E402
from models import VQVAE2  # noqa: E402
from models.quantizer import VectorQuantizer, _all_reduce, code_statistics  # noqa: E402


class DenseQuantizer(VectorQuantizer):
    """The quantizer as it was: counts and sums through a dense one-hot matrix (the reference for the comparison)."""

    def forward(self, z):
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
        indices = self.nearest_codes(flat.detach())
        one_hot = F.one_hot(indices, self.num_embeddings).type(flat.dtype)  # [N, K]
        if self.training and self.ema:
            with torch.no_grad():
                counts = _all_reduce(one_hot.sum(0))
                sums = _all_reduce(one_hot.t() @ flat.detach())  # [K, D]
                self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        quantized = F.embedding(indices, self.codebook().float()).view(b, h, w, d).permute(0, 3, 1, 2)
        commitment_loss = F.mse_loss(z, quantized.detach())
        perplexity, usage = code_statistics(one_hot.sum(0))
        stats = {'vq_loss': self.commitment_cost * commitment_loss, 'commitment_loss': commitment_loss.detach(),
                 'perplexity': perplexity, 'code_usage': usage, 'code_counts': one_hot.sum(0).detach()}
        return z + (quantized - z).detach(), indices.view(b, h, w), stats


def one_step(variant, image_size, batch_size):
    """Run one training step in this process; print {'peak_mb': ...} as JSON."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VQVAE2(image_size=image_size, hidden_channels=64, res_channels=32, num_embeddings=512, embedding_dim=64)
    if variant == 'dense':
        for name in ('quantizer_top', 'quantizer_bottom'):
            dense = DenseQuantizer(512, 64)
            dense.load_state_dict(getattr(model, name).state_dict())
            setattr(model, name, dense)
    images = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, stats = model.train()(images)
    stats['loss'].backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({'peak_mb': (peak - before) / 1024, 'bottom_grid': list(model.code_shape()[1])}))


def main(args):
    rows = {}
    for variant in ('dense', 'scatter'):
        output = subprocess.run([sys.executable, __file__, '--variant', variant, '--image_size', str(args.image_size),
                                 '--batch_size', str(args.batch_size)], check=True, capture_output=True, text=True)
        rows[variant] = json.loads(output.stdout.strip().splitlines()[-1])
    grid = rows['scatter']['bottom_grid']
    print(f'one VQ-VAE-2 training step, {args.image_size}x{args.image_size} images, batch {args.batch_size}, '
          f'{grid[0]}x{grid[1]} bottom codes, 512 codes (peak memory of the step, MB):')
    print('| quantizer counts | peak MB |\n|---|---|')
    print(f'| dense one-hot (before) | {rows["dense"]["peak_mb"]:.0f} |')
    print(f'| bincount / index_add_ (now) | {rows["scatter"]["peak_mb"]:.0f} |')


if __name__ == '__main__':
    parser = ArgumentParser(description='Peak memory of a stage-1 step: scattered vs dense one-hot code counts.')
    parser.add_argument('--image_size', type=positive_int, default=256, help='image size (default: 256)')
    parser.add_argument('--batch_size', type=positive_int, default=32, help='batch size (default: 32)')
    parser.add_argument('--variant', choices=['dense', 'scatter'], default=None, help='run one variant (internal)')
    args = parser.parse_args()
    if args.variant:
        one_step(args.variant, args.image_size, args.batch_size)
    else:
        main(args)
