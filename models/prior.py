"""What every prior over VQ codes shares: the per-level interface, drawing a code from logits, and decoding samples.

A VQ model's codes come in levels: one grid, named 'flat', for a VQ-VAE; 'top' and 'bottom' for a VQ-VAE-2. Every
VQ model and every prior speaks of them the same way, as dicts keyed by level name, in sampling order:

    vq_model.levels                    ('flat',) or ('top', 'bottom')
    vq_model.level_codes(images)       {level: codes [B, h, w]}
    vq_model.level_shapes()            {level: (h, w)}
    vq_model.decode_level_codes(codes) images [B, C, S, S]

    prior.levels                       the same names as its VQ model's
    prior.level_logits(codes, class_labels, levels)    {level: logits [B, K, h, w]} for the asked levels
    prior.level_losses(codes, class_labels, levels, reduction)   {level: cross-entropy in nats}
    prior.sample_levels(batch_size, shapes, ...)       {level: codes [B, h, w]} (on_row: a progress hook)
    prior.sample_with_vq(vq_model, batch_size, ...)    decoded images [B, C, S, S] in [-1, 1]

A prior family implements `level_logits` and `sample_levels`; `CodePrior` derives the rest from them.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Drawing codes

def check_sampling_args(temperature, top_k=None, top_p=None):
    """Raise ValueError for a temperature <= 0, top_k < 1 or top_p outside (0, 1]."""
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    if top_k is not None and top_k < 1:
        raise ValueError(f'top_k must be >= 1, got {top_k}')
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f'top_p must be in (0, 1], got {top_p}')


def sample_from_logits(logits, temperature=1.0, top_k=None, generator=None, top_p=None):
    """Draw one index per row of logits [B, K] by inverse-CDF sampling, using exactly one uniform number per row.

    Consuming a fixed amount of randomness is what lets the cached and the reference samplers draw identical codes
    from the same generator. `generator` is one torch.Generator, or a list of one per row: then each row's draws
    depend on its own generator only, whatever else is in the batch. `top_k` keeps the k most likely codes; `top_p`
    (nucleus sampling) keeps the smallest set of most likely codes whose probability reaches p. A temperature near
    zero picks the most likely code.
    """
    logits = logits.float()
    # Subtracting the row maximum first keeps the best code at 0 whatever the temperature, so a tiny temperature
    # sends every other code to -inf (argmax) instead of overflowing into NaN.
    logits = (logits - logits.max(dim=1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=1)
        # A code is dropped when the codes more likely than it already reach p; the most likely one always stays.
        drop_sorted = sorted_probs.cumsum(dim=1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float('-inf'))
    cdf = logits.softmax(dim=1).cumsum(dim=1)
    if isinstance(generator, (list, tuple)):
        uniform = torch.cat([torch.rand(1, 1, generator=g, device=g.device).to(logits.device) for g in generator])
    else:
        uniform = torch.rand(logits.shape[0], 1, generator=generator,
                             device=generator.device if generator is not None else logits.device)
    # 1 - U lies in (0, 1], so a code of probability zero (outside the top k or p, or underflowed) is never picked.
    uniform = (1 - uniform.to(logits.device)) * cdf[:, -1:]
    return (cdf < uniform).sum(dim=1).clamp_(max=logits.shape[1] - 1)


def code_cross_entropy(logits, codes, reduction='mean'):
    """Cross-entropy in nats of codes [B, h, w] under logits [B, K, h, w], mean or summed over the codes.

    Logits whose classes lie innermost in memory (a transformer's [B, h*w, K] output seen as [B, K, h, w]) are read
    as the [B*h*w, K] matrix they are: cross-entropy over dim 1 of the strided view took about 4x as long on a CPU.
    """
    if logits.stride(1) == 1:
        logits, codes = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), codes.reshape(-1)
    return F.cross_entropy(logits, codes, reduction=reduction)


def class_tensor(class_labels, batch_size, device):
    """Class labels as a LongTensor [B] (an int is repeated), or None."""
    if class_labels is None:
        return None
    if isinstance(class_labels, int):
        return torch.full((batch_size,), class_labels, dtype=torch.long, device=device)
    return torch.as_tensor(class_labels, dtype=torch.long, device=device).expand(batch_size)


# ----------------------------------------------------------------------------------------------------------------
# The prior interface

class CodePrior(nn.Module):
    """Base of every prior family: per-level losses and decoding, derived from `level_logits` and `sample_levels`."""

    levels = ()  # level names in sampling order; set by each family
    config_class = None  # the family's config dataclass (models/config.py)

    def __init__(self, config):
        """Check `config` with the family's config class; keep it as a dict, and the sizes every prior has."""
        super().__init__()
        self.cfg = self.config_class.from_dict(config)
        self.config = self.cfg.to_dict()
        self.num_embeddings = self.cfg.num_embeddings  # codebook size
        self.num_classes = self.cfg.num_classes  # classes of a class-conditional prior, else None

    def level_logits(self, codes, class_labels=None, levels=None):
        """{level: codes [B, h, w]} -> {level: logits [B, K, h, w]} for `levels` (default: all)."""
        raise NotImplementedError

    def sample_levels(self, batch_size, shapes, temperature=1.0, top_k=None, top_p=None, class_labels=None,
                      generator=None, cached=True, on_row=None):
        """Sample every level in order on the grids `shapes` {level: (h, w)}: {level: codes [B, h, w]}.

        `on_row()`, if given, is called after each finished row of each level (for progress bars).
        """
        raise NotImplementedError

    @property
    def device(self):
        """The device the prior's weights are on."""
        return next(self.parameters()).device

    def level_losses(self, codes, class_labels=None, levels=None, reduction='mean'):
        """Cross-entropy of the codes under the prior in nats, {level: mean or summed over the level's codes}."""
        logits = self.level_logits(codes, class_labels, levels)
        return {level: code_cross_entropy(value, codes[level], reduction) for level, value in logits.items()}

    def check_vq_model(self, vq_model):
        """Raise ValueError unless `vq_model` has this prior's levels and codebook size."""
        if tuple(vq_model.levels) != tuple(self.levels):
            raise ValueError(f'the prior models the levels {self.levels} but the {vq_model.kind} has '
                             f'{tuple(vq_model.levels)}')
        if vq_model.num_embeddings != self.num_embeddings:
            raise ValueError(f'the prior has {self.num_embeddings} codes but the {vq_model.kind} has '
                             f'{vq_model.num_embeddings}')

    @torch.no_grad()
    def sample_with_vq(self, vq_model, batch_size, device=None, temperature=1.0, top_k=None, top_p=None,
                       class_labels=None, generator=None, cached=True):
        """Sample codes on the VQ model's grids and decode them: images [B, C, S, S] in [-1, 1]."""
        self.check_vq_model(vq_model)
        device = device or self.device
        self.to(device).eval()
        vq_model.to(device).eval()
        codes = self.sample_levels(batch_size, vq_model.level_shapes(), temperature, top_k, top_p, class_labels,
                                   generator, cached)
        return vq_model.decode_level_codes(codes)
