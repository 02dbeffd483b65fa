"""Stage 2: train the hierarchical prior (top codes, then bottom codes given the top) of a VQ-VAE-2.

Example:
    python train_pixelcnn_vqvae2.py --vqvae2_checkpoint runs/vq_vae2/best.pth --epochs 20

Both levels train into one checkpoint; `--level top` or `--level bottom` trains only one of them (the other keeps
its weights), and `--resume` with the other level continues in the same checkpoint (best.pth then starts afresh,
since its score covered the other level). The dataset, image size and code grids come from the VQ-VAE-2 checkpoint,
which stays frozen; codes are cached next to it.
"""

from common.cli import ArgumentParser, run_main
from common.prior_training import add_prior_flags, train_prior

LEVELS = {'both': ('top', 'bottom'), 'top': ('top',), 'bottom': ('bottom',)}


def main(args):
    train_prior(args, args.vqvae2_checkpoint, 'vq_vae2', LEVELS[args.level])


def build_parser():
    """The stage-2 command line for a hierarchical prior over VQ-VAE-2 codes."""
    parser = ArgumentParser(description='Stage 2: train a hierarchical prior over VQ-VAE-2 codes.')
    add_prior_flags(parser, '--vqvae2_checkpoint', out_dir='runs/prior_vqvae2', wandb_project='vqvae2-prior')
    parser.add_argument('--level', default='both', choices=list(LEVELS),
                        help='which level(s) of the prior to train (default: both)')
    return parser


if __name__ == '__main__':
    run_main(main, build_parser().parse_args())
