"""Stage 3: sample top and bottom code grids from a trained hierarchical PixelCNN prior and decode them into images
with their VQ-VAE-2.

Example:
    python generate_samples_pixelcnn_vqvae2.py --vqvae2_checkpoint runs/vq_vae2/best.pth \
        --prior_checkpoint runs/prior_vqvae2/best.pth --num_samples 100

Every hyperparameter comes from the two checkpoints. The top codes are sampled first, then the bottom codes given
them. Writes <out_dir>/samples.png (a grid), codes.pt (codes_top [N, h, w], codes_bottom [N, H, W], class labels and
sampling settings; torch.load(..., weights_only=True) reads it) and, with --save_individual, sample_0000.png, ...
"""

from common.cli import ArgumentParser, prepare_out_dir, resolve_device, run_main
from common.sampling import add_sampling_flags, class_labels, generate, load_pair, sampling_settings, save_outputs


def main(args):
    # Setup: every check runs before the output folder is made, so a bad run writes nothing
    device = resolve_device(args.device)
    vqvae2, prior = load_pair(args.vqvae2_checkpoint, args.prior_checkpoint, 'vq_vae2', 'hierarchical_pixelcnn',
                              device, args.class_label)
    labels = class_labels(prior, args.class_label, args.num_samples)
    top_shape, bottom_shape = vqvae2.code_shape()  # (h, w), (H, W)
    prepare_out_dir(args.out_dir)

    # Sample
    def sample_batch(batch_size, batch_labels, generator):
        codes_top, codes_bottom = prior.sample(batch_size, top_shape, bottom_shape, args.temperature, args.top_k,
                                               batch_labels, generator=generator, cached=not args.naive)
        return {'codes_top': codes_top, 'codes_bottom': codes_bottom}, vqvae2.decode_codes(codes_top, codes_bottom)

    images, codes = generate(sample_batch, args.num_samples, args.batch_size, labels, args.seed, device)
    save_outputs(args.out_dir, images, codes, args.save_individual, sampling_settings(args))
    print(f'{args.num_samples} samples ({top_shape[0]}x{top_shape[1]} top and {bottom_shape[0]}x{bottom_shape[1]} '
          f'bottom codes each) written to {args.out_dir}')


def build_parser():
    """The stage-3 command line for a hierarchical PixelCNN prior over VQ-VAE-2 codes."""
    parser = ArgumentParser(description='Stage 3: sample images from a hierarchical PixelCNN prior and its VQ-VAE-2.')
    parser.add_argument('--vqvae2_checkpoint', required=True, help='stage-1 VQ-VAE-2 checkpoint (required)')
    add_sampling_flags(parser, 'pixelcnn_vqvae2')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
