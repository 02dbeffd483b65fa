"""Stage 1: train a VQ-VAE or VQ-VAE-2 that turns images into grids of code indices.

Example:
    python main.py --arch vq_vae2 --dataset cifar10 --epochs 100
    python main.py --arch vq_vae --dataset shapes --epochs 2 --out_dir runs/vq_vae   # built-in data, no download

Writes <out_dir>/last.pth, best.pth (lowest validation MSE), metrics.jsonl and reconstructions.png every epoch.
"""

import math
import os

import torch
from torchvision.utils import save_image

from common.cli import (ArgumentParser, add_common_flags, positive_float, positive_int, prepare_out_dir,
                        resolve_device, run_main)
from common.data import DATASETS, build_dataset, denormalize
from common.distributed import all_reduce_sum, barrier, cleanup_distributed, setup_distributed
from common.errors import UserError
from common.tracking import add_wandb_flags
from common.trainer import Task, add_training_flags, apply_resume_flags, train
from models import VQVAE, VQVAE2_PRESETS, VQVAE_PRESETS, build_model, load_checkpoint

ARCHS = {'vq_vae': VQVAE_PRESETS, 'vq_vae2': VQVAE2_PRESETS}
MODEL_FLAGS = ('hidden_channels', 'num_res_blocks', 'res_channels', 'num_embeddings', 'embedding_dim', 'downsample',
               'commitment_cost', 'decay', 'dead_code_threshold')


def model_config(args, info):
    """Model config: the class defaults, then the preset, then any model flag given on the command line."""
    config = dict(ARCHS[args.arch][args.preset])
    config.update({name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None})
    config.update(in_channels=info['in_channels'], image_size=info['image_size'], ema=args.codebook_update == 'ema')
    return config


def code_stats(counts):
    """Perplexity and the fraction of codes used, from code counts over a whole split."""
    probs = counts / counts.sum()
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    return float(perplexity), float((counts > 0).float().mean())


def make_task(args, model, train_set, val_set, data, device):
    """Stage-1 Task: reconstruction + VQ loss; validation MSE, PSNR, perplexity and code usage per level."""
    levels = [''] if isinstance(model, VQVAE) else ['_top', '_bottom']
    grid_images = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))])

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def training_step(model, batch):
        images = batch[0].to(device, non_blocking=True, memory_format=memory_format)
        _, stats = model(images)
        metrics = {'loss': stats['loss'].detach(), 'mse': stats['recon_loss'].detach()}
        metrics.update({f'perplexity{lv}': stats[f'perplexity{lv}'] for lv in levels})
        return stats['loss'], metrics

    def evaluate(model, loader):
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # squared error, number of values
        counts = {lv: torch.zeros(model.num_embeddings, device=device) for lv in levels}
        for images, _ in loader:
            images = images.to(device)
            recon, stats = model(images)
            totals += torch.stack([(recon.float() - images).pow(2).sum().double(),
                                   torch.tensor(images.numel(), dtype=torch.float64, device=device)])
            for lv in levels:
                counts[lv] += stats[f'code_counts{lv}']
        all_reduce_sum(totals)
        mse = float(totals[0] / totals[1])
        # Images live in [-1, 1], a range of 2, so the peak signal power is 4.
        metrics = {'mse': mse, 'psnr': 10 * math.log10(4 / max(mse, 1e-12))}
        for lv in levels:
            metrics[f'perplexity{lv}'], metrics[f'code_usage{lv}'] = code_stats(all_reduce_sum(counts[lv]))
        return metrics

    def on_epoch_end(model, epoch, tracker, step):
        model.eval()
        with torch.no_grad():
            recon, _ = model(grid_images.to(device))
        model.train()
        # Row 1: inputs, row 2: their reconstructions.
        grid = denormalize(torch.cat([grid_images, recon.float().cpu()]))
        path = os.path.join(args.out_dir, 'reconstructions.png')
        save_image(grid, path, nrow=len(grid_images))
        tracker.log_image('reconstructions', path, step)

    return Task(kind=model.kind, model=model, train_set=train_set, val_set=val_set, training_step=training_step,
                evaluate=evaluate, score_key='mse', checkpoint_extra={'data': data, 'image_size': data['image_size']},
                on_epoch_end=on_epoch_end)


def main(args):
    # Setup
    device = resolve_device(args.device)
    resume_state = None
    if args.resume:
        resume_state = load_checkpoint(args.resume, kinds=tuple(ARCHS))
        args.arch = resume_state['kind']
        apply_resume_flags(args, resume_state)
        data = resume_state['data']
    else:
        data = dict(name=args.dataset, image_size=args.image_size, data_dir=os.path.abspath(args.data_dir),
                    seed=args.seed, num_samples={'train': args.num_train, 'val': args.num_val})
    rank, world_size, device = setup_distributed(device)
    torch.manual_seed(args.seed + rank)
    datasets = {}
    for turn in (0, 1):  # rank 0 downloads first, then the other ranks read what it fetched
        if (rank == 0) == (turn == 0):
            for split in ('train', 'val'):
                datasets[split], info = build_dataset(data['name'], split, data['image_size'], data['data_dir'],
                                                      seed=data['seed'], download=rank == 0,
                                                      num_samples=data.get('num_samples', {}).get(split))
        barrier()
    data.update(image_size=info['image_size'], in_channels=info['in_channels'], num_classes=info['num_classes'])

    # Create model
    config = resume_state['config'] if resume_state else model_config(args, info)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        model = build_model(args.arch, config)
    except ValueError as e:
        raise UserError(f'{args.arch} cannot take this input: {e}; choose another --image_size or --downsample')
    if rank == 0:
        prepare_out_dir(args.out_dir)
        print(f'{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
              f'{data["name"]} {info["image_size"]}x{info["image_size"]}, code grid {model.code_shape()}, '
              f'{len(datasets["train"])} train / {len(datasets["val"])} val images')

    # Train
    if args.channels_last:  # NHWC convolutions, faster on recent GPUs with --amp
        model = model.to(memory_format=torch.channels_last)
    task = make_task(args, model, datasets['train'], datasets['val'], data, device)
    metrics = train(args, task, rank, world_size, device, resume_state)
    if rank == 0:
        print('final validation: ' + ', '.join(f'{k[4:]} {v:.4g}' for k, v in metrics.items() if k.startswith('val_')))
    cleanup_distributed()


def build_parser():
    """The stage-1 command line."""
    parser = ArgumentParser(description='Stage 1: train a VQ-VAE or VQ-VAE-2.')
    parser.add_argument('--arch', default='vq_vae2', choices=list(ARCHS), help='model (default: vq_vae2)')
    parser.add_argument('--preset', default='default', choices=list(VQVAE_PRESETS),
                        help='model size preset; model flags override it (default: default)')
    parser.add_argument('--dataset', default='shapes', choices=DATASETS,
                        help='training data; shapes is built in (default: shapes)')
    parser.add_argument('--data_dir', default='data',
                        help='where datasets are (or get downloaded); the image folder for imagefolder '
                             '(default: data)')
    parser.add_argument('--image_size', type=positive_int, default=None,
                        help='square image size (default: 32; 64 for imagefolder)')
    parser.add_argument('--num_train', type=positive_int, default=None,
                        help='use only this many training images, e.g. for quick runs (default: all; shapes: 20000)')
    parser.add_argument('--num_val', type=positive_int, default=None,
                        help='use only this many validation images (default: all; shapes: 2000, others: 5000)')
    model = parser.add_argument_group('model (defaults: the preset; the default preset is 128 hidden channels, '
                                      '2 residual blocks of 32, 512 codes of dim 64, downsampling x4)')
    for name in ('hidden_channels', 'num_res_blocks', 'res_channels', 'num_embeddings', 'embedding_dim'):
        model.add_argument(f'--{name}', type=positive_int, default=None)
    model.add_argument('--downsample', type=positive_int, default=None, choices=[2, 4, 8],
                       help='bottom-level downsampling factor')
    model.add_argument('--commitment_cost', type=positive_float, default=None, help='beta (default: 0.25)')
    model.add_argument('--codebook_update', default='ema', choices=['ema', 'loss'],
                       help='EMA codebook updates or a codebook loss (default: ema)')
    model.add_argument('--decay', type=positive_float, default=None, help='EMA decay (default: 0.99)')
    model.add_argument('--dead_code_threshold', type=float, default=None,
                       help='restart codes whose EMA cluster size falls below this; 0 disables (default: 1.0)')
    parser.add_argument('--channels_last', action='store_true',
                        help='channels-last memory format for the convolutions, usually faster on GPUs with --amp')
    add_training_flags(parser, epochs=20, batch_size=64)
    add_wandb_flags(parser, project='vqvae-stage1')
    add_common_flags(parser, out_dir='runs/stage1')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
