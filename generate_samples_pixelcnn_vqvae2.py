"""Stage 3: sample top and bottom code grids from a trained hierarchical prior and decode them into images with
their VQ-VAE-2.

Example:
    python generate_samples_pixelcnn_vqvae2.py --vqvae2_checkpoint runs/vq_vae2/best.pth \
        --prior_checkpoint runs/prior_vqvae2/best.pth --num_samples 100

Every hyperparameter comes from the two checkpoints. The top codes are sampled first, then the bottom codes given
them. Under torchrun the samples are split over the processes; each sample depends only on --seed and its index.
Writes <out_dir>/samples.png (a grid), codes.pt (codes_top [N, h, w], codes_bottom [N, H, W], class labels and
sampling settings; torch.load(..., weights_only=True) reads it) and, with --save_individual, sample_0000.png, ...
"""

from common.cli import ArgumentParser, run_main
from common.sampling import add_sampling_flags, run_generation


def main(args):
    run_generation(args, args.vqvae2_checkpoint, 'vq_vae2')


def build_parser():
    """The stage-3 command line for a hierarchical prior over VQ-VAE-2 codes."""
    parser = ArgumentParser(description='Stage 3: sample images from a hierarchical prior and its VQ-VAE-2.')
    parser.add_argument('--vqvae2_checkpoint', required=True, help='stage-1 VQ-VAE-2 checkpoint (required)')
    add_sampling_flags(parser, 'pixelcnn_vqvae2')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
