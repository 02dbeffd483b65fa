"""What both prior training scripts share: flags, the frozen VQ model, cached codes, and the stage-2 Task.

A script supplies only what differs between the flat and the hierarchical prior: its checkpoint kinds, the names of
its code tensors, and a `losses(model, codes, labels, reduction)` function returning cross-entropy per level.
"""

import math
import os

import torch
from torch.utils.data import TensorDataset
from torchvision.utils import save_image

from models import PRIOR_PRESETS, build_model, file_sha256, load_checkpoint, model_from_checkpoint

from .cli import add_common_flags, positive_int, prepare_out_dir, resolve_device
from .codes import load_or_extract_codes
from .data import denormalize
from .distributed import all_reduce_sum, barrier, cleanup_distributed, setup_distributed
from .errors import UserError
from .tracking import add_wandb_flags
from .trainer import Task, add_training_flags, apply_resume_flags, train

LOG2 = math.log(2)


def add_prior_flags(parser, vq_flag, out_dir, wandb_project):
    """Flags both prior training scripts share; `vq_flag` names the VQ checkpoint flag."""
    parser.add_argument(vq_flag, required=True, help='stage-1 checkpoint (best.pth or last.pth) to take codes from')
    parser.add_argument('--preset', default='default', choices=list(PRIOR_PRESETS),
                        help='prior size preset; the flags below override it (default: default = 128 channels, '
                             '15 layers)')
    parser.add_argument('--hidden_channels', type=positive_int, default=None, help='channels per gated layer')
    parser.add_argument('--num_layers', type=positive_int, default=None, help='gated layers per level')
    parser.add_argument('--embedding_dim', type=positive_int, default=None,
                        help='size of the code embedding at the input (default: 64)')
    parser.add_argument('--class_conditional', action='store_true',
                        help='condition on the dataset\'s class labels (default: off)')
    parser.add_argument('--data_dir', default=None,
                        help='where the dataset is now, if it moved since stage 1 (default: the folder stage 1 used)')
    parser.add_argument('--num_epoch_samples', type=int, default=16,
                        help='decoded samples written to samples.png each epoch; 0 turns this off (default: 16)')
    add_training_flags(parser, epochs=20, batch_size=128)
    add_wandb_flags(parser, project=wandb_project)
    add_common_flags(parser, out_dir=out_dir)


def prior_config(args, num_embeddings, num_classes):
    """Prior config: class defaults, then the preset, then the size flags; codebook size from the VQ model."""
    config = dict(PRIOR_PRESETS[args.preset])
    config.update({name: getattr(args, name) for name in ('hidden_channels', 'num_layers', 'embedding_dim')
                   if getattr(args, name) is not None})
    return {**config, 'num_embeddings': num_embeddings, 'num_classes': num_classes}


def train_prior(args, vq_path, vq_kind, prior_kind, code_names, losses, sample_images, levels=None):
    """Stage 2: load the frozen VQ model, get cached codes, train the prior, write checkpoints to args.out_dir.

    `losses(model, codes, labels, reduction)` returns {level: cross-entropy in nats}; `sample_images(model, vq_model,
    labels, generator)` returns decoded samples for the per-epoch grid.
    """
    # Setup
    device = resolve_device(args.device)
    vq_state = load_checkpoint(vq_path, kinds=(vq_kind,))
    resume_state = load_checkpoint(args.resume, kinds=(prior_kind,)) if args.resume else None
    if resume_state is not None:
        apply_resume_flags(args, resume_state)
    rank, world_size, device = setup_distributed(device)
    vq_model = model_from_checkpoint(vq_state, device).requires_grad_(False)
    data = dict(vq_state['data'])
    if args.data_dir:
        data['data_dir'] = os.path.abspath(args.data_dir)
    num_classes = data.get('num_classes') if args.class_conditional else None
    if args.class_conditional and (num_classes or 0) < 2:
        raise UserError(f"--class_conditional needs class labels, but dataset {data['name']} has "
                        f"{num_classes or 0} classes")

    # Codes: rank 0 fills the cache, the other ranks read it.
    vq_sha256 = file_sha256(vq_path)
    splits = {}
    for split in ('train', 'val'):
        if rank == 0:
            splits[split], reused = load_or_extract_codes(vq_model, vq_path, vq_sha256, data, split,
                                                          args.batch_size, device, args.num_workers)
            print(f"{split} codes: {'read from the cache' if reused else 'extracted and cached'} "
                  f"({len(splits[split]['labels'])} items)")
        barrier()
        if rank != 0:
            splits[split], _ = load_or_extract_codes(vq_model, vq_path, vq_sha256, data, split, args.batch_size,
                                                     device, extract=False)
    datasets = {split: TensorDataset(*[codes[name] for name in code_names], codes['labels'])
                for split, codes in splits.items()}
    code_shape = {name: list(splits['train'][name].shape[1:]) for name in code_names}

    # Create model
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    config = resume_state['config'] if resume_state else prior_config(args, vq_model.num_embeddings, num_classes)
    model = build_model(prior_kind, config)
    if rank == 0:
        prepare_out_dir(args.out_dir)
        print(f'{prior_kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
              f'{config["num_embeddings"]} codes, grids {code_shape}, '
              f'class-conditional: {config["num_classes"] is not None}')
    use_labels = config['num_classes'] is not None

    def unpack(batch):
        *codes, labels = [t.to(device, non_blocking=True).long() for t in batch]
        return dict(zip(code_names, codes)), labels if use_labels else None

    def training_step(model, batch):
        codes, labels = unpack(batch)
        level_losses = losses(model, codes, labels, 'mean')
        loss = sum(level_losses.values())
        # Weighted by the number of codes per level, like the validation figure.
        sizes = {lv: codes[f'codes{lv}'][0].numel() for lv in level_losses}
        mean_nats = sum(level_losses[lv].detach() * sizes[lv] for lv in sizes) / sum(sizes.values())
        return loss, {'bits_per_code': mean_nats / LOG2,
                      **{f'bits{lv}': v.detach() / LOG2 for lv, v in level_losses.items() if lv}}

    def evaluate(model, loader):
        sums = None  # per level: summed nats, number of codes
        for batch in loader:
            codes, labels = unpack(batch)
            level_sums = losses(model, codes, labels, 'sum')
            counts = {lv: codes[f'codes{lv}'].numel() for lv in level_sums}
            batch_sums = torch.tensor([[float(level_sums[lv]), counts[lv]] for lv in level_sums],
                                      dtype=torch.float64, device=device)
            sums = batch_sums if sums is None else sums + batch_sums
        all_reduce_sum(sums)
        metrics = {f'bits{lv}': float(sums[i, 0] / sums[i, 1]) / LOG2 for i, lv in enumerate(level_sums) if lv}
        metrics['bits_per_code'] = float(sums[:, 0].sum() / sums[:, 1].sum()) / LOG2
        return metrics

    generator = torch.Generator().manual_seed(args.seed)

    def on_epoch_end(model, epoch, tracker, step):
        if args.num_epoch_samples <= 0:
            return
        model.eval()
        labels = (torch.arange(args.num_epoch_samples) % config['num_classes']).tolist() if use_labels else None
        images = sample_images(model, vq_model, args.num_epoch_samples, labels, generator.manual_seed(args.seed))
        model.train()
        path = os.path.join(args.out_dir, 'samples.png')
        save_image(denormalize(images.float().cpu()), path, nrow=int(math.ceil(math.sqrt(len(images)))))
        tracker.log_image('samples', path, step)

    extra = {'vq_checkpoint': {'path': os.path.abspath(vq_path), 'sha256': vq_sha256, 'kind': vq_kind},
             'num_embeddings': config['num_embeddings'], 'data': data,
             'code_shape': code_shape['codes'] if code_names == ('codes',) else
             {name[len('codes_'):]: shape for name, shape in code_shape.items()}}
    if levels is not None:
        extra['levels'] = list(levels)
    task = Task(kind=prior_kind, model=model, train_set=datasets['train'], val_set=datasets['val'],
                training_step=training_step, evaluate=evaluate, score_key='bits_per_code', checkpoint_extra=extra,
                on_epoch_end=on_epoch_end, find_unused_parameters=levels is not None and len(levels) < 2)
    metrics = train(args, task, rank, world_size, device, resume_state)
    if rank == 0:
        print('final validation: ' + ', '.join(f'{k[4:]} {v:.4g}' for k, v in metrics.items() if k.startswith('val_')))
    cleanup_distributed()
