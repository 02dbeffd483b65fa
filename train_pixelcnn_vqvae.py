"""Stage 2: train a prior (a gated PixelCNN by default) over the codes of a trained VQ-VAE.

Example:
    python train_pixelcnn_vqvae.py --vqvae_checkpoint runs/vq_vae/best.pth --epochs 20

The dataset, image size and code grid come from the VQ-VAE checkpoint; the VQ-VAE stays frozen. Codes are extracted
once and cached next to that checkpoint. Writes <out_dir>/last.pth, best.pth, metrics.jsonl and samples.png.
"""

from common.cli import ArgumentParser, run_main
from common.prior_training import add_prior_flags, train_prior


def main(args):
    train_prior(args, args.vqvae_checkpoint, 'vq_vae')


def build_parser():
    """The stage-2 command line for a prior over VQ-VAE codes."""
    parser = ArgumentParser(description='Stage 2: train a prior over VQ-VAE codes.')
    add_prior_flags(parser, '--vqvae_checkpoint', out_dir='runs/prior_vqvae', wandb_project='vqvae-prior')
    return parser


if __name__ == '__main__':
    run_main(main, build_parser().parse_args())
