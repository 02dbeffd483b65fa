"""VQ-VAE (van den Oord et al. 2017): a convolutional encoder, a vector quantizer and a decoder.

Images are expected in [-1, 1]. With the defaults a 32x32 image becomes an 8x8 grid of codes (downsampling x4).
"""

import math

import torch.nn as nn
import torch.nn.functional as F

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
# Model

class VQVAE(nn.Module):
    """Single-level VQ-VAE: image [B, C, S, S] -> codes [B, S/d, S/d] -> reconstruction, with d = `downsample`."""

    kind = 'vq_vae'

    def __init__(self, in_channels=3, image_size=32, hidden_channels=128, num_res_blocks=2, res_channels=32,
                 num_embeddings=512, embedding_dim=64, downsample=4, commitment_cost=0.25, ema=True, decay=0.99,
                 dead_code_threshold=1.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, hidden_channels=hidden_channels,
                           num_res_blocks=num_res_blocks, res_channels=res_channels, num_embeddings=num_embeddings,
                           embedding_dim=embedding_dim, downsample=downsample, commitment_cost=commitment_cost,
                           ema=ema, decay=decay, dead_code_threshold=dead_code_threshold)
        self.num_embeddings = num_embeddings
        self.image_size = image_size
        self.downsample = downsample
        self.code_shape(image_size)  # fail early on a size the downsampling cannot take
        self.encoder = Encoder(in_channels, hidden_channels, num_res_blocks, res_channels, downsample)
        self.pre_quantize = nn.Conv2d(hidden_channels, embedding_dim, 1)
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost, ema, decay,
                                         dead_code_threshold=dead_code_threshold)
        self.decoder = Decoder(embedding_dim, in_channels, hidden_channels, num_res_blocks, res_channels, downsample)

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

    def forward(self, x):
        """Returns (reconstruction, dict with 'loss', 'recon_loss', 'vq_loss', 'perplexity', 'code_usage', ...)."""
        quantized, _, stats = self.encode(x)
        recon = self.decode(quantized)
        recon_loss = F.mse_loss(recon, x)
        return recon, {'loss': recon_loss + stats['vq_loss'], 'recon_loss': recon_loss, **stats}


# ----------------------------------------------------------------------------------------------------------------
# Presets

VQVAE_PRESETS = {
    'default': {},  # 32x32 RGB, 8x8 codes
    'small': dict(hidden_channels=64, res_channels=32, num_embeddings=256, embedding_dim=32),
    'large': dict(hidden_channels=256, num_res_blocks=4, res_channels=64),
}
