"""Stage 3: sample code grids from a trained prior and decode them into images with their VQ-VAE.

Example:
    python generate_samples_pixelcnn_vqvae.py --vqvae_checkpoint runs/vq_vae/best.pth \
        --prior_checkpoint runs/prior_vqvae/best.pth --num_samples 100

Every hyperparameter comes from the two checkpoints. Writes <out_dir>/samples.png (a grid), codes.pt (the codes
[N, h, w], class labels and sampling settings; torch.load(..., weights_only=True) reads it) and, with
--save_individual, sample_0000.png, sample_0001.png, ...
"""

from common.cli import ArgumentParser, OutputDir, resolve_device, run_main
from common.sampling import add_sampling_flags, class_labels, generate, load_pair, sampling_settings, save_outputs


def main(args):
    # Setup: every check runs before the output folder is made, so a bad run writes nothing
    device = resolve_device(args.device)
    vqvae, prior = load_pair(args.vqvae_checkpoint, args.prior_checkpoint, 'vq_vae', device, args.class_label)
    labels = class_labels(prior, args.class_label, args.num_samples)

    # Sample
    with OutputDir(args.out_dir):
        images, codes = generate(vqvae, prior, args, labels, device)
        save_outputs(args.out_dir, images, codes, args.save_individual, sampling_settings(args))
    shape = vqvae.code_shape()
    print(f'{args.num_samples} samples ({shape[0]}x{shape[1]} codes each) written to {args.out_dir}')


def build_parser():
    """The stage-3 command line for a prior over VQ-VAE codes."""
    parser = ArgumentParser(description='Stage 3: sample images from a prior and its VQ-VAE.')
    parser.add_argument('--vqvae_checkpoint', required=True, help='stage-1 VQ-VAE checkpoint (required)')
    add_sampling_flags(parser, 'pixelcnn_vqvae')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
