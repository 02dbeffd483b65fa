"""VQ-VAE-2 (Razavi et al. 2019): a bottom and a top level of codes.

The bottom encoder downsamples the image by `downsample` (default x4); the top encoder downsamples the bottom features
a further x2. The top codes are decoded back to the bottom resolution and concatenated with the bottom features before
the bottom quantizer, so the bottom codes only need to carry what the top ones miss. The image decoder sees both
levels. For 32x32 images the grids are 4x4 (top) and 8x8 (bottom); for 256x256 they are 32x32 and 64x64.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import VectorQuantizer
from .vq_vae import Decoder, Encoder


class VQVAE2(nn.Module):
    """Two-level VQ-VAE: image [B, C, S, S] -> (codes_top [B, S/2d, S/2d], codes_bottom [B, S/d, S/d])."""

    kind = 'vq_vae2'

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
        quantizer_args = dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                              commitment_cost=commitment_cost, ema=ema, decay=decay,
                              dead_code_threshold=dead_code_threshold)

        self.encoder_bottom = Encoder(in_channels, hidden_channels, num_res_blocks, res_channels, downsample)
        self.encoder_top = Encoder(hidden_channels, hidden_channels, num_res_blocks, res_channels, 2)
        self.pre_quantize_top = nn.Conv2d(hidden_channels, embedding_dim, 1)
        self.quantizer_top = VectorQuantizer(**quantizer_args)
        self.decoder_top = Decoder(embedding_dim, embedding_dim, hidden_channels, num_res_blocks, res_channels, 2)
        self.pre_quantize_bottom = nn.Conv2d(hidden_channels + embedding_dim, embedding_dim, 1)
        self.quantizer_bottom = VectorQuantizer(**quantizer_args)
        self.upsample_top = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1)
        self.decoder = Decoder(2 * embedding_dim, in_channels, hidden_channels, num_res_blocks, res_channels,
                               downsample)

    def code_shape(self, image_size=None):
        """((H_top, W_top), (H_bottom, W_bottom)) for square images of `image_size` (default: the built size)."""
        size = self.image_size if image_size is None else image_size
        if size % (2 * self.downsample) != 0:
            raise ValueError(f'image size {size} is not divisible by {2 * self.downsample} '
                             f'(the bottom downsampling {self.downsample} times the top level\'s 2)')
        bottom = size // self.downsample
        return (bottom // 2, bottom // 2), (bottom, bottom)

    def encode(self, x):
        """Image -> (quant_top [B,D,h/2,w/2], quant_bottom [B,D,h,w], codes_top, codes_bottom, stats dict)."""
        features_bottom = self.encoder_bottom(x)  # [B, hidden, h, w]
        features_top = self.encoder_top(features_bottom)  # [B, hidden, h/2, w/2]
        quant_top, codes_top, stats_top = self.quantizer_top(self.pre_quantize_top(features_top))
        decoded_top = self.decoder_top(quant_top)  # [B, D, h, w]
        quant_bottom, codes_bottom, stats_bottom = self.quantizer_bottom(
            self.pre_quantize_bottom(torch.cat([decoded_top, features_bottom], 1)))
        stats = {f'{name}_top': value for name, value in stats_top.items()}
        stats.update({f'{name}_bottom': value for name, value in stats_bottom.items()})
        return quant_top, quant_bottom, codes_top, codes_bottom, stats

    def decode(self, quant_top, quant_bottom):
        """Quantized features of both levels -> image [B, C, S, S]."""
        return self.decoder(torch.cat([self.upsample_top(quant_top), quant_bottom], 1))

    def decode_codes(self, codes_top, codes_bottom):
        """Code indices of both levels -> image [B, C, S, S]."""
        return self.decode(self.quantizer_top.lookup(codes_top), self.quantizer_bottom.lookup(codes_bottom))

    def get_code_indices(self, x):
        """Image -> (codes_top [B, h/2, w/2], codes_bottom [B, h, w]) as LongTensors."""
        _, _, codes_top, codes_bottom, _ = self.encode(x)
        return codes_top, codes_bottom

    def forward(self, x):
        """Returns (reconstruction, dict with 'loss', 'recon_loss', and per-level 'perplexity_top', ... stats)."""
        quant_top, quant_bottom, _, _, stats = self.encode(x)
        recon = self.decode(quant_top, quant_bottom)
        recon_loss = F.mse_loss(recon, x)
        vq_loss = stats['vq_loss_top'] + stats['vq_loss_bottom']
        return recon, {'loss': recon_loss + vq_loss, 'recon_loss': recon_loss, 'vq_loss': vq_loss, **stats}


VQVAE2_PRESETS = {
    'default': {},  # 32x32 RGB: 4x4 top and 8x8 bottom codes
    'small': dict(hidden_channels=64, res_channels=32, num_embeddings=256, embedding_dim=32),
    'large': dict(hidden_channels=256, num_res_blocks=4, res_channels=64),
}
