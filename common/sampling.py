"""Stage-3 code both sampling scripts share: flags, loading a VQ model with its prior, the batch loop and the outputs.

codes.pt holds {'codes': [N, h, w]} (VQ-VAE) or {'codes_top': [N, h, w], 'codes_bottom': [N, H, W]} (VQ-VAE-2) as
LongTensors, 'class_labels' [N] for a class-conditional prior, and 'settings': the flags that decided the samples.
"""

import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

from models import MODELS, PRIOR_KINDS, CheckpointError, file_sha256, load_checkpoint, model_from_checkpoint

from .cli import OutputDir, add_common_flags, positive_float, positive_int, resolve_device
from .distributed import barrier, cleanup_distributed, setup_distributed
from .errors import UserError

NOT_SETTINGS = ('out_dir', 'device', 'debug', 'save_individual')  # flags that do not change the samples


def codes_file_key(level):
    """The name of a level's codes in codes.pt: 'codes' for the one level of a VQ-VAE, else 'codes_<level>'."""
    return 'codes' if level == 'flat' else f'codes_{level}'


def probability(text):
    """argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f'must be in (0, 1], got {text}')
    return value


def add_sampling_flags(parser, name):
    """Flags both sampling scripts share; outputs go to samples/<name> unless --out_dir says otherwise."""
    parser.add_argument('--prior_checkpoint', required=True, help='stage-2 prior checkpoint (required)')
    parser.add_argument('--num_samples', type=positive_int, default=64, help='images to generate (default: 64)')
    parser.add_argument('--batch_size', type=positive_int, default=64,
                        help='images sampled at once per process; the samples do not depend on it (default: 64)')
    parser.add_argument('--temperature', type=positive_float, default=1.0,
                        help='divides the logits; below 1 gives safer, less varied samples, near 0 the most likely '
                             'code (default: 1.0)')
    parser.add_argument('--top_k', type=positive_int, default=None,
                        help='sample each code from the k most likely ones only (default: all codes)')
    parser.add_argument('--top_p', type=probability, default=None,
                        help='nucleus sampling: from the most likely codes whose probability reaches p, p in (0, 1] '
                             '(default: all codes)')
    parser.add_argument('--class_label', type=int, default=None,
                        help='class of every sample, for a class-conditional prior (default: every class in turn)')
    parser.add_argument('--save_individual', action='store_true',
                        help='also write sample_0000.png, sample_0001.png, ... (default: off)')
    parser.add_argument('--naive', action='store_true',
                        help='use the slow reference sampler (one forward pass per code), to check the cached one; '
                             'it draws the same codes (default: off)')
    add_common_flags(parser, out_dir=f'samples/{name}', out_dir_help='folder for samples.png, codes.pt and sample PNGs')


def check_prior_entries(state, path):
    """Raise CheckpointError unless a prior checkpoint has the entries stage 2 writes beside the model."""
    shapes, vq = state.get('code_shapes'), state.get('vq_checkpoint')
    if shapes is None or vq is None:
        raise CheckpointError(f'{path} has no code_shapes/vq_checkpoint entries; it was not written by a '
                              f'train_pixelcnn_vqvae*.py script')
    if not isinstance(shapes, dict) or not all(
            isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
            for shape in shapes.values()):
        raise CheckpointError(f'{path}: code_shapes must map each level to a grid [h, w], got {shapes!r:.100}')
    if not isinstance(vq, dict) or not isinstance(vq.get('sha256'), str):
        raise CheckpointError(f'{path}: vq_checkpoint must be a dict with the VQ file\'s sha256, got {vq!r:.100}')


def load_pair(vq_path, prior_path, vq_kind, device, class_label=None, warn=True):
    """Load a VQ model and its prior, in eval mode on `device`; raise a one-line error if they do not fit together.

    Every check runs before the VQ file is hashed, so a bad run prints its error alone, without the hash warning.
    """
    vq_state = load_checkpoint(vq_path, kinds=vq_kind)
    levels = MODELS[vq_kind].levels
    prior_state = load_checkpoint(prior_path, kinds=tuple(k for k in PRIOR_KINDS if MODELS[k].levels == levels))
    check_prior_entries(prior_state, prior_path)
    vq_model = model_from_checkpoint(vq_state, device, vq_path)
    prior = model_from_checkpoint(prior_state, device, prior_path)

    if prior.num_embeddings != vq_model.num_embeddings:
        raise UserError(f'{prior_path} models {prior.num_embeddings} codes but {vq_path} has '
                        f'{vq_model.num_embeddings}; give the VQ checkpoint the prior was trained on')
    shapes = {level: list(shape) for level, shape in vq_model.level_shapes().items()}
    if {level: list(shape) for level, shape in prior_state['code_shapes'].items()} != shapes:
        raise UserError(f'{prior_path} was trained on code grids {prior_state["code_shapes"]} but {vq_path} makes '
                        f'{shapes}; give the VQ checkpoint the prior was trained on')
    if prior.num_classes is None and class_label is not None:
        raise UserError(f'--class_label {class_label} was given but {prior_path} is an unconditional prior; '
                        f'drop --class_label')
    if prior.num_classes is not None and class_label is not None and not 0 <= class_label < prior.num_classes:
        raise UserError(f'--class_label must be in [0, {prior.num_classes}) for this prior, got {class_label}')

    recorded = prior_state['vq_checkpoint']
    if warn and file_sha256(vq_path) != recorded.get('sha256'):
        print(f'WARNING: {vq_path} is not the file the prior was trained with ({recorded.get("path")}): the sha256 '
              f'differs, so the samples may be poor', file=sys.stderr)
    return vq_model, prior


def class_labels(prior, class_label, num_samples):
    """Labels [N] for a class-conditional prior (`class_label`, else every class in turn); None if unconditional."""
    if prior.num_classes is None:
        return None
    if class_label is None:
        return torch.arange(num_samples) % prior.num_classes
    return torch.full((num_samples,), class_label, dtype=torch.long)


def sample_seed(seed, index):
    """The seed of sample `index`'s own generator: its draws depend on --seed and its index only.

    torch's CPU generator keeps only the low 32 bits of a seed, so --seed is mixed into them (odd multiplier: the
    samples of one run all get different seeds).
    """
    return (seed * 0x9E3779B1 + index) % 2 ** 32


def shard(num_samples, rank, world_size):
    """The contiguous range of sample indices that process `rank` of `world_size` generates."""
    per_rank = math.ceil(num_samples / world_size)
    return range(min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples))


@torch.no_grad()
def generate(vq_model, prior, args, labels, device, indices, show_progress=True):
    """Sample the images of `indices` batch by batch; returns (images [n, C, S, S] on the CPU in [-1, 1],
    {codes.pt key: LongTensor [n, ...]}).

    Every sample draws from a generator of its own, seeded by --seed and its index, so the same seed gives the same
    images whatever the batch size and however many processes share the work.
    """
    shapes = vq_model.level_shapes()
    rows = sum(height for height, _ in shapes.values())  # code rows per sample, over all levels
    images, codes = [], {}
    # Progress in rows of codes: one batch of large grids takes minutes, which a per-batch bar would not show.
    with tqdm(total=len(indices) * rows, desc='sampling', unit='row', unit_scale=1 / rows, dynamic_ncols=True,
              disable=not show_progress, bar_format='{l_bar}{bar}| {n:.1f}/{total:.0f} images [{elapsed}<{remaining}]'
              ) as bar:
        for start in range(0, len(indices), args.batch_size):
            batch = indices[start:start + args.batch_size]
            generators = [torch.Generator().manual_seed(sample_seed(args.seed, index)) for index in batch]
            batch_labels = None if labels is None else labels[list(batch)].to(device)
            batch_codes = prior.sample_levels(len(batch), shapes, args.temperature, args.top_k, args.top_p,
                                              batch_labels, generators, cached=not args.naive,
                                              on_row=lambda: bar.update(len(batch)))
            images.append(vq_model.decode_level_codes(batch_codes).float().cpu())
            for level, value in batch_codes.items():
                codes.setdefault(codes_file_key(level), []).append(value.cpu())
    return torch.cat(images), {name: torch.cat(values) for name, values in codes.items()}


def gather_shards(out_dir, rank, world_size, images, codes):
    """Collect every process's samples on rank 0, in index order, through files in the (locked) output folder.

    Returns (images, codes) on rank 0 and (None, None) on the others.
    """
    from models import atomic_save

    if world_size == 1:
        return images, codes
    atomic_save({'images': images, 'codes': codes}, os.path.join(out_dir, f'.shard_{rank}.pt'))
    barrier()
    if rank != 0:
        return None, None
    paths = [os.path.join(out_dir, f'.shard_{r}.pt') for r in range(world_size)]
    parts = [torch.load(path, weights_only=True) for path in paths]
    for path in paths:
        os.remove(path)
    return (torch.cat([p['images'] for p in parts]),
            {name: torch.cat([p['codes'][name] for p in parts]) for name in parts[0]['codes']})


def run_generation(args, vq_path, vq_kind):
    """Stage 3 for either script: check the checkpoints, sample (split over torchrun processes), write the outputs."""
    # Setup: every check runs before the output folder is made, so a bad run writes nothing
    device = resolve_device(args.device)
    rank, world_size, device = setup_distributed(device)
    vq_model, prior = load_pair(vq_path, args.prior_checkpoint, vq_kind, device, args.class_label,
                                warn=rank == 0)
    labels = class_labels(prior, args.class_label, args.num_samples)

    # Sample
    with OutputDir(args.out_dir, enabled=rank == 0):
        barrier()  # the folder exists before other ranks write their shards into it
        indices = shard(args.num_samples, rank, world_size)
        images, codes = generate(vq_model, prior, args, labels, device, indices, show_progress=rank == 0)
        images, codes = gather_shards(args.out_dir, rank, world_size, images, codes)
        if rank == 0:
            if labels is not None:
                codes['class_labels'] = labels
            save_outputs(args.out_dir, images, codes, args.save_individual, sampling_settings(args))
        barrier()
    if rank == 0:
        grids = ' and '.join(f'{"x".join(map(str, shape))} {level}' for level, shape in
                             vq_model.level_shapes().items())
        print(f'{args.num_samples} samples ({grids} codes each) written to {args.out_dir}')
    cleanup_distributed()


def sampling_settings(args):
    """The flags that decide the samples (not where they go or how errors print), to store beside the codes."""
    return {name: value for name, value in vars(args).items() if name not in NOT_SETTINGS}


def save_outputs(out_dir, images, codes, save_individual, settings):
    """Write samples.png (a square-ish grid), codes.pt (codes + settings) and, if asked, one PNG per sample.

    Each file is written under a temporary name and renamed, so an error (a full disk) leaves no partial file.
    """
    # Imported here, not at the top: torchvision takes seconds to load, which a run that stops at a bad flag or
    # checkpoint should not have to wait for.
    from torchvision.utils import save_image

    from models import atomic_save

    from .data import denormalize

    images = denormalize(images)  # [N, C, S, S] in [0, 1]
    written = []
    try:
        def write_png(tensor, name, **kwargs):
            path = os.path.join(out_dir, name)
            partial = os.path.join(out_dir, f'.partial_{name}')
            written.append(partial)
            save_image(tensor, partial, format='png', **kwargs)
            os.replace(partial, path)
            written[-1] = path

        write_png(images, 'samples.png', nrow=math.ceil(math.sqrt(len(images))))
        if save_individual:
            for index, image in enumerate(images):
                write_png(image, f'sample_{index:04d}.png')
        atomic_save({**codes, 'settings': settings}, os.path.join(out_dir, 'codes.pt'))
    except BaseException:
        for path in written:  # no half-written set of samples
            if os.path.exists(path):
                os.remove(path)
        raise
