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

import torch
import torch.nn as nn
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------------------------------------------
# Sampling helpers

def sample_from_logits(logits, temperature=1.0, top_k=None, generator=None):
    """Draw one index per row of logits [B, K] by inverse-CDF sampling, using exactly one uniform number per row.

    Consuming a fixed amount of randomness is what lets the cached and the reference sampler draw identical codes
    from the same generator.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    cdf = logits.softmax(dim=1).cumsum(dim=1)
    uniform = torch.rand(logits.shape[0], 1, generator=generator,
                         device=generator.device if generator is not None else logits.device)
    # 1 - U lies in (0, 1], so a code of probability zero (outside the top k, or underflowed) is never picked.
    uniform = (1 - uniform.to(logits.device)) * cdf[:, -1:]
    return (cdf < uniform).sum(dim=1).clamp_(max=logits.shape[1] - 1)


def check_sampling_args(temperature, top_k):
    """Raise ValueError for temperature <= 0 or top_k < 1."""
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    if top_k is not None and top_k < 1:
        raise ValueError(f'top_k must be >= 1, got {top_k}')


def _class_tensor(class_labels, batch_size, device):
    """Class labels as a LongTensor [B] (an int is repeated), or None."""
    if class_labels is None:
        return None
    if isinstance(class_labels, int):
        return torch.full((batch_size,), class_labels, dtype=torch.long, device=device)
    return torch.as_tensor(class_labels, dtype=torch.long, device=device).expand(batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Models

class PixelCNN(nn.Module):
    """Single-level prior: codes [B, H, W] -> embedding -> gated layers -> logits [B, num_embeddings, H, W]."""

    kind = 'pixelcnn'

    def __init__(self, num_embeddings=512, embedding_dim=64, hidden_channels=128, num_layers=15, num_classes=None,
                 cond_channels=None, kernel_size=3, first_kernel_size=7):
        super().__init__()
        self.config = dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                           hidden_channels=hidden_channels, num_layers=num_layers, num_classes=num_classes,
                           cond_channels=cond_channels, kernel_size=kernel_size, first_kernel_size=first_kernel_size)
        self.num_embeddings = num_embeddings
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        block_args = dict(num_classes=num_classes, cond_channels=cond_channels)
        self.blocks = nn.ModuleList(
            [GatedResBlock(embedding_dim, hidden_channels, first_kernel_size, 'A', **block_args)]
            + [GatedResBlock(hidden_channels, hidden_channels, kernel_size, 'B', **block_args)
               for _ in range(num_layers - 1)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden_channels, hidden_channels, 1), nn.ReLU(),
                                  nn.Conv2d(hidden_channels, num_embeddings, 1))

    def forward(self, codes, cond=None, class_labels=None):
        """Codes [B, H, W] (+ cond [B, cond_channels, H, W], class_labels [B]) -> logits [B, K, H, W]."""
        x = self.embedding(codes).permute(0, 3, 1, 2)  # [B, E, H, W]
        v, h = x, x
        for block in self.blocks:
            v, h = block(v, h, cond, class_labels)
        return self.head(h)

    def loss(self, codes, cond=None, class_labels=None):
        """Mean cross-entropy of the codes under the prior, in nats per code (bits per code = nats / ln 2)."""
        return F.cross_entropy(self(codes, cond, class_labels), codes)

    @torch.no_grad()
    def sample(self, batch_size, shape, temperature=1.0, top_k=None, class_labels=None, cond=None, generator=None,
               cached=True):
        """Sample codes [B, H, W] in raster order; `cached=False` runs one full forward pass per position."""
        check_sampling_args(temperature, top_k)
        device = self.embedding.weight.device
        class_labels = _class_tensor(class_labels, batch_size, device)
        codes = torch.zeros(batch_size, *shape, dtype=torch.long, device=device)
        if cached:
            return self._sample_cached(codes, cond, class_labels, temperature, top_k, generator)
        for i in range(shape[0]):
            for j in range(shape[1]):
                logits = self(codes, cond, class_labels)[:, :, i, j]
                codes[:, i, j] = sample_from_logits(logits, temperature, top_k, generator)
        return codes

    @torch.no_grad()
    def sample_with_vqvae(self, vqvae, batch_size, device=None, temperature=1.0, top_k=None, class_labels=None,
                          generator=None, cached=True):
        """Sample codes on the VQ-VAE's code grid and decode them: images [B, C, S, S] in [-1, 1]."""
        if vqvae.num_embeddings != self.num_embeddings:
            raise ValueError(f'the prior has {self.num_embeddings} codes but the VQ-VAE has {vqvae.num_embeddings}')
        device = device or self.embedding.weight.device
        self.to(device).eval()
        vqvae.to(device).eval()
        codes = self.sample(batch_size, vqvae.code_shape(), temperature, top_k, class_labels,
                            generator=generator, cached=cached)
        return vqvae.decode_codes(codes)

    def _sample_cached(self, codes, cond, class_labels, temperature, top_k, generator):
        """Fill `codes` [B, H, W] position by position, computing each layer only where the new position needs it."""
        batch, height, width = codes.shape
        first, blocks = self.blocks[0], self.blocks[1:]
        dtype = self.embedding.weight.dtype
        p0 = first.kernel_size // 2
        p = blocks[0].kernel_size // 2 if len(blocks) else 0
        hidden = first.h_proj.out_channels

        # Zero padding in these buffers stands in for the convolutions' zero padding.
        x_buf = codes.new_zeros(batch, self.embedding.embedding_dim, height + p0, width + 2 * p0, dtype=dtype)
        v_bufs = [codes.new_zeros(batch, hidden, height + p, width + 2 * p, dtype=dtype) for _ in self.blocks]
        biases = [block.conditioning(cond, class_labels) for block in self.blocks]  # [B, 4C, H|1, W|1] or None

        # Each horizontal step is one matrix product over [flattened causal window, vertical pre-activation].
        first_w = (first.h_conv.weight * first.h_conv.mask)[:, :, :p0 + 1]  # rows below the centre are all zero
        weights = [torch.cat([first_w.flatten(1), first.link.weight.flatten(1)], 1).t()]
        weights += [torch.cat([b.h_conv.weight.flatten(1), b.link.weight.flatten(1)], 1).t() for b in blocks]
        h_biases = [block.h_conv.bias + block.link.bias for block in self.blocks]
        proj = [(block.h_proj.weight.flatten(1).t(), block.h_proj.bias) for block in self.blocks]
        head1, head2 = self.head[1], self.head[3]

        for i in range(height):
            # Vertical stack for the whole of row i: it depends on rows < i only, which are all known now.
            v_rows = []
            for index, block in enumerate(self.blocks):
                if index == 0:
                    v_pre = (F.conv2d(x_buf[:, :, i - 1:i + p0], block.v_conv.weight, block.v_conv.bias)
                             if i > 0 else x_buf.new_zeros(batch, 2 * hidden, 1, width))
                else:
                    v_pre = F.conv2d(v_bufs[index - 1][:, :, i:i + p + 1], block.v_conv.weight, block.v_conv.bias)
                v_pre = v_pre[:, :, 0]  # [B, 2C, W]
                bias = biases[index]
                if bias is not None:
                    v_pre = v_pre + bias[:, :2 * hidden, min(i, bias.shape[2] - 1)]
                v_rows.append(v_pre)
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
                    inputs = torch.cat([window.flatten(1), v_rows[index][:, :, j]], 1)
                    h_pre = torch.addmm(h_biases[index], inputs, weights[index])  # [B, 2C]
                    bias = biases[index]
                    if bias is not None:
                        h_pre = h_pre + bias[:, 2 * hidden:, min(i, bias.shape[2] - 1), min(j, bias.shape[3] - 1)]
                    h_new = torch.addmm(proj[index][1], gate(h_pre), proj[index][0])
                    if block.residual:
                        h_new = h_new + h
                    h_rows[index][:, :, j + p] = h_new
                    h = h_new
                hidden_out = torch.relu(F.linear(torch.relu(h), head1.weight.flatten(1), head1.bias))
                logits = F.linear(hidden_out, head2.weight.flatten(1), head2.bias)
                code = sample_from_logits(logits, temperature, top_k, generator)
                codes[:, i, j] = code
                x_buf[:, :, i + p0, j + p0] = self.embedding(code)
        return codes


class TopConditioner(nn.Module):
    """Top codes -> embedding -> nearest upsampling to the bottom grid -> conv + residual blocks -> conditioning map."""

    def __init__(self, num_embeddings, embedding_dim, channels, num_res_blocks=2):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.net = nn.Sequential(nn.Conv2d(embedding_dim, channels, 3, padding=1),
                                 *[ResBlock(channels, channels // 2) for _ in range(num_res_blocks)],
                                 nn.ReLU())

    def forward(self, codes_top, bottom_shape):
        """codes_top [B, h, w] -> cond [B, channels, H_bottom, W_bottom]."""
        x = self.embedding(codes_top).permute(0, 3, 1, 2)
        return self.net(F.interpolate(x, size=tuple(bottom_shape), mode='nearest'))


class HierarchicalPixelCNN(nn.Module):
    """Two-level prior for VQ-VAE-2: `prior_top` over the top codes, `prior_bottom` over the bottom codes given the top.

    The bottom prior sees the top codes through `conditioner` (convolutions over the top codes upsampled to the
    bottom grid), added in every gated block; both levels may be class-conditional.
    """

    kind = 'hierarchical_pixelcnn'

    def __init__(self, num_embeddings=512, embedding_dim=64, hidden_channels=128, num_layers=15, num_classes=None,
                 cond_channels=None, kernel_size=3, first_kernel_size=7, conditioner_res_blocks=2):
        super().__init__()
        cond_channels = cond_channels or hidden_channels
        self.config = dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                           hidden_channels=hidden_channels, num_layers=num_layers, num_classes=num_classes,
                           cond_channels=cond_channels, kernel_size=kernel_size, first_kernel_size=first_kernel_size,
                           conditioner_res_blocks=conditioner_res_blocks)
        self.num_embeddings = num_embeddings
        self.num_classes = num_classes
        level_args = dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim, hidden_channels=hidden_channels,
                          num_layers=num_layers, num_classes=num_classes, kernel_size=kernel_size,
                          first_kernel_size=first_kernel_size)
        self.prior_top = PixelCNN(**level_args)
        self.prior_bottom = PixelCNN(cond_channels=cond_channels, **level_args)
        self.conditioner = TopConditioner(num_embeddings, embedding_dim, cond_channels, conditioner_res_blocks)

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

    def loss(self, codes_top, codes_bottom, class_labels=None, levels=('top', 'bottom')):
        """Mean cross-entropy in nats per code for each requested level, as a dict {'top': ..., 'bottom': ...}."""
        logits = dict(zip(('top', 'bottom'), self(codes_top, codes_bottom, class_labels, levels)))
        codes = {'top': codes_top, 'bottom': codes_bottom}
        return {level: F.cross_entropy(logits[level], codes[level]) for level in levels}

    @torch.no_grad()
    def sample(self, batch_size, top_shape, bottom_shape, temperature=1.0, top_k=None, class_labels=None,
               generator=None, cached=True):
        """Sample the top codes, then the bottom codes given them: (codes_top [B, h, w], codes_bottom [B, H, W])."""
        codes_top = self.prior_top.sample(batch_size, top_shape, temperature, top_k, class_labels,
                                          generator=generator, cached=cached)
        cond = self.conditioner(codes_top, bottom_shape)
        codes_bottom = self.prior_bottom.sample(batch_size, bottom_shape, temperature, top_k, class_labels, cond,
                                                generator=generator, cached=cached)
        return codes_top, codes_bottom

    @torch.no_grad()
    def sample_with_vqvae2(self, vqvae2, batch_size=64, device=None, temperature=1.0, top_k=None, class_labels=None,
                           generator=None, cached=True):
        """Sample both levels on the VQ-VAE-2's code grids and decode them: images [B, C, S, S] in [-1, 1]."""
        if vqvae2.num_embeddings != self.num_embeddings:
            raise ValueError(f'the prior has {self.num_embeddings} codes but the VQ-VAE-2 has '
                             f'{vqvae2.num_embeddings}')
        device = device or self.prior_top.embedding.weight.device
        self.to(device).eval()
        vqvae2.to(device).eval()
        top_shape, bottom_shape = vqvae2.code_shape()
        codes_top, codes_bottom = self.sample(batch_size, top_shape, bottom_shape, temperature, top_k, class_labels,
                                              generator, cached)
        return vqvae2.decode_codes(codes_top, codes_bottom)


# ----------------------------------------------------------------------------------------------------------------
# Presets

PRIOR_PRESETS = {
    'default': {},  # 128 channels, 15 layers
    'small': dict(hidden_channels=64, num_layers=8),
    'large': dict(hidden_channels=256, num_layers=20),
}
