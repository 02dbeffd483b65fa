"""Models of this repo: VQ-VAE, VQ-VAE-2, and two prior families over their codes: gated PixelCNNs (masked
convolutions, gated blocks) and causal transformers, each flat or hierarchical.

Notebook use:
    from models import load_model
    vqvae2 = load_model('runs/vq_vae2/best.pth')
    prior = load_model('runs/prior_vqvae2/best.pth')
    images = prior.sample_with_vqvae2(vqvae2, batch_size=16)   # [16, C, S, S] in [-1, 1]
"""

import torch

from .checkpoint import CheckpointError, atomic_save, file_sha256, load_checkpoint, save_checkpoint
from .config import ConfigError
from .pixelcnn_prior import (PRIOR_PRESETS, GatedResBlock, HierarchicalPixelCNN, MaskedConv2d, PixelCNN,
                             sample_from_logits)
from .prior import CodePrior
from .quantizer import VectorQuantizer, code_statistics
from .transformer_prior import TRANSFORMER_PRESETS, HierarchicalTransformerPrior, TransformerPrior
from .vq_vae import VQ_PRESETS, VQVAE, VQConfig
from .vq_vae2 import VQVAE2

VQVAE_PRESETS = VQVAE2_PRESETS = VQ_PRESETS  # the two VQ models share their presets
MODELS = {cls.kind: cls for cls in (VQVAE, VQVAE2, PixelCNN, HierarchicalPixelCNN, TransformerPrior,
                                    HierarchicalTransformerPrior)}
VQ_KINDS = ('vq_vae', 'vq_vae2')
PRIOR_KINDS = tuple(kind for kind in MODELS if kind not in VQ_KINDS)


def build_model(kind, config):
    """The one builder: a model of `kind` (a key of MODELS) from its config dict; ConfigError if the config is bad."""
    if kind not in MODELS:
        raise ConfigError(f'unknown model kind {kind!r}; known kinds: {", ".join(MODELS)}')
    return MODELS[kind](**config)


def count_parameters(kind, config):
    """The number of parameters a model of `kind` would have, found without allocating its weights."""
    with torch.device('meta'):
        return sum(p.numel() for p in build_model(kind, config).parameters())


def model_from_checkpoint(state, device='cpu', path='the checkpoint'):
    """Rebuild the model stored in a loaded checkpoint dict, in eval mode on `device`; CheckpointError if it is bad."""
    try:
        model = build_model(state['kind'], state['config'])
    except ConfigError as e:
        raise CheckpointError(f"{path}: config: {e}") from e
    except ValueError as e:  # a config whose fields are valid one by one but not together (e.g. the image size)
        raise CheckpointError(f"{path}: config: {e}") from e
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as e:
        # torch's message starts with a generic line; the next one names the first key that does not fit.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: the weights do not fit a {state['kind']} built from the stored config: "
                              f"{lines[1] if len(lines) > 1 else lines[0]}") from e
    return model.to(device).eval()


def load_model(path, device='cpu', kinds=None):
    """Rebuild any model of this repo from its checkpoint file alone, in eval mode on `device`.

    `kinds` (a kind or a tuple of kinds) restricts which models are accepted.
    """
    return model_from_checkpoint(load_checkpoint(path, kinds), device, path)


__all__ = ['VQVAE', 'VQVAE2', 'VectorQuantizer', 'MaskedConv2d', 'GatedResBlock', 'PixelCNN', 'HierarchicalPixelCNN',
           'TransformerPrior', 'HierarchicalTransformerPrior', 'TRANSFORMER_PRESETS', 'CodePrior', 'VQConfig',
           'build_model', 'count_parameters', 'load_model', 'model_from_checkpoint', 'load_checkpoint',
           'save_checkpoint', 'file_sha256', 'atomic_save', 'sample_from_logits', 'code_statistics', 'CheckpointError',
           'ConfigError', 'MODELS', 'VQ_KINDS', 'PRIOR_KINDS', 'VQ_PRESETS', 'VQVAE_PRESETS', 'VQVAE2_PRESETS',
           'PRIOR_PRESETS']
