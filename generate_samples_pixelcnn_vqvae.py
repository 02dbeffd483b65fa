"""Stage 3: sample code grids from a trained prior and decode them into images with their VQ-VAE.

Example:
    python generate_samples_pixelcnn_vqvae.py --vqvae_checkpoint runs/vq_vae/best.pth \
        --prior_checkpoint runs/prior_vqvae/best.pth --num_samples 100

Every hyperparameter comes from the two checkpoints. Under torchrun the samples are split over the processes; each
sample depends only on --seed and its index. Writes <out_dir>/samples.png (a grid), codes.pt (the codes
[N, h, w], class labels and sampling settings; torch.load(..., weights_only=True) reads it) and, with
--save_individual, sample_0000.png, sample_0001.png, ...
"""

from common.cli import ArgumentParser, run_main
from common.sampling import add_sampling_flags, run_generation


def main(args):
    run_generation(args, args.vqvae_checkpoint, 'vq_vae')


def build_parser():
    """The stage-3 command line for a prior over VQ-VAE codes."""
    parser = ArgumentParser(description='Stage 3: sample images from a prior and its VQ-VAE.')
    parser.add_argument('--vqvae_checkpoint', required=True, help='stage-1 VQ-VAE checkpoint (required)')
    add_sampling_flags(parser, 'pixelcnn_vqvae')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
