"""Stage 2: train the hierarchical PixelCNN prior (top codes, then bottom codes given the top) of a VQ-VAE-2.

Example:
    python train_pixelcnn_vqvae2.py --vqvae2_checkpoint runs/vq_vae2/best.pth --epochs 20

Both levels train into one HierarchicalPixelCNN checkpoint; `--level top` or `--level bottom` trains only one of
them (the other keeps its weights), and `--resume` with the other level continues in the same checkpoint. The dataset, image size and code
grids come from the VQ-VAE-2 checkpoint, which stays frozen; codes are cached next to it.
"""

import torch.nn.functional as F

from common.cli import ArgumentParser, run_main
from common.prior_training import add_prior_flags, train_prior

LEVELS = {'both': ('top', 'bottom'), 'top': ('top',), 'bottom': ('bottom',)}


def main(args):
    levels = LEVELS[args.level]

    def losses(model, codes, labels, reduction):
        """Cross-entropy in nats per trained level: {'_top': ..., '_bottom': ...}."""
        logits = model(codes['codes_top'], codes['codes_bottom'], labels, levels)  # ([B,K,h,w], [B,K,H,W])
        return {f'_{level}': F.cross_entropy(level_logits, codes[f'codes_{level}'], reduction=reduction)
                for level, level_logits in zip(('top', 'bottom'), logits) if level in levels}

    def sample_images(model, vq_model, num_samples, labels, generator):
        """Decoded samples for the per-epoch grid."""
        return model.sample_with_vqvae2(vq_model, num_samples, class_labels=labels, generator=generator)

    train_prior(args, args.vqvae2_checkpoint, 'vq_vae2', 'hierarchical_pixelcnn', ('codes_top', 'codes_bottom'),
                losses, sample_images, levels)


if __name__ == '__main__':
    parser = ArgumentParser(description='Stage 2: train a hierarchical PixelCNN prior over VQ-VAE-2 codes.')
    add_prior_flags(parser, '--vqvae2_checkpoint', out_dir='runs/prior_vqvae2', wandb_project='vqvae2-prior')
    parser.add_argument('--level', default='both', choices=list(LEVELS),
                        help='which level(s) of the prior to train (default: both)')
    run_main(main, parser.parse_args())
