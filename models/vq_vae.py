"""VQ-VAE (van den Oord et al. 2017): a convolutional encoder, a vector quantizer and a decoder.

Images are expected in [-1, 1]. With the defaults a 32x32 image becomes an 8x8 grid of codes (downsampling x4).
"""

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, option
from .quantizer import VectorQuantizer


# ----------------------------------------------------------------------------------------------------------------
# Building blocks

class ResBlock(nn.Module):
    """ReLU -> 3x3 conv (res_channels) -> ReLU -> 1x1 conv back to `channels`, added to the input."""

    def __init__(self, channels, res_channels):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


def check_downsample(downsample):
    """Return log2(downsample), or raise ValueError if it is not a power of two >= 2."""
    steps = int(round(math.log2(downsample))) if downsample >= 2 else 0
    if steps < 1 or 2 ** steps != downsample:
        raise ValueError(f'downsample must be a power of two >= 2, got {downsample}')
    return steps


class Encoder(nn.Module):
    """Strided 4x4 convs (each halves H and W) to `downsample`x smaller maps, a 3x3 conv, then residual blocks."""

    def __init__(self, in_channels, hidden_channels, num_res_blocks, res_channels, downsample):
        super().__init__()
        layers = []
        channels = in_channels
        for i in range(check_downsample(downsample)):
            out = hidden_channels // 2 if i == 0 and downsample > 2 else hidden_channels
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, hidden_channels, 3, padding=1))
        layers += [ResBlock(hidden_channels, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)  # [B, hidden, H/downsample, W/downsample]


class Decoder(nn.Module):
    """A 3x3 conv, residual blocks, then transposed 4x4 convs that upsample by `upsample`."""

    def __init__(self, in_channels, out_channels, hidden_channels, num_res_blocks, res_channels, upsample):
        super().__init__()
        layers = [nn.Conv2d(in_channels, hidden_channels, 3, padding=1)]
        layers += [ResBlock(hidden_channels, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        steps = check_downsample(upsample)
        channels = hidden_channels
        for i in range(steps):
            last = i == steps - 1
            out = out_channels if last else hidden_channels // 2
            layers.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            channels = out
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------------
# Config (shared by VQ-VAE and VQ-VAE-2)

@dataclass
class VQConfig(ModelConfig):
    """Hyperparameters of a VQ-VAE or VQ-VAE-2; the one place where their defaults, ranges and help live."""

    in_channels: int = option(3, 'image channels (set from the dataset)', low=1, high=64)
    image_size: int = option(32, 'square image size (set from the dataset)', low=2, high=4096)
    hidden_channels: int = option(128, 'channels of the encoder and decoder', low=2, high=4096)
    num_res_blocks: int = option(2, 'residual blocks in the encoder and in the decoder', low=0, high=64)
    res_channels: int = option(32, 'channels inside each residual block', low=1, high=4096)
    num_embeddings: int = option(512, 'codes in each codebook', low=2, high=32768)  # the code cache stores int16
    embedding_dim: int = option(64, 'size of each code vector', low=1, high=4096)
    downsample: int = option(4, 'bottom-level downsampling factor', choices=(2, 4, 8))
    commitment_cost: float = option(0.25, 'weight of the commitment loss (beta)', low=0.0, high=100.0)
    ema: bool = option(True, 'learn the codebook by EMA updates (else by a codebook loss)')
    decay: float = option(0.99, 'EMA decay of the codebook statistics', low=0.0, below=1.0)
    dead_code_threshold: float = option(1.0, 'restart codes whose EMA cluster size falls below this; 0 disables',
                                        low=0.0, high=1e6)


# ----------------------------------------------------------------------------------------------------------------
# Model

class VQModel(nn.Module):
    """What VQ-VAE and VQ-VAE-2 share: the checked config and the sizes read from it."""

    config_class = VQConfig

    def __init__(self, config):
        super().__init__()
        self.cfg = self.config_class.from_dict(config)
        self.config = self.cfg.to_dict()
        self.num_embeddings = self.cfg.num_embeddings
        self.image_size = self.cfg.image_size
        self.downsample = self.cfg.downsample
        self.code_shape(self.cfg.image_size)  # fail early on a size the downsampling cannot take


class VQVAE(VQModel):
    """Single-level VQ-VAE: image [B, C, S, S] -> codes [B, S/d, S/d] -> reconstruction, with d = `downsample`."""

    kind = 'vq_vae'
    levels = ('flat',)

    def __init__(self, **config):
        super().__init__(config)
        cfg = self.cfg
        self.encoder = Encoder(cfg.in_channels, cfg.hidden_channels, cfg.num_res_blocks, cfg.res_channels,
                               cfg.downsample)
        self.pre_quantize = nn.Conv2d(cfg.hidden_channels, cfg.embedding_dim, 1)
        self.quantizer = VectorQuantizer(cfg.num_embeddings, cfg.embedding_dim, cfg.commitment_cost, cfg.ema,
                                         cfg.decay, dead_code_threshold=cfg.dead_code_threshold)
        self.decoder = Decoder(cfg.embedding_dim, cfg.in_channels, cfg.hidden_channels, cfg.num_res_blocks,
                               cfg.res_channels, cfg.downsample)

    def code_shape(self, image_size=None):
        """The (H, W) code grid for square images of `image_size` (default: the size the model was built for)."""
        size = self.image_size if image_size is None else image_size
        if size % self.downsample != 0:
            raise ValueError(f'image size {size} is not divisible by the downsampling factor {self.downsample}')
        return (size // self.downsample, size // self.downsample)

    def encode(self, x):
        """Image [B, C, S, S] -> (quantized features [B, D, h, w], codes [B, h, w], quantizer stats)."""
        return self.quantizer(self.pre_quantize(self.encoder(x)))

    def decode(self, quantized):
        """Quantized features [B, D, h, w] -> image [B, C, S, S]."""
        return self.decoder(quantized)

    def decode_codes(self, codes):
        """Code indices [B, h, w] -> image [B, C, S, S]."""
        return self.decode(self.quantizer.lookup(codes))

    def get_code_indices(self, x):
        """Image [B, C, S, S] -> LongTensor of code indices [B, h, w]."""
        return self.encode(x)[1]

    # The per-level interface (see models/prior.py): one level, 'flat'.
    def level_codes(self, x):
        """Image [B, C, S, S] -> {'flat': codes [B, h, w]}."""
        return {'flat': self.get_code_indices(x)}

    def level_shapes(self, image_size=None):
        """{'flat': (h, w)}."""
        return {'flat': self.code_shape(image_size)}

    def decode_level_codes(self, codes):
        """{'flat': codes [B, h, w]} -> image [B, C, S, S]."""
        return self.decode_codes(codes['flat'])

    def forward(self, x):
        """Returns (reconstruction, {'loss', 'recon_loss', 'vq_loss', 'levels': {'flat': quantizer stats}})."""
        quantized, _, stats = self.encode(x)
        recon = self.decode(quantized)
        recon_loss = F.mse_loss(recon, x)
        return recon, {'loss': recon_loss + stats['vq_loss'], 'recon_loss': recon_loss, 'vq_loss': stats['vq_loss'],
                       'levels': {'flat': stats}}


# ----------------------------------------------------------------------------------------------------------------
# Presets (VQ-VAE and VQ-VAE-2 share them)

VQ_PRESETS = {
    'default': {},  # 32x32 RGB: 8x8 codes (VQ-VAE), 4x4 top + 8x8 bottom (VQ-VAE-2)
    'small': dict(hidden_channels=64, res_channels=32, num_embeddings=256, embedding_dim=32),
    'large': dict(hidden_channels=256, num_res_blocks=4, res_channels=64),
}
