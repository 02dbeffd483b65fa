"""What both prior training scripts share: flags, the frozen VQ model, cached codes, and the stage-2 Task.

A script supplies only what differs between the flat and the hierarchical prior: the VQ checkpoint's flag and kind,
and which levels to train. Everything else goes through the per-level interface of models/prior.py.
"""

import math
import os

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from torchvision.utils import save_image

from models import (MODELS, PRIOR_PRESETS, TRANSFORMER_PRESETS, ConfigError, build_model, file_sha256,
                    load_checkpoint, model_from_checkpoint)
from models.pixelcnn_prior import HierarchicalPixelCNNConfig
from models.transformer_prior import HierarchicalTransformerConfig

from .cli import (OutputDir, add_common_flags, add_config_flags, config_from_flags, nonnegative_float, nonnegative_int,
                  resolve_device)
from .codes import load_or_extract_codes
from .data import DATASETS, denormalize
from .distributed import all_reduce_sum, cleanup_distributed, rank_zero_first, setup_distributed
from .errors import UserError
from .memory import check_memory
from .tracking import add_wandb_flags
from .trainer import Task, add_training_flags, apply_resume_flags, train

LOG2 = math.log(2)


class Family:
    """A prior family: its checkpoint kinds (flat, two-level), config class, presets, size flags and weight decay."""

    def __init__(self, flat_kind, hierarchical_kind, config_class, presets, flags, weight_decay):
        self.flat_kind, self.hierarchical_kind = flat_kind, hierarchical_kind
        self.config_class, self.presets, self.flags = config_class, presets, flags
        self.weight_decay = weight_decay

    def kind(self, vq_kind):
        """The prior kind for a VQ model of `vq_kind`."""
        return self.flat_kind if vq_kind == 'vq_vae' else self.hierarchical_kind


FAMILIES = {
    'pixelcnn': Family('pixelcnn', 'hierarchical_pixelcnn', HierarchicalPixelCNNConfig, PRIOR_PRESETS,
                       ('hidden_channels', 'num_layers', 'embedding_dim'), weight_decay=0.0),
    'transformer': Family('transformer', 'hierarchical_transformer', HierarchicalTransformerConfig,
                          TRANSFORMER_PRESETS, ('embed_dim', 'num_layers', 'num_heads', 'num_kv_heads', 'dropout',
                                                'top_encoder_layers'), weight_decay=0.01),
}
DEFAULT_FAMILY = 'pixelcnn'
FAMILY_OF_KIND = {kind: name for name, family in FAMILIES.items() for kind in (family.flat_kind,
                                                                              family.hierarchical_kind)}


def add_prior_flags(parser, vq_flag, out_dir, wandb_project):
    """Flags both prior training scripts share; `vq_flag` names the VQ checkpoint flag."""
    parser.add_argument(vq_flag, required=True, help='stage-1 checkpoint (best.pth or last.pth) to take codes from')
    parser.add_argument('--prior', default=DEFAULT_FAMILY, choices=list(FAMILIES),
                        help=f'prior family (default: {DEFAULT_FAMILY})')
    parser.add_argument('--preset', default='default', choices=['small', 'default', 'large'],
                        help='prior size preset; the size flags below override it (default: default)')
    added = set()
    for name, family in FAMILIES.items():  # a flag both families have (num_layers) is added once
        group = parser.add_argument_group(f'{name} size (each flag overrides the preset)')
        add_config_flags(group, family.config_class, [f for f in family.flags if f not in added], family.presets)
        added.update(family.flags)
    parser.add_argument('--weight_decay', type=nonnegative_float, default=None,
                        help='AdamW weight decay on the matmul weights (default: ' + ', '.join(
                            f'{name} {family.weight_decay}' for name, family in FAMILIES.items()) + ')')
    parser.add_argument('--class_conditional', action='store_true',
                        help='condition on the dataset\'s class labels (default: off)')
    parser.add_argument('--data_dir', default=None,
                        help='where the dataset is now, if it moved since stage 1 (default: the folder stage 1 used)')
    parser.add_argument('--num_epoch_samples', type=nonnegative_int, default=16,
                        help='decoded samples written to samples.png each epoch; 0 turns this off (default: 16)')
    add_training_flags(parser, epochs=20, batch_size=128)
    add_wandb_flags(parser, project=wandb_project)
    add_common_flags(parser, out_dir=out_dir)


def prior_config(args, family, kind, num_embeddings, num_classes, code_shapes):
    """Prior config: class defaults, then the preset, then the size flags; codebook size (and, for a family with a
    position table, its size) from the VQ model."""
    other = [f'--{name}' for other_name, other_family in FAMILIES.items() if other_name != args.prior
             for name in other_family.flags if name not in family.flags and getattr(args, name, None) is not None]
    if other:
        raise UserError(f'{", ".join(other)} {"does" if len(other) == 1 else "do"} not apply to the {args.prior} '
                        f'prior; drop {"it" if len(other) == 1 else "them"} or choose another --prior')
    fields = MODELS[kind].config_class.__dataclass_fields__
    given = [f'--{name}' for name in family.flags if name not in fields and getattr(args, name, None) is not None]
    if given:
        raise UserError(f'{", ".join(given)} only apply{"s" if len(given) == 1 else ""} to a two-level prior; '
                        f'drop {"it" if len(given) == 1 else "them"}')
    config = config_from_flags(args, family.config_class, [f for f in family.flags if f in fields],
                               family.presets[args.preset])
    config.update(num_embeddings=num_embeddings, num_classes=num_classes)
    if 'max_height' in family.config_class.__dataclass_fields__:
        config.update(max_height=max(h for h, _ in code_shapes.values()), max_width=max(w for _, w in
                                                                                    code_shapes.values()))
    return config


def stage1_data(vq_state, vq_path):
    """The data settings a stage-1 checkpoint records; UserError if they are missing or bad."""
    data = vq_state.get('data')
    if not isinstance(data, dict) or data.get('name') not in DATASETS or not isinstance(data.get('data_dir'), str) \
            or not isinstance(data.get('seed'), int):
        raise UserError(f'{vq_path} has no usable data settings: stage 2 needs a checkpoint written by main.py '
                        f'(best.pth or last.pth), not a bare model export')
    return dict(data)


def load_codes(vq_model, vq_path, data, image_size, args, rank, device):
    """{split: codes dict} for train and val; rank 0 fills the cache, then the other ranks read it."""
    vq_sha256 = file_sha256(vq_path)
    splits = {}
    with rank_zero_first(rank):
        for split in ('train', 'val'):
            splits[split], reused = load_or_extract_codes(vq_model, vq_path, vq_sha256, data, image_size, split,
                                                          args.batch_size, device, args.num_workers,
                                                          extract=rank == 0)
            if rank == 0:
                print(f"{split} codes: {'read from the cache' if reused else 'extracted and cached'} "
                      f"({len(splits[split]['labels'])} items)")
    return splits, vq_sha256


def check_resume_fits(resume_state, vq_model, code_shapes, resume_path, vq_path):
    """Refuse a resume whose prior was trained for another codebook size or other code grids."""
    saved_codes = resume_state['config'].get('num_embeddings')
    if saved_codes != vq_model.num_embeddings:
        raise UserError(f'{resume_path} models {saved_codes} codes but {vq_path} has {vq_model.num_embeddings}; '
                        f'resume with the VQ checkpoint the prior was trained on')
    saved_shapes = resume_state.get('code_shapes')
    if saved_shapes != code_shapes:
        raise UserError(f'{resume_path} was trained on code grids {saved_shapes} but {vq_path} makes {code_shapes}; '
                        f'resume with the VQ checkpoint the prior was trained on')


class LevelLosses(nn.Module):
    """A prior's per-level losses as a module's forward: DDP synchronises gradients only through forward calls."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, codes, class_labels, levels):
        return self.prior.level_losses(codes, class_labels, levels)


def make_task(args, model, vq_model, datasets, levels, extra, device):
    """The stage-2 Task: cross-entropy of the trained levels; validation bits per code in all and per level."""
    use_labels = model.num_classes is not None
    all_levels = model.levels

    def unpack(batch):
        *codes, labels = [t.to(device, non_blocking=True).long() for t in batch]
        return dict(zip(all_levels, codes)), labels if use_labels else None

    def training_step(module, batch):  # `module`: LevelLosses around the prior, maybe wrapped by DDP
        codes, labels = unpack(batch)
        losses = module(codes, labels, levels)
        sizes = {level: codes[level][0].numel() for level in losses}
        # Weighted by the number of codes per level, like the validation figure.
        mean_nats = sum(losses[level].detach() * sizes[level] for level in losses) / sum(sizes.values())
        return sum(losses.values()), {'bits_per_code': mean_nats / LOG2,
                                      **{f'bits_per_code/{lv}': v.detach() / LOG2 for lv, v in losses.items()}}

    def evaluate(model, loader):
        sums = torch.zeros(len(levels), 2, dtype=torch.float64, device=device)  # per level: nats, codes
        for batch in loader:
            codes, labels = unpack(batch)
            losses = model.level_losses(codes, labels, levels, reduction='sum')
            sums += torch.tensor([[float(losses[level]), codes[level].numel()] for level in levels],
                                 dtype=torch.float64, device=device)
        all_reduce_sum(sums)
        metrics = {'bits_per_code': float(sums[:, 0].sum() / sums[:, 1].sum()) / LOG2}
        metrics.update({f'bits_per_code/{level}': float(sums[i, 0] / sums[i, 1]) / LOG2
                        for i, level in enumerate(levels)})
        return metrics, {}

    generator = torch.Generator().manual_seed(args.seed)

    def on_epoch_end(model, epoch, tracker, step):
        if args.num_epoch_samples <= 0:
            return
        model.eval()
        labels = (torch.arange(args.num_epoch_samples) % model.num_classes).tolist() if use_labels else None
        images = model.sample_with_vq(vq_model, args.num_epoch_samples, class_labels=labels,
                                      generator=generator.manual_seed(args.seed))
        model.train()
        path = os.path.join(args.out_dir, 'samples.png')
        save_image(denormalize(images.float().cpu()), path, nrow=int(math.ceil(math.sqrt(len(images)))))
        tracker.log_image('samples', path, step)

    return Task(model=model, train_module=LevelLosses(model), train_set=datasets['train'], val_set=datasets['val'],
                training_step=training_step, weight_decay=args.weight_decay,
                evaluate=evaluate, score_key='bits_per_code', score_scope='levels ' + '+'.join(levels),
                checkpoint_extra=extra, on_epoch_end=on_epoch_end,
                find_unused_parameters=len(levels) < len(all_levels),
                optimizer_groups=getattr(model, 'optim_groups', None))


def create_prior(args, vq_kind, vq_model, code_shapes, num_classes, resume_state, world_size, device):
    """The prior to train, (kind, config, model): the checkpoint's for a resume, else from the family's flags;
    memory is estimated before anything is allocated."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    kind = resume_state['kind'] if resume_state else FAMILIES[args.prior].kind(vq_kind)
    family = FAMILIES[FAMILY_OF_KIND[kind]]  # a resume continues the checkpoint's family
    config = resume_state['config'] if resume_state else prior_config(args, family, kind, vq_model.num_embeddings,
                                                                      num_classes, code_shapes)
    if args.weight_decay is None:
        args.weight_decay = family.weight_decay
    batch = args.batch_size // world_size
    try:
        check_memory(kind, config, device, lambda model: model.level_logits(
            {level: torch.zeros(batch, *shape, dtype=torch.long) for level, shape in code_shapes.items()},
            torch.zeros(batch, dtype=torch.long) if config.get('num_classes') else None))
        return kind, config, build_model(kind, config)
    except ConfigError as e:
        raise UserError(f'the {kind} prior cannot be built: {e}') from e


def train_prior(args, vq_path, vq_kind, levels=None):
    """Stage 2: load the frozen VQ model, get cached codes, train the prior, write checkpoints to args.out_dir.

    `levels` are the levels to train (default: all of the VQ model's).
    """
    # Setup
    device = resolve_device(args.device)
    vq_state = load_checkpoint(vq_path, kinds=vq_kind)
    resume_state = None
    if args.resume:
        resume_state = load_checkpoint(args.resume, kinds=tuple(f.kind(vq_kind) for f in FAMILIES.values()))
        apply_resume_flags(args, resume_state, args.resume)
    data = stage1_data(vq_state, vq_path)
    rank, world_size, device = setup_distributed(device)
    vq_model = model_from_checkpoint(vq_state, device, vq_path).requires_grad_(False)
    levels = tuple(levels or vq_model.levels)
    code_shapes = {level: list(shape) for level, shape in vq_model.level_shapes().items()}
    if resume_state is not None:
        check_resume_fits(resume_state, vq_model, code_shapes, args.resume, vq_path)
    if args.data_dir:
        data['data_dir'] = os.path.abspath(args.data_dir)
    num_classes = data.get('num_classes') if args.class_conditional else None
    if args.class_conditional and (num_classes or 0) < 2:
        raise UserError(f"--class_conditional needs class labels, but dataset {data['name']} has "
                        f"{num_classes or 0} classes")
    kind, config, model = create_prior(args, vq_kind, vq_model, code_shapes, num_classes, resume_state, world_size,
                                       device)

    # Codes and training
    splits, vq_sha256 = load_codes(vq_model, vq_path, data, vq_model.image_size, args, rank, device)
    datasets = {split: TensorDataset(*[codes['levels'][level] for level in model.levels], codes['labels'])
                for split, codes in splits.items()}
    extra = {'vq_checkpoint': {'path': os.path.abspath(vq_path), 'sha256': vq_sha256, 'kind': vq_kind},
             'data': data, 'code_shapes': code_shapes, 'levels': list(levels)}
    with OutputDir(args.out_dir, enabled=rank == 0):
        if rank == 0:
            print(f'{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
                  f'{config["num_embeddings"]} codes, grids {code_shapes}, training {"+".join(levels)}, '
                  f'class-conditional: {config["num_classes"] is not None}')
        task = make_task(args, model, vq_model, datasets, levels, extra, device)
        metrics = train(args, task, rank, world_size, device, resume_state)
        if rank == 0:
            print('final validation: ' + ', '.join(f'{k[4:]} {v:.4g}' for k, v in metrics.items()
                                                   if k.startswith('val/')))
    cleanup_distributed()
