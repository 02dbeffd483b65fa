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

from common.cli import (ArgumentParser, OutputDir, add_common_flags, add_config_flags, config_from_flags,
                        config_type, positive_int, resolve_device, run_main)
from common.data import DATASETS, build_dataset, denormalize
from common.distributed import all_reduce_sum, cleanup_distributed, rank_zero_first, setup_distributed
from common.errors import UserError
from common.memory import check_memory
from common.tracking import add_wandb_flags
from common.trainer import Task, add_training_flags, apply_resume_flags, train
from models import VQ_KINDS, VQ_PRESETS, ConfigError, VQConfig, build_model, code_statistics, load_checkpoint

# Config fields that are flags; the image size and channels come from the dataset, `ema` from --codebook_update.
MODEL_FLAGS = ('hidden_channels', 'num_res_blocks', 'res_channels', 'num_embeddings', 'embedding_dim', 'downsample',
               'commitment_cost', 'decay', 'dead_code_threshold')


def model_config(args, info):
    """Model config: the class defaults, then the preset, then any model flag given on the command line."""
    config = config_from_flags(args, VQConfig, MODEL_FLAGS, VQ_PRESETS[args.preset])
    config.update(in_channels=info['in_channels'], image_size=info['image_size'], ema=args.codebook_update == 'ema')
    return config


def make_task(args, model, train_set, val_set, data, device):
    """Stage-1 Task: reconstruction + VQ loss; validation MSE, PSNR, and perplexity and code usage per level."""
    grid_images = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def training_step(model, batch):
        images = batch[0].to(device, non_blocking=True, memory_format=memory_format)
        _, stats = model(images)
        metrics = {'loss': stats['loss'].detach(), 'mse': stats['recon_loss'].detach()}
        metrics.update({f'perplexity/{level}': s['perplexity'] for level, s in stats['levels'].items()})
        return stats['loss'], metrics

    def evaluate(model, loader):
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # squared error, number of values
        counts = {level: torch.zeros(model.num_embeddings, device=device) for level in model.levels}
        for images, _ in loader:
            images = images.to(device, memory_format=memory_format)
            recon, stats = model(images)
            totals += torch.stack([(recon.float() - images).pow(2).sum().double(),
                                   torch.tensor(images.numel(), dtype=torch.float64, device=device)])
            for level in model.levels:
                counts[level] += stats['levels'][level]['code_counts']
        all_reduce_sum(totals)
        mse = float(totals[0] / totals[1])
        # Images live in [-1, 1], a range of 2, so the peak signal power is 4.
        metrics = {'mse': mse, 'psnr': 10 * math.log10(4 / max(mse, 1e-12))}
        for level in model.levels:
            perplexity, usage = code_statistics(all_reduce_sum(counts[level]))
            metrics[f'perplexity/{level}'], metrics[f'code_usage/{level}'] = float(perplexity), float(usage)
        return metrics, counts

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

    return Task(model=model, train_set=train_set, val_set=val_set, training_step=training_step, evaluate=evaluate,
                score_key='mse', checkpoint_extra={'data': data}, on_epoch_end=on_epoch_end)


def main(args):
    # Setup
    device = resolve_device(args.device)
    resume_state = None
    if args.resume:
        resume_state = load_checkpoint(args.resume, kinds=VQ_KINDS)
        if not isinstance(resume_state.get('data'), dict):
            raise UserError(f'{args.resume} has no data settings; it is not a stage-1 last.pth that --resume can '
                            f'continue')
        args.arch = resume_state['kind']
        apply_resume_flags(args, resume_state, args.resume)
        data = resume_state['data']
        image_size = resume_state['config'].get('image_size')
    else:
        data = dict(name=args.dataset, data_dir=os.path.abspath(args.data_dir), seed=args.seed,
                    num_samples={'train': args.num_train, 'val': args.num_val})
        image_size = args.image_size
    rank, world_size, device = setup_distributed(device)
    torch.manual_seed(args.seed + rank)
    datasets = {}
    with rank_zero_first(rank):  # rank 0 downloads, then the other ranks read what it fetched
        for split in ('train', 'val'):
            datasets[split], info = build_dataset(data['name'], split, image_size, data['data_dir'],
                                                  seed=data['seed'], download=rank == 0,
                                                  num_samples=data.get('num_samples', {}).get(split))
    data.update(in_channels=info['in_channels'], num_classes=info['num_classes'])

    # Create model
    config = resume_state['config'] if resume_state else model_config(args, info)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        shape = (args.batch_size // world_size, info['in_channels'], info['image_size'], info['image_size'])
        check_memory(args.arch, config, device, lambda model: model(torch.zeros(shape)),
                     'lower --batch_size, --image_size or the model flags')
        model = build_model(args.arch, config)
    except ConfigError as e:
        raise UserError(f'{args.arch} cannot take this input: {e}; choose another --image_size or model flags')
    except ValueError as e:
        raise UserError(f'{args.arch} cannot take this input: {e}; choose another --image_size or --downsample')
    with OutputDir(args.out_dir, enabled=rank == 0):
        if rank == 0:
            print(f'{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
                  f'{data["name"]} {info["image_size"]}x{info["image_size"]}, code grids {model.level_shapes()}, '
                  f'{len(datasets["train"])} train / {len(datasets["val"])} val images')

        # Train
        if args.channels_last:  # NHWC convolutions, faster on recent GPUs with --amp
            model = model.to(memory_format=torch.channels_last)
        task = make_task(args, model, datasets['train'], datasets['val'], data, device)
        metrics = train(args, task, rank, world_size, device, resume_state)
        if rank == 0:
            print('final validation: ' + ', '.join(f'{k[4:]} {v:.4g}' for k, v in metrics.items()
                                                   if k.startswith('val/')))
    cleanup_distributed()


def build_parser():
    """The stage-1 command line."""
    parser = ArgumentParser(description='Stage 1: train a VQ-VAE or VQ-VAE-2.')
    parser.add_argument('--arch', default='vq_vae2', choices=VQ_KINDS, help='model (default: vq_vae2)')
    parser.add_argument('--preset', default='default', choices=list(VQ_PRESETS),
                        help='model size preset; model flags override it (default: default)')
    parser.add_argument('--dataset', default='shapes', choices=DATASETS,
                        help='training data; shapes is built in (default: shapes)')
    parser.add_argument('--data_dir', default='data',
                        help='where datasets are (or get downloaded); the image folder for imagefolder '
                             '(default: data)')
    parser.add_argument('--image_size', type=config_type(VQConfig, 'image_size'), default=None,
                        help='square image size (default: 32; 64 for imagefolder)')
    parser.add_argument('--num_train', type=positive_int, default=None,
                        help='use only this many training images, e.g. for quick runs (default: all; shapes: 20000)')
    parser.add_argument('--num_val', type=positive_int, default=None,
                        help='use only this many validation images (default: all; shapes: 2000, others: 5000)')
    model = parser.add_argument_group('model (each flag overrides the preset)')
    add_config_flags(model, VQConfig, MODEL_FLAGS, VQ_PRESETS)
    model.add_argument('--codebook_update', default='ema', choices=['ema', 'loss'],
                       help='EMA codebook updates or a codebook loss (default: ema)')
    parser.add_argument('--channels_last', action='store_true',
                        help='channels-last memory format for the convolutions, usually faster on GPUs with --amp')
    add_training_flags(parser, epochs=20, batch_size=64)
    add_wandb_flags(parser, project='vqvae-stage1')
    add_common_flags(parser, out_dir='runs/stage1')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
