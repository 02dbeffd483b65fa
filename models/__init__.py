"""Models of this repo: VQ-VAE, VQ-VAE-2, masked convolutions, gated blocks and the PixelCNN priors.

Notebook use:
    from models import load_model
    vqvae2 = load_model('runs/vq_vae2/best.pth')
    prior = load_model('runs/prior_vqvae2/best.pth')
    images = prior.sample_with_vqvae2(vqvae2, batch_size=16)   # [16, C, S, S] in [-1, 1]
"""

from .checkpoint import CheckpointError, atomic_save, file_sha256, load_checkpoint, save_checkpoint
from .pixelcnn_prior import (PRIOR_PRESETS, GatedResBlock, HierarchicalPixelCNN, MaskedConv2d, PixelCNN,
                             sample_from_logits)
from .quantizer import VectorQuantizer
from .vq_vae import VQVAE, VQVAE_PRESETS
from .vq_vae2 import VQVAE2, VQVAE2_PRESETS

MODELS = {cls.kind: cls for cls in (VQVAE, VQVAE2, PixelCNN, HierarchicalPixelCNN)}


def build_model(kind, config):
    """The one builder: a model of `kind` ('vq_vae', 'vq_vae2', 'pixelcnn', 'hierarchical_pixelcnn') from its config."""
    if kind not in MODELS:
        raise CheckpointError(f'unknown model kind {kind!r}; known kinds: {", ".join(MODELS)}')
    return MODELS[kind](**config)


def model_from_checkpoint(state, device='cpu'):
    """Rebuild the model stored in a loaded checkpoint dict, in eval mode on `device`."""
    model = build_model(state['kind'], state['config'])
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit a {state['kind']} built from the stored config: "
                              f"{str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def load_model(path, device='cpu', kinds=None):
    """Rebuild any model of this repo from its checkpoint file alone, in eval mode on `device`."""
    return model_from_checkpoint(load_checkpoint(path, kinds), device)


__all__ = ['VQVAE', 'VQVAE2', 'VectorQuantizer', 'MaskedConv2d', 'GatedResBlock', 'PixelCNN', 'HierarchicalPixelCNN',
           'build_model', 'load_model', 'model_from_checkpoint', 'load_checkpoint', 'save_checkpoint',
           'file_sha256', 'atomic_save', 'sample_from_logits', 'CheckpointError', 'MODELS', 'VQVAE_PRESETS', 'VQVAE2_PRESETS',
           'PRIOR_PRESETS']
