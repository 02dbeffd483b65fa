"""PixelCNN priors over VQ code grids: masked convolutions, gated blocks, a flat and a hierarchical prior.

Raster order: position (i, j) comes before (i', j') when i < i', or i == i' and j < j'. The logits at (i, j) may depend
only on codes strictly before (i, j), on the class label and on a spatial conditioning map (for the bottom level of
the hierarchical prior: a convolutional map of the top codes).

The network is a gated PixelCNN (van den Oord et al. 2016) with two stacks, which has no blind spot:
- the vertical stack's features at (i, j) see only rows < i, over a window that widens with depth, so positions
  above and to the right are covered;
- the horizontal stack's features at (i, j) see row i at columns < j, plus the vertical stack at (i, j).

Sampling is cached by default (Ramachandran et al. 2017): the vertical stack of row i is computed once, when row i
starts, and the horizontal stack one position at a time from buffers of earlier activations, so generating a whole
grid costs about one forward pass. `cached=False` runs the reference sampler: one full forward pass per position.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, ModelConfig, option
from .prior import CodePrior, check_sampling_args, class_tensor, sample_from_logits
from .vq_vae import ResBlock


# ----------------------------------------------------------------------------------------------------------------
# Masked and shifted convolutions

class MaskedConv2d(nn.Conv2d):
    """k x k conv that sees only positions before the centre in raster order (type 'A') or also the centre ('B').

    The mask multiplies the weight in every forward pass; the stored weight is never edited, so an optimizer step
    cannot unmask it.
    """

    def __init__(self, in_channels, out_channels, kernel_size, mask_type='A'):
        if mask_type not in ('A', 'B'):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}')
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.ones(kernel_size, kernel_size)
        mask[centre, centre + (mask_type == 'B'):] = 0  # the centre row: left of the centre (and the centre for B)
        mask[centre + 1:] = 0  # every row below the centre
        self.mask_type = mask_type
        self.register_buffer('mask', mask[None, None], persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class VerticalConv2d(nn.Conv2d):
    """Vertical-stack conv: output row i sees input rows i - k//2 .. i and columns j - k//2 .. j + k//2."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size))
        self.pad = kernel_size // 2

    def forward(self, x):
        return super().forward(F.pad(x, (self.pad, self.pad, self.pad, 0)))


class HorizontalConv2d(nn.Conv2d):
    """Horizontal-stack conv: output (i, j) sees input row i at columns j - k//2 .. j."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__(in_channels, out_channels, (1, kernel_size // 2 + 1))
        self.pad = kernel_size // 2

    def forward(self, x):
        return super().forward(F.pad(x, (self.pad, 0, 0, 0)))


def shift_down(x):
    """Move a feature map down one row (row 0 becomes zeros), so row i holds what row i - 1 computed."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def gate(x):
    """Gated activation tanh(a) * sigmoid(b) over the two channel halves of x."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


# ----------------------------------------------------------------------------------------------------------------
# Gated block

class GatedResBlock(nn.Module):
    """One gated PixelCNN layer over a vertical and a horizontal stack, with optional class and spatial conditioning.

    Type 'A' is the first layer, reading code embeddings: its vertical conv is shifted down a row, so it sees rows
    < i only, and its horizontal path is a type-A `MaskedConv2d`. Type 'B' layers read the stacks of the layer below;
    they may include the current row/column because those inputs already exclude position (i, j) itself.
    Conditioning (a class embedding and/or a 1x1 conv of a spatial map) is added inside both gates.
    """

    def __init__(self, in_channels, channels, kernel_size=3, mask_type='B', num_classes=None, cond_channels=None):
        super().__init__()
        self.mask_type = mask_type
        self.kernel_size = kernel_size
        self.v_conv = VerticalConv2d(in_channels, 2 * channels, kernel_size)
        if mask_type == 'A':
            self.h_conv = MaskedConv2d(in_channels, 2 * channels, kernel_size, 'A')
        else:
            self.h_conv = HorizontalConv2d(in_channels, 2 * channels, kernel_size)
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)  # vertical -> horizontal
        self.h_proj = nn.Conv2d(channels, channels, 1)
        self.residual = mask_type == 'B' and in_channels == channels
        # 4 * channels: a bias for each of the two gates' halves in both stacks.
        self.class_embedding = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        self.cond_proj = nn.Conv2d(cond_channels, 4 * channels, 1) if cond_channels else None

    def conditioning(self, cond=None, class_labels=None):
        """Conditioning bias [B, 4C, H or 1, W or 1] for (vertical, horizontal) pre-activations, or None."""
        bias = None
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError('this prior is class-conditional: pass class_labels')
            bias = self.class_embedding(class_labels)[:, :, None, None]
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError('this prior is conditioned on a spatial map: pass cond')
            projected = self.cond_proj(cond)
            bias = projected if bias is None else bias + projected
        return bias

    def forward(self, v, h, cond=None, class_labels=None):
        """(v, h) stacks [B, C_in, H, W] -> (v, h) [B, C, H, W]."""
        v_pre = self.v_conv(v)
        if self.mask_type == 'A':
            v_pre = shift_down(v_pre)
        bias = self.conditioning(cond, class_labels)
        if bias is not None:
            v_bias, h_bias = bias.chunk(2, dim=1)
            v_pre = v_pre + v_bias
        h_pre = self.h_conv(h) + self.link(v_pre)
        if bias is not None:
            h_pre = h_pre + h_bias
        h_out = self.h_proj(gate(h_pre))
        if self.residual:
            h_out = h + h_out
        return gate(v_pre), h_out

    # One-position steps for the cached sampler: the same arithmetic as forward, on one row or one position.
    def vertical_step(self, rows, bias=None):
        """Vertical pre-activation of one row, [B, 2C, W].

        `rows` [B, C_in, k//2 + 1, W + 2(k//2)] are the zero-padded input rows that the row sees: rows i - k//2 .. i
        of the layer below for type B, and i - 1 - k//2 .. i - 1 of the embeddings for type A (its shift down).
        `bias` is this row's conditioning, [B, 4C, W or 1].
        """
        v_pre = F.conv2d(rows, self.v_conv.weight, self.v_conv.bias)[:, :, 0]
        if bias is not None:
            v_pre = v_pre + bias[:, :bias.shape[1] // 2]
        return v_pre

    def step_weights(self):
        """The horizontal path as one matrix product: (weight [window + 2C, 2C], bias [2C], proj weight, proj bias).

        A step multiplies the flattened causal window of the layer below, concatenated with the vertical
        pre-activation at the position, by `weight`: the h_conv and the vertical-to-horizontal link in one product.
        Computed once per sampling call.
        """
        if self.mask_type == 'A':  # rows below the centre are masked to zero, so the window stops at the centre row
            h_weight = (self.h_conv.weight * self.h_conv.mask)[:, :, :self.kernel_size // 2 + 1]
        else:
            h_weight = self.h_conv.weight
        weight = torch.cat([h_weight.flatten(1), self.link.weight.flatten(1)], 1).t()
        return weight, self.h_conv.bias + self.link.bias, self.h_proj.weight.flatten(1).t(), self.h_proj.bias

    def horizontal_step(self, window, v_pre, h, weights, bias=None):
        """Horizontal output at one position, [B, C].

        `window` is what the position sees of the layer below: [B, C_in, k//2 + 1, k] embeddings (type A, zero
        where masked or padded) or [B, C_in, k//2 + 1] of the current row (type B, ending at the position itself).
        `v_pre` [B, 2C] is the vertical pre-activation there, `h` [B, C] the layer below's output there (for the
        residual), `weights` from step_weights(), `bias` [B, 4C] the conditioning there.
        """
        weight, h_bias, proj_weight, proj_bias = weights
        h_pre = torch.addmm(h_bias, torch.cat([window.flatten(1), v_pre], 1), weight)  # [B, 2C]
        if bias is not None:
            h_pre = h_pre + bias[:, bias.shape[1] // 2:]
        h_out = torch.addmm(proj_bias, gate(h_pre), proj_weight)
        return h + h_out if self.residual else h_out


class OutputHead(nn.Sequential):
    """ReLU -> 1x1 conv -> ReLU -> 1x1 conv to logits over the codebook; `step` does the same at one position."""

    def __init__(self, channels, num_embeddings):
        super().__init__(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                         nn.Conv2d(channels, num_embeddings, 1))

    def step(self, h):
        """Features [B, C] at one position -> logits [B, K]."""
        hidden = torch.relu(F.linear(torch.relu(h), self[1].weight.flatten(1), self[1].bias))
        return F.linear(hidden, self[3].weight.flatten(1), self[3].bias)


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class PixelCNNConfig(ModelConfig):
    """Hyperparameters of a (flat) gated PixelCNN prior."""

    num_embeddings: int = option(512, 'codebook size (taken from the VQ checkpoint)', low=2, high=32768)
    embedding_dim: int = option(64, 'size of the code embedding at the input', low=1, high=4096)
    hidden_channels: int = option(128, 'channels per gated layer', low=1, high=4096)
    num_layers: int = option(15, 'gated layers per level', low=1, high=256)
    num_classes: Optional[int] = option(None, 'classes of a class-conditional prior, else none', low=2,
                                        high=100000)
    cond_channels: Optional[int] = option(None, 'channels of a spatial conditioning map, else none', low=1,
                                          high=4096)
    kernel_size: int = option(3, 'kernel size of the gated layers after the first (odd)', low=1, high=31)
    first_kernel_size: int = option(7, 'kernel size of the first gated layer (odd)', low=1, high=31)

    def check(self):
        for name in ('kernel_size', 'first_kernel_size'):
            if getattr(self, name) % 2 != 1:
                raise ConfigError(f'{name} must be odd, got {getattr(self, name)}')


@dataclass
class HierarchicalPixelCNNConfig(PixelCNNConfig):
    """Hyperparameters of the two-level prior: a PixelCNN per level and the top-code conditioner."""

    conditioner_res_blocks: int = option(2, 'residual blocks of the top-code conditioner', low=0, high=64)


# ----------------------------------------------------------------------------------------------------------------
# Models

class PixelCNN(CodePrior):
    """Single-level prior: codes [B, H, W] -> embedding -> gated layers -> logits [B, num_embeddings, H, W]."""

    kind = 'pixelcnn'
    config_class = PixelCNNConfig
    levels = ('flat',)

    def __init__(self, **config):
        super().__init__(config)
        cfg = self.cfg
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim)
        block_args = dict(num_classes=cfg.num_classes, cond_channels=cfg.cond_channels)
        self.blocks = nn.ModuleList(
            [GatedResBlock(cfg.embedding_dim, cfg.hidden_channels, cfg.first_kernel_size, 'A', **block_args)]
            + [GatedResBlock(cfg.hidden_channels, cfg.hidden_channels, cfg.kernel_size, 'B', **block_args)
               for _ in range(cfg.num_layers - 1)])
        self.head = OutputHead(cfg.hidden_channels, cfg.num_embeddings)

    def forward(self, codes, cond=None, class_labels=None):
        """Codes [B, H, W] (+ cond [B, cond_channels, H, W], class_labels [B]) -> logits [B, K, H, W]."""
        x = self.embedding(codes).permute(0, 3, 1, 2)  # [B, E, H, W]
        v, h = x, x
        for block in self.blocks:
            v, h = block(v, h, cond, class_labels)
        return self.head(h)

    def loss(self, codes, cond=None, class_labels=None, reduction='mean'):
        """Cross-entropy of the codes under the prior, in nats (bits = nats / ln 2), averaged or summed."""
        return F.cross_entropy(self(codes, cond, class_labels), codes, reduction=reduction)

    def level_logits(self, codes, class_labels=None, levels=None):
        """{'flat': codes [B, H, W]} -> {'flat': logits [B, K, H, W]}."""
        return {'flat': self(codes['flat'], class_labels=class_labels)}

    @torch.no_grad()
    def sample(self, batch_size, shape, temperature=1.0, top_k=None, class_labels=None, cond=None, generator=None,
               cached=True, top_p=None, on_row=None):
        """Sample codes [B, H, W] in raster order; `cached=False` runs one full forward pass per position.

        `on_row()`, if given, is called after each finished row (for progress bars).
        """
        check_sampling_args(temperature, top_k, top_p)
        device = self.embedding.weight.device
        class_labels = class_tensor(class_labels, batch_size, device)
        codes = torch.zeros(batch_size, *shape, dtype=torch.long, device=device)
        draw = lambda logits: sample_from_logits(logits, temperature, top_k, generator, top_p)  # noqa: E731
        if cached:
            return self._sample_cached(codes, cond, class_labels, draw, on_row)
        for i in range(shape[0]):
            for j in range(shape[1]):
                codes[:, i, j] = draw(self(codes, cond, class_labels)[:, :, i, j])
            if on_row is not None:
                on_row()
        return codes

    def sample_levels(self, batch_size, shapes, temperature=1.0, top_k=None, top_p=None, class_labels=None,
                      generator=None, cached=True, on_row=None):
        """{'flat': codes [B, H, W]} on the grid shapes['flat']."""
        return {'flat': self.sample(batch_size, shapes['flat'], temperature, top_k, class_labels, generator=generator,
                                    cached=cached, top_p=top_p, on_row=on_row)}

    @torch.no_grad()
    def sample_with_vqvae(self, vqvae, batch_size, device=None, temperature=1.0, top_k=None, class_labels=None,
                          generator=None, cached=True, top_p=None):
        """Sample codes on the VQ-VAE's code grid and decode them: images [B, C, S, S] in [-1, 1]."""
        return self.sample_with_vq(vqvae, batch_size, device, temperature, top_k, top_p, class_labels, generator,
                                   cached)

    def _sample_cached(self, codes, cond, class_labels, draw, on_row=None):
        """Fill `codes` [B, H, W] position by position, computing each layer only where the new position needs it.

        Row i of the vertical stack depends on rows < i only, so it is computed once when row i starts; the
        horizontal stack is then stepped one position at a time, reading buffers of earlier activations.
        """
        batch, height, width = codes.shape
        first = self.blocks[0]
        dtype = self.embedding.weight.dtype
        p0 = first.kernel_size // 2
        p = self.blocks[1].kernel_size // 2 if len(self.blocks) > 1 else 0
        hidden = first.h_proj.out_channels

        # Zero padding in these buffers stands in for the convolutions' zero padding.
        x_buf = codes.new_zeros(batch, self.embedding.embedding_dim, height + p0, width + 2 * p0, dtype=dtype)
        v_bufs = [codes.new_zeros(batch, hidden, height + p, width + 2 * p, dtype=dtype) for _ in self.blocks]
        biases = [block.conditioning(cond, class_labels) for block in self.blocks]  # [B, 4C, H|1, W|1] or None
        weights = [block.step_weights() for block in self.blocks]

        def bias_at(index, i, j=None):  # conditioning of block `index` at row i (and column j), or None
            bias = biases[index]
            if bias is None:
                return None
            row = bias[:, :, min(i, bias.shape[2] - 1)]  # [B, 4C, W or 1]
            return row if j is None else row[:, :, min(j, row.shape[2] - 1)]

        for i in range(height):
            # Vertical stack for the whole of row i.
            v_rows = []
            for index, block in enumerate(self.blocks):
                if index == 0:
                    rows = x_buf[:, :, i - 1:i + p0] if i > 0 else None
                else:
                    rows = v_bufs[index - 1][:, :, i:i + p + 1]
                if rows is None:  # row 0 of the first layer sees nothing above it
                    v_pre = x_buf.new_zeros(batch, 2 * hidden, width)
                    if biases[0] is not None:
                        v_pre = v_pre + bias_at(0, i)[:, :2 * hidden]
                else:
                    v_pre = block.vertical_step(rows, bias_at(index, i))
                v_rows.append(v_pre)  # [B, 2C, W]
                v_bufs[index][:, :, i + p, p:p + width] = gate(v_pre)

            # Horizontal stack, one position at a time; it only ever needs row i of the layer below.
            h_rows = [x_buf.new_zeros(batch, hidden, width + p) for _ in self.blocks]
            for j in range(width):
                h = None
                for index, block in enumerate(self.blocks):
                    if index == 0:
                        window = x_buf[:, :, i:i + p0 + 1, j:j + 2 * p0 + 1]
                    else:
                        window = h_rows[index - 1][:, :, j:j + p + 1]
                    h = block.horizontal_step(window, v_rows[index][:, :, j], h, weights[index], bias_at(index, i, j))
                    h_rows[index][:, :, j + p] = h
                code = draw(self.head.step(h))
                codes[:, i, j] = code
                x_buf[:, :, i + p0, j + p0] = self.embedding(code)
            if on_row is not None:
                on_row()
        return codes


class TopConditioner(nn.Module):
    """Top codes -> embedding -> nearest upsampling to the bottom grid -> conv + residual blocks -> conditioning map."""

    def __init__(self, num_embeddings, embedding_dim, channels, num_res_blocks=2):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.net = nn.Sequential(nn.Conv2d(embedding_dim, channels, 3, padding=1),
                                 *[ResBlock(channels, max(1, channels // 2)) for _ in range(num_res_blocks)],
                                 nn.ReLU())

    def forward(self, codes_top, bottom_shape):
        """codes_top [B, h, w] -> cond [B, channels, H_bottom, W_bottom]."""
        x = self.embedding(codes_top).permute(0, 3, 1, 2)
        return self.net(F.interpolate(x, size=tuple(bottom_shape), mode='nearest'))


class HierarchicalPixelCNN(CodePrior):
    """Two-level prior for VQ-VAE-2: `prior_top` over the top codes, `prior_bottom` over the bottom codes given the top.

    The bottom prior sees the top codes through `conditioner` (convolutions over the top codes upsampled to the
    bottom grid), added in every gated block; both levels may be class-conditional.
    """

    kind = 'hierarchical_pixelcnn'
    config_class = HierarchicalPixelCNNConfig
    levels = ('top', 'bottom')

    def __init__(self, **config):
        super().__init__({**config, 'cond_channels': config.get('cond_channels') or config.get('hidden_channels')
                          or HierarchicalPixelCNNConfig.hidden_channels})
        cfg = self.cfg
        level_config = {name: value for name, value in self.config.items()
                        if name not in ('cond_channels', 'conditioner_res_blocks')}
        self.prior_top = PixelCNN(**level_config)
        self.prior_bottom = PixelCNN(cond_channels=cfg.cond_channels, **level_config)
        self.conditioner = TopConditioner(cfg.num_embeddings, cfg.embedding_dim, cfg.cond_channels,
                                          cfg.conditioner_res_blocks)

    def forward(self, codes_top, codes_bottom, class_labels=None, levels=('top', 'bottom')):
        """(codes_top [B, h, w], codes_bottom [B, H, W]) -> (logits_top [B, K, h, w], logits_bottom [B, K, H, W]).

        A level left out of `levels` is not computed and comes back as None.
        """
        logits_top = self.prior_top(codes_top, class_labels=class_labels) if 'top' in levels else None
        logits_bottom = None
        if 'bottom' in levels:
            cond = self.conditioner(codes_top, codes_bottom.shape[1:])
            logits_bottom = self.prior_bottom(codes_bottom, cond, class_labels)
        return logits_top, logits_bottom

    def level_logits(self, codes, class_labels=None, levels=None):
        """{'top': codes, 'bottom': codes} -> {level: logits [B, K, h, w]} for `levels` (default: both)."""
        levels = tuple(levels or self.levels)
        logits = self(codes['top'], codes.get('bottom'), class_labels, levels)
        return {level: value for level, value in zip(self.levels, logits) if level in levels}

    def loss(self, codes_top, codes_bottom, class_labels=None, levels=('top', 'bottom'), reduction='mean'):
        """Cross-entropy in nats for each requested level, as a dict {'top': ..., 'bottom': ...}."""
        return self.level_losses({'top': codes_top, 'bottom': codes_bottom}, class_labels, levels, reduction)

    @torch.no_grad()
    def sample(self, batch_size, top_shape, bottom_shape, temperature=1.0, top_k=None, class_labels=None,
               generator=None, cached=True, top_p=None, on_row=None):
        """Sample the top codes, then the bottom codes given them: (codes_top [B, h, w], codes_bottom [B, H, W])."""
        codes_top = self.prior_top.sample(batch_size, top_shape, temperature, top_k, class_labels,
                                          generator=generator, cached=cached, top_p=top_p, on_row=on_row)
        cond = self.conditioner(codes_top, bottom_shape)
        codes_bottom = self.prior_bottom.sample(batch_size, bottom_shape, temperature, top_k, class_labels, cond,
                                                generator=generator, cached=cached, top_p=top_p, on_row=on_row)
        return codes_top, codes_bottom

    def sample_levels(self, batch_size, shapes, temperature=1.0, top_k=None, top_p=None, class_labels=None,
                      generator=None, cached=True, on_row=None):
        """{'top': codes, 'bottom': codes} on the grids `shapes`."""
        codes = self.sample(batch_size, shapes['top'], shapes['bottom'], temperature, top_k, class_labels, generator,
                            cached, top_p, on_row)
        return dict(zip(self.levels, codes))

    @torch.no_grad()
    def sample_with_vqvae2(self, vqvae2, batch_size=64, device=None, temperature=1.0, top_k=None, class_labels=None,
                           generator=None, cached=True, top_p=None):
        """Sample both levels on the VQ-VAE-2's code grids and decode them: images [B, C, S, S] in [-1, 1]."""
        return self.sample_with_vq(vqvae2, batch_size, device, temperature, top_k, top_p, class_labels, generator,
                                   cached)


# ----------------------------------------------------------------------------------------------------------------
# Presets

PRIOR_PRESETS = {
    'default': {},  # 128 channels, 15 layers
    'small': dict(hidden_channels=64, num_layers=8),
    'large': dict(hidden_channels=256, num_layers=20),
}
