"""Stage-3 code both sampling scripts share: flags, loading a VQ model with its prior, the batch loop and the outputs.

codes.pt holds {'codes': [N, h, w]} (VQ-VAE) or {'codes_top': [N, h, w], 'codes_bottom': [N, H, W]} (VQ-VAE-2) as
LongTensors, 'class_labels' [N] for a class-conditional prior, and 'settings': the flags that decided the samples.
"""

import math
import os
import sys

import torch
from tqdm import tqdm

from models import CheckpointError, file_sha256, load_checkpoint, model_from_checkpoint

from .cli import add_common_flags, positive_float, positive_int
from .errors import UserError

PRIOR_ENTRIES = ('num_embeddings', 'code_shape', 'vq_checkpoint')  # what a stage-2 script records beside the model
NOT_SETTINGS = ('out_dir', 'device', 'debug', 'save_individual')  # flags that do not change the samples


def add_sampling_flags(parser, name):
    """Flags both sampling scripts share; outputs go to samples/<name> unless --out_dir says otherwise."""
    parser.add_argument('--prior_checkpoint', required=True, help='stage-2 prior checkpoint (required)')
    parser.add_argument('--num_samples', type=positive_int, default=64, help='images to generate (default: 64)')
    parser.add_argument('--batch_size', type=positive_int, default=64,
                        help='images sampled at once; the codes drawn for a seed depend on it (default: 64)')
    parser.add_argument('--temperature', type=positive_float, default=1.0,
                        help='divides the logits; below 1 gives safer, less varied samples (default: 1.0)')
    parser.add_argument('--top_k', type=positive_int, default=None,
                        help='sample each code from the k most likely ones only (default: all codes)')
    parser.add_argument('--class_label', type=int, default=None,
                        help='class of every sample, for a class-conditional prior (default: every class in turn)')
    parser.add_argument('--save_individual', action='store_true',
                        help='also write sample_0000.png, sample_0001.png, ... (default: off)')
    parser.add_argument('--naive', action='store_true',
                        help='use the slow reference sampler (one forward pass per code), to check the cached one; '
                             'it draws the same codes (default: off)')
    add_common_flags(parser, out_dir=f'samples/{name}', out_dir_help='folder for samples.png, codes.pt and sample PNGs')


def grid_text(shape):
    """'8x8' for a flat code grid, 'top 4x4 / bottom 8x8' for a two-level one (a dict or a pair of pairs)."""
    if isinstance(shape, dict):
        shape = (shape['top'], shape['bottom'])
    if isinstance(shape[0], (list, tuple)):
        return f'top {grid_text(shape[0])} / bottom {grid_text(shape[1])}'
    return 'x'.join(str(int(size)) for size in shape)


def load_pair(vq_path, prior_path, vq_kind, prior_kind, device, class_label=None):
    """Load a VQ model and its prior, in eval mode on `device`; raise a one-line error if they do not fit together.

    Every check runs before the VQ file is hashed, so a bad run prints its error alone, without the hash warning.
    """
    vq_state = load_checkpoint(vq_path, kinds=(vq_kind,))
    prior_state = load_checkpoint(prior_path, kinds=(prior_kind,))
    missing = [entry for entry in PRIOR_ENTRIES if entry not in prior_state]
    if missing:
        raise CheckpointError(f'{prior_path} has no {", ".join(missing)} entry; it was not written by a '
                              f'train_pixelcnn_vqvae*.py script')
    vq_model = model_from_checkpoint(vq_state, device)
    prior = model_from_checkpoint(prior_state, device)

    if prior.num_embeddings != vq_model.num_embeddings:
        raise UserError(f'{prior_path} models {prior.num_embeddings} codes but {vq_path} has '
                        f'{vq_model.num_embeddings}; give the VQ checkpoint the prior was trained on')
    if grid_text(prior_state['code_shape']) != grid_text(vq_model.code_shape()):
        raise UserError(f'{prior_path} was trained on {grid_text(prior_state["code_shape"])} code grids but '
                        f'{vq_path} makes {grid_text(vq_model.code_shape())} grids; give the VQ checkpoint the '
                        f'prior was trained on')
    if prior.num_classes is None and class_label is not None:
        raise UserError(f'--class_label {class_label} was given but {prior_path} is an unconditional prior; '
                        f'drop --class_label')
    if prior.num_classes is not None and class_label is not None and not 0 <= class_label < prior.num_classes:
        raise UserError(f'--class_label must be in [0, {prior.num_classes}) for this prior, got {class_label}')

    recorded = prior_state['vq_checkpoint']
    if file_sha256(vq_path) != recorded.get('sha256'):
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


@torch.no_grad()
def generate(sample_batch, num_samples, batch_size, labels, seed, device):
    """Call sample_batch(batch_size, labels [B] or None, generator) -> ({name: codes [B, ...]}, images [B, C, S, S])
    batch by batch; return all the images (on the CPU, in [-1, 1]) and all the codes, {name: LongTensor [N, ...]},
    with 'class_labels' [N] added when there are labels.

    One generator seeded once drives every draw, so the same seed and batch size give the same codes.
    """
    generator = torch.Generator(device).manual_seed(seed)
    images, codes = [], {}
    with tqdm(total=num_samples, desc='sampling', unit='image', dynamic_ncols=True) as bar:
        for start in range(0, num_samples, batch_size):
            size = min(batch_size, num_samples - start)
            batch_labels = None if labels is None else labels[start:start + size].to(device)
            batch_codes, batch_images = sample_batch(size, batch_labels, generator)
            images.append(batch_images.float().cpu())
            for name, value in batch_codes.items():
                codes.setdefault(name, []).append(value.cpu())
            bar.update(size)
    codes = {name: torch.cat(values) for name, values in codes.items()}
    if labels is not None:
        codes['class_labels'] = labels
    return torch.cat(images), codes


def sampling_settings(args):
    """The flags that decide the samples (not where they go or how errors print), to store beside the codes."""
    return {name: value for name, value in vars(args).items() if name not in NOT_SETTINGS}


def save_outputs(out_dir, images, codes, save_individual, settings):
    """Write samples.png (a square-ish grid), codes.pt (codes + settings) and, if asked, one PNG per sample."""
    # Imported here, not at the top: torchvision takes seconds to load, which a run that stops at a bad flag or
    # checkpoint should not have to wait for.
    from torchvision.utils import save_image

    from .data import denormalize

    images = denormalize(images)  # [N, C, S, S] in [0, 1]
    save_image(images, os.path.join(out_dir, 'samples.png'), nrow=math.ceil(math.sqrt(len(images))))
    if save_individual:
        for index, image in enumerate(images):
            save_image(image, os.path.join(out_dir, f'sample_{index:04d}.png'))
    torch.save({**codes, 'settings': settings}, os.path.join(out_dir, 'codes.pt'))
