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
from .vq_vae import Decoder, Encoder, VQModel


class VQVAE2(VQModel):
    """Two-level VQ-VAE: image [B, C, S, S] -> (codes_top [B, S/2d, S/2d], codes_bottom [B, S/d, S/d])."""

    kind = 'vq_vae2'
    levels = ('top', 'bottom')

    def __init__(self, **config):
        super().__init__(config)
        cfg = self.cfg
        quantizer_args = dict(num_embeddings=cfg.num_embeddings, embedding_dim=cfg.embedding_dim,
                              commitment_cost=cfg.commitment_cost, ema=cfg.ema, decay=cfg.decay,
                              dead_code_threshold=cfg.dead_code_threshold)
        hidden, blocks, res, dim = cfg.hidden_channels, cfg.num_res_blocks, cfg.res_channels, cfg.embedding_dim

        self.encoder_bottom = Encoder(cfg.in_channels, hidden, blocks, res, cfg.downsample)
        self.encoder_top = Encoder(hidden, hidden, blocks, res, 2)
        self.pre_quantize_top = nn.Conv2d(hidden, dim, 1)
        self.quantizer_top = VectorQuantizer(**quantizer_args)
        self.decoder_top = Decoder(dim, dim, hidden, blocks, res, 2)
        self.pre_quantize_bottom = nn.Conv2d(hidden + dim, dim, 1)
        self.quantizer_bottom = VectorQuantizer(**quantizer_args)
        self.upsample_top = nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1)
        self.decoder = Decoder(2 * dim, cfg.in_channels, hidden, blocks, res, cfg.downsample)

    def code_shape(self, image_size=None):
        """((H_top, W_top), (H_bottom, W_bottom)) for square images of `image_size` (default: the built size)."""
        size = self.image_size if image_size is None else image_size
        if size % (2 * self.downsample) != 0:
            raise ValueError(f'image size {size} is not divisible by {2 * self.downsample} '
                             f'(the bottom downsampling {self.downsample} times the top level\'s 2)')
        bottom = size // self.downsample
        return (bottom // 2, bottom // 2), (bottom, bottom)

    def encode(self, x):
        """Image -> (quant_top [B,D,h/2,w/2], quant_bottom [B,D,h,w], codes_top, codes_bottom, {level: stats})."""
        features_bottom = self.encoder_bottom(x)  # [B, hidden, h, w]
        features_top = self.encoder_top(features_bottom)  # [B, hidden, h/2, w/2]
        quant_top, codes_top, stats_top = self.quantizer_top(self.pre_quantize_top(features_top))
        decoded_top = self.decoder_top(quant_top)  # [B, D, h, w]
        quant_bottom, codes_bottom, stats_bottom = self.quantizer_bottom(
            self.pre_quantize_bottom(torch.cat([decoded_top, features_bottom], 1)))
        return quant_top, quant_bottom, codes_top, codes_bottom, {'top': stats_top, 'bottom': stats_bottom}

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

    # The per-level interface (see models/prior.py): levels 'top' and 'bottom'.
    def level_codes(self, x):
        """Image -> {'top': codes [B, h/2, w/2], 'bottom': codes [B, h, w]}."""
        return dict(zip(self.levels, self.get_code_indices(x)))

    def level_shapes(self, image_size=None):
        """{'top': (h/2, w/2), 'bottom': (h, w)}."""
        return dict(zip(self.levels, self.code_shape(image_size)))

    def decode_level_codes(self, codes):
        """{'top': codes, 'bottom': codes} -> image [B, C, S, S]."""
        return self.decode_codes(codes['top'], codes['bottom'])

    def forward(self, x):
        """Returns (reconstruction, {'loss', 'recon_loss', 'vq_loss', 'levels': {'top': stats, 'bottom': stats}})."""
        quant_top, quant_bottom, _, _, stats = self.encode(x)
        recon = self.decode(quant_top, quant_bottom)
        recon_loss = F.mse_loss(recon, x)
        vq_loss = stats['top']['vq_loss'] + stats['bottom']['vq_loss']
        return recon, {'loss': recon_loss + vq_loss, 'recon_loss': recon_loss, 'vq_loss': vq_loss, 'levels': stats}
