"""Stage 3: sample top and bottom code grids from a trained hierarchical prior and decode them into images with
their VQ-VAE-2.

Example:
    python generate_samples_pixelcnn_vqvae2.py --vqvae2_checkpoint runs/vq_vae2/best.pth \
        --prior_checkpoint runs/prior_vqvae2/best.pth --num_samples 100

Every hyperparameter comes from the two checkpoints. The top codes are sampled first, then the bottom codes given
them. Writes <out_dir>/samples.png (a grid), codes.pt (codes_top [N, h, w], codes_bottom [N, H, W], class labels and
sampling settings; torch.load(..., weights_only=True) reads it) and, with --save_individual, sample_0000.png, ...
"""

from common.cli import ArgumentParser, OutputDir, resolve_device, run_main
from common.sampling import add_sampling_flags, class_labels, generate, load_pair, sampling_settings, save_outputs


def main(args):
    # Setup: every check runs before the output folder is made, so a bad run writes nothing
    device = resolve_device(args.device)
    vqvae2, prior = load_pair(args.vqvae2_checkpoint, args.prior_checkpoint, 'vq_vae2', device, args.class_label)
    labels = class_labels(prior, args.class_label, args.num_samples)

    # Sample
    with OutputDir(args.out_dir):
        images, codes = generate(vqvae2, prior, args, labels, device)
        save_outputs(args.out_dir, images, codes, args.save_individual, sampling_settings(args))
    top_shape, bottom_shape = vqvae2.code_shape()
    print(f'{args.num_samples} samples ({top_shape[0]}x{top_shape[1]} top and {bottom_shape[0]}x{bottom_shape[1]} '
          f'bottom codes each) written to {args.out_dir}')


def build_parser():
    """The stage-3 command line for a hierarchical prior over VQ-VAE-2 codes."""
    parser = ArgumentParser(description='Stage 3: sample images from a hierarchical prior and its VQ-VAE-2.')
    parser.add_argument('--vqvae2_checkpoint', required=True, help='stage-1 VQ-VAE-2 checkpoint (required)')
    add_sampling_flags(parser, 'pixelcnn_vqvae2')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
