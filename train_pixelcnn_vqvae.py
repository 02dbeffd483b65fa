"""Stage 2: train a PixelCNN prior over the codes of a trained VQ-VAE.

Example:
    python train_pixelcnn_vqvae.py --vqvae_checkpoint runs/vq_vae/best.pth --epochs 20

The dataset, image size and code grid come from the VQ-VAE checkpoint; the VQ-VAE stays frozen. Codes are extracted
once and cached next to that checkpoint. Writes <out_dir>/last.pth, best.pth, metrics.jsonl and samples.png.
"""

import torch.nn.functional as F

from common.cli import ArgumentParser, run_main
from common.prior_training import add_prior_flags, train_prior


def losses(model, codes, labels, reduction):
    """Cross-entropy of the codes under the prior, in nats ('' is the only level)."""
    logits = model(codes['codes'], class_labels=labels)  # [B, K, h, w]
    return {'': F.cross_entropy(logits, codes['codes'], reduction=reduction)}


def sample_images(model, vq_model, num_samples, labels, generator):
    """Decoded samples for the per-epoch grid."""
    return model.sample_with_vqvae(vq_model, num_samples, class_labels=labels, generator=generator)


def main(args):
    train_prior(args, args.vqvae_checkpoint, 'vq_vae', 'pixelcnn', ('codes',), losses, sample_images)


if __name__ == '__main__':
    parser = ArgumentParser(description='Stage 2: train a PixelCNN prior over VQ-VAE codes.')
    add_prior_flags(parser, '--vqvae_checkpoint', out_dir='runs/prior_vqvae', wandb_project='vqvae-prior')
    run_main(main, parser.parse_args())
