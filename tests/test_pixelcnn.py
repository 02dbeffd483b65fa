"""Behaviour of the PixelCNN priors: masks, causality over every position, no blind spot, cached sampling equal to the
reference sampler, sampling distributions (temperature, top-k, top-p), the per-level interface of models/prior.py,
losses, decoding through a VQ-VAE, configs and checkpoint round trips."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.pixelcnn_prior as pixelcnn_prior
from models import (PRIOR_PRESETS, VQVAE, VQVAE2, CodePrior, ConfigError, HierarchicalPixelCNN, MaskedConv2d, PixelCNN,
                    build_model, count_parameters, load_model, sample_from_logits, save_checkpoint)

K = 16  # codes in the tiny priors
TINY = dict(num_embeddings=K, embedding_dim=8, hidden_channels=16, num_layers=4)
VQ_TINY = dict(hidden_channels=16, res_channels=8, num_res_blocks=1, embedding_dim=8)  # VQ models to decode samples


def tiny_prior(cls=PixelCNN, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(**{**TINY, **overrides}).eval()


def random_codes(batch, height, width, seed=1):
    return torch.randint(0, K, (batch, height, width), generator=torch.Generator().manual_seed(seed))


def raster_mask(height, width, p):
    """Bool [H, W]: True at positions >= p (a raster index)."""
    return (torch.arange(height * width) >= p).view(height, width)


def perturbed(codes, where, seed=2):
    """`codes` [H, W] with every position in `where` [H, W] replaced by a different random code."""
    shift = torch.randint(1, K, codes.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(where, (codes + shift) % K, codes)


# -----------------------------------------------------------------------------
# Masked convolution

def visible_offsets(kernel_size, mask_type):
    """The (row, column) kernel offsets a masked conv may see, written out from the raster-order rule."""
    c = kernel_size // 2
    return {(r, s) for r in range(kernel_size) for s in range(kernel_size)
            if r < c or (r == c and (s < c or (mask_type == 'B' and s == c)))}


def input_gradient_pattern(conv, size=7):
    """Which input positions [size, size] the output at the centre has a non-zero gradient with respect to."""
    x = torch.randn(1, conv.in_channels, size, size, requires_grad=True)
    conv(x)[:, :, size // 2, size // 2].sum().backward()
    return x.grad.abs().sum(1)[0] > 0


@pytest.mark.parametrize('mask_type', ['A', 'B'])
@pytest.mark.parametrize('kernel_size', [3, 5])
def test_masked_conv_sees_only_earlier_positions(mask_type, kernel_size):
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 4, kernel_size, mask_type)
    visible = visible_offsets(kernel_size, mask_type)
    c = kernel_size // 2
    assert ((c, c) in visible) == (mask_type == 'B')
    expected_mask = torch.zeros(kernel_size, kernel_size)
    for r, s in visible:
        expected_mask[r, s] = 1
    assert torch.equal(conv.mask[0, 0], expected_mask)

    size = 7
    expected = torch.zeros(size, size, dtype=torch.bool)
    for r, s in visible:
        expected[size // 2 - c + r, size // 2 - c + s] = True
    assert torch.equal(input_gradient_pattern(conv, size), expected)


@pytest.mark.parametrize('mask_type', ['A', 'B'])
def test_masked_conv_stays_masked_after_an_optimizer_step(mask_type):
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, mask_type)
    # Weight decay moves every stored weight, masked ones included; the mask must still apply afterwards.
    optimizer = torch.optim.SGD(conv.parameters(), lr=1.0, weight_decay=0.5)
    before = conv.weight.detach().clone()
    (1000 * conv(torch.randn(4, 2, 9, 9)).sum()).backward()
    optimizer.step()
    assert not torch.equal(conv.weight * (1 - conv.mask), before * (1 - conv.mask))

    x = torch.randn(1, 2, 9, 9)
    masked = raster_mask(9, 9, 4 * 9 + 4 + (mask_type == 'B'))  # the centre (for 'B': after it) and later
    y = x.clone()
    y[:, :, masked] = torch.randn(2, int(masked.sum()))
    with torch.no_grad():
        torch.testing.assert_close(conv(y)[:, :, 4, 4], conv(x)[:, :, 4, 4], rtol=0, atol=1e-5)
    visible = visible_offsets(5, mask_type)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for r, s in visible:
        expected[1 + r, 1 + s] = True
    assert torch.equal(input_gradient_pattern(conv, 7), expected)


# -----------------------------------------------------------------------------
# Causality: changing codes at positions >= p never changes the logits at p

def assert_causal(logits_fn, codes, check_depends=True):
    """For every raster position p, perturb the codes at positions >= p; logits at positions <= p must not move.

    `codes` [H, W]; `logits_fn` maps codes [N, H, W] to logits [N, K, H, W]. Also perturbs only the code at p.
    """
    height, width = codes.shape
    n = height * width
    suffix = torch.stack([perturbed(codes, raster_mask(height, width, p), seed=p) for p in range(n)])
    single = torch.stack([perturbed(codes, (torch.arange(n) == p).view(height, width), seed=n + p)
                          for p in range(n)])
    batch = torch.cat([codes[None], suffix, single])
    with torch.no_grad():
        logits = logits_fn(batch).double()
    base = logits[0].flatten(1)  # [K, H*W]
    for kind, changed in (('codes >= p', logits[1:n + 1]), ('the code at p', logits[n + 1:])):
        changed = changed.flatten(2)  # [n, K, H*W]
        for p in range(n):
            torch.testing.assert_close(changed[p, :, :p + 1], base[:, :p + 1], rtol=0, atol=1e-9,
                                       msg=lambda m: f'changing {kind} changed the logits at or before p={p}: {m}')
            if check_depends and p < n - 1:
                # Not vacuous: some later position does see the change.
                assert (changed[p, :, p + 1:] - base[:, p + 1:]).abs().max() > 1e-6, (kind, p)


def test_pixelcnn_is_causal_at_every_position():
    model = tiny_prior(num_layers=3).double()
    assert_causal(model, random_codes(1, 5, 6)[0])


@pytest.mark.parametrize('kernel_size, first_kernel_size, num_layers', [(5, 3, 3), (3, 5, 2), (3, 7, 1)])
def test_pixelcnn_is_causal_with_other_kernels(kernel_size, first_kernel_size, num_layers):
    model = tiny_prior(kernel_size=kernel_size, first_kernel_size=first_kernel_size, num_layers=num_layers).double()
    assert_causal(model, random_codes(1, 5, 6)[0], check_depends=False)


def test_class_conditional_pixelcnn_is_causal():
    model = tiny_prior(num_layers=3, num_classes=4).double()
    codes = random_codes(1, 5, 6)[0]
    for label in (0, 3):
        assert_causal(lambda c: model(c, class_labels=torch.full((len(c),), label)), codes)
    with torch.no_grad():  # the label matters, even where no code can be seen yet
        first = [model(codes[None], class_labels=torch.tensor([label]))[0, :, 0, 0] for label in (0, 3)]
    assert (first[0] - first[1]).abs().max() > 1e-4


def test_spatially_conditioned_pixelcnn_is_causal():
    model = tiny_prior(num_layers=3, cond_channels=5).double()
    codes = random_codes(1, 5, 6)[0]
    cond = torch.randn(1, 5, 5, 6, dtype=torch.float64)
    assert_causal(lambda c: model(c, cond.expand(len(c), -1, -1, -1)), codes)
    other = cond.clone()
    other[:, :, 0, 0] += 1
    with torch.no_grad():
        assert (model(codes[None], cond)[0, :, 0, 0] - model(codes[None], other)[0, :, 0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize('num_classes', [None, 3])
def test_hierarchical_pixelcnn_is_causal_at_both_levels(num_classes):
    model = tiny_prior(HierarchicalPixelCNN, num_layers=3, num_classes=num_classes).double()
    codes_top, codes_bottom = random_codes(1, 3, 4, seed=3), random_codes(1, 6, 8, seed=4)
    labels = None if num_classes is None else torch.tensor([2])

    def repeat(tensor, n):
        return None if tensor is None else tensor.expand(n, *tensor.shape[1:])

    assert_causal(lambda c: model(c, repeat(codes_bottom, len(c)), repeat(labels, len(c)))[0], codes_top[0])
    assert_causal(lambda c: model(repeat(codes_top, len(c)), c, repeat(labels, len(c)))[1], codes_bottom[0])

    with torch.no_grad():
        top, bottom = model(codes_top, codes_bottom, labels)
        # The top level never sees the bottom codes.
        other_bottom = perturbed(codes_bottom[0], torch.ones(6, 8, dtype=torch.bool))[None]
        assert torch.equal(model(codes_top, other_bottom, labels)[0], top)
        # The bottom level does see the top codes, at every position.
        other_top = perturbed(codes_top[0], torch.ones(3, 4, dtype=torch.bool))[None]
        moved = (model(other_top, codes_bottom, labels)[1] - bottom).abs().amax(1)[0]  # [H, W]
    assert torch.all(moved > 1e-6)


# -----------------------------------------------------------------------------
# Receptive field: no blind spot

def unseen_earlier_positions(logits_fn, codes, position):
    """Earlier positions whose code, changed alone, leaves the logits at `position` unchanged."""
    height, width = codes.shape
    target = position[0] * width + position[1]
    batch = torch.stack([codes] + [perturbed(codes, (torch.arange(height * width) == q).view(height, width), seed=q)
                                   for q in range(target)])
    with torch.no_grad():
        logits = logits_fn(batch)[:, :, position[0], position[1]]
    change = (logits[1:] - logits[0]).abs().amax(1)
    return [divmod(q, width) for q in range(target) if change[q] <= 1e-12]


class PlainMaskedStack(nn.Module):
    """The original PixelCNN: a type-A then type-B 3x3 masked convs. It has a blind spot to the upper right."""

    def __init__(self, num_layers, channels=16):
        super().__init__()
        self.embedding = nn.Embedding(K, channels)
        self.convs = nn.ModuleList([MaskedConv2d(channels, channels, 3, 'A' if i == 0 else 'B')
                                    for i in range(num_layers)])

    def forward(self, codes):
        x = self.embedding(codes).permute(0, 3, 1, 2)
        for conv in self.convs:
            x = torch.tanh(conv(x))
        return x


@pytest.mark.parametrize('position', [(6, 1), (7, 0), (5, 3)])
def test_pixelcnn_has_no_blind_spot(position):
    model = tiny_prior(num_layers=8, kernel_size=3, first_kernel_size=7).double()
    codes = random_codes(1, 8, 8)[0]
    unseen = unseen_earlier_positions(model, codes, position)
    two_rows_above = [q for q in unseen if q[0] >= position[0] - 2]
    assert two_rows_above == [], f'{position} does not see {two_rows_above}'
    assert unseen == []


def test_plain_masked_stack_has_a_blind_spot_the_check_finds():
    torch.manual_seed(0)
    stack = PlainMaskedStack(num_layers=8).double()
    codes = random_codes(1, 8, 8)[0]
    unseen = unseen_earlier_positions(stack, codes, (6, 1))
    assert (5, 7) in unseen and (5, 3) in unseen
    assert (5, 2) not in unseen and (6, 0) not in unseen and (4, 3) not in unseen


# -----------------------------------------------------------------------------
# Cached sampling equals the reference sampler

def assert_samplers_agree(sample_fn):
    """sample_fn(cached, generator) -> codes; both samplers must draw identical codes from the same seed."""
    cached = sample_fn(True, torch.Generator().manual_seed(7))
    reference = sample_fn(False, torch.Generator().manual_seed(7))
    assert torch.equal(cached, reference)
    return cached


@pytest.fixture(scope='module')
def prior():
    return tiny_prior(num_layers=4)


# Every value of each setting, and every pair of a grid with a temperature (the full product adds nothing but time).
SAMPLING_CASES = [  # shape, batch size, temperature, top_k, top_p
    ((3, 3), 1, 0.7, None, None), ((3, 3), 5, 1.0, 5, 0.8), ((3, 3), 5, 1.5, None, 0.8),
    ((4, 7), 5, 0.7, 5, None), ((4, 7), 1, 1.0, None, 0.8), ((4, 7), 1, 1.5, 5, None),
    ((8, 8), 5, 0.7, None, 0.5), ((8, 8), 1, 1.0, 5, None), ((8, 8), 5, 1.5, 5, 0.9),
]


@pytest.mark.parametrize('shape, batch_size, temperature, top_k, top_p', SAMPLING_CASES)
def test_cached_sampling_equals_reference(prior, shape, batch_size, temperature, top_k, top_p):
    codes = assert_samplers_agree(lambda cached, generator: prior.sample(
        batch_size, shape, temperature, top_k, generator=generator, cached=cached, top_p=top_p))
    assert len(codes.unique()) > 1


@pytest.mark.parametrize('overrides, sample_kwargs', [
    ({}, {}),
    (dict(kernel_size=5, first_kernel_size=3, num_layers=3), {}),
    (dict(num_classes=3), dict(class_labels=[2, 0, 1])),
    (dict(cond_channels=4), dict(cond=torch.randn(3, 4, 4, 5, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64))),
])
def test_cached_sampler_computes_the_reference_logits(monkeypatch, overrides, sample_kwargs):
    """Stricter than equal codes: every logit vector the cached sampler draws from equals the reference's."""
    model = tiny_prior(**overrides).double()
    recorded = {True: [], False: []}
    real_sample = pixelcnn_prior.sample_from_logits
    for cached in (True, False):
        def recording_sample(logits, *args, **kwargs):
            recorded[cached].append(logits.clone())
            return real_sample(logits, *args, **kwargs)
        monkeypatch.setattr(pixelcnn_prior, 'sample_from_logits', recording_sample)
        model.sample(3, (4, 5), temperature=1.2, generator=torch.Generator().manual_seed(0), cached=cached,
                     **sample_kwargs)
    assert len(recorded[True]) == len(recorded[False]) == 4 * 5
    for position, (got, expected) in enumerate(zip(recorded[True], recorded[False])):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9, msg=lambda m: f'position {position}: {m}')


@pytest.mark.parametrize('kernel_size, first_kernel_size, num_layers', [(5, 3, 3), (3, 7, 1), (3, 5, 2)])
def test_cached_sampling_equals_reference_with_other_kernels(kernel_size, first_kernel_size, num_layers):
    model = tiny_prior(kernel_size=kernel_size, first_kernel_size=first_kernel_size, num_layers=num_layers)
    assert_samplers_agree(lambda cached, generator: model.sample(3, (5, 6), generator=generator, cached=cached))


@pytest.mark.parametrize('class_labels', [2, [0, 3, 1, 2]])
def test_cached_sampling_equals_reference_class_conditional(class_labels):
    model = tiny_prior(num_classes=4)
    codes = assert_samplers_agree(lambda cached, generator: model.sample(
        4, (4, 5), class_labels=class_labels, generator=generator, cached=cached))
    assert tuple(codes.shape) == (4, 4, 5)


def test_cached_sampling_equals_reference_with_spatial_cond():
    model = tiny_prior(cond_channels=6)
    cond = torch.randn(3, 6, 4, 5)
    assert_samplers_agree(lambda cached, generator: model.sample(
        3, (4, 5), cond=cond, top_k=5, generator=generator, cached=cached))


@pytest.mark.parametrize('num_classes, class_labels', [(None, None), (3, 1), (3, [2, 0])])
def test_hierarchical_cached_sampling_equals_reference(num_classes, class_labels):
    model = tiny_prior(HierarchicalPixelCNN, num_layers=3, num_classes=num_classes)
    samples = {}
    for cached in (True, False):
        samples[cached] = model.sample(2, (3, 4), (6, 8), temperature=0.9, class_labels=class_labels,
                                       generator=torch.Generator().manual_seed(5), cached=cached)
    for cached_codes, reference_codes in zip(samples[True], samples[False]):
        assert torch.equal(cached_codes, reference_codes)
    codes_top, codes_bottom = samples[True]
    assert tuple(codes_top.shape) == (2, 3, 4) and tuple(codes_bottom.shape) == (2, 6, 8)


# -----------------------------------------------------------------------------
# Sampling

def test_sample_returns_codes_in_range(prior):
    codes = prior.sample(3, (4, 6), generator=torch.Generator().manual_seed(0))
    assert codes.dtype == torch.long and tuple(codes.shape) == (3, 4, 6)
    assert codes.min() >= 0 and codes.max() < K


@pytest.mark.parametrize('kwargs', [dict(temperature=0.0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_bad_sampling_arguments_are_refused(prior, kwargs):
    for cached in (True, False):
        with pytest.raises(ValueError):
            prior.sample(1, (2, 2), cached=cached, **kwargs)


@pytest.mark.parametrize('cached', [True, False])
def test_top_1_sampling_picks_the_argmax_given_earlier_codes(cached):
    model = tiny_prior(num_classes=4)
    labels = torch.tensor([0, 1, 2, 3])  # distinct labels, so that the samples of the batch differ
    codes = model.sample(4, (5, 6), top_k=1, temperature=1.3, class_labels=labels,
                         generator=torch.Generator().manual_seed(0), cached=cached)
    assert len({tuple(sample.flatten().tolist()) for sample in codes}) > 1
    with torch.no_grad():
        logits = model(codes, class_labels=labels)  # causal: each position sees only the earlier sampled codes
    assert torch.equal(codes, logits.argmax(1))


@pytest.mark.parametrize('cached', [True, False])
def test_hierarchical_top_1_sampling_picks_the_argmax_at_both_levels(cached):
    model = tiny_prior(HierarchicalPixelCNN, num_layers=3, num_classes=3)
    labels = torch.tensor([0, 2])
    codes_top, codes_bottom = model.sample(2, (3, 4), (6, 8), top_k=1, class_labels=labels, cached=cached)
    with torch.no_grad():
        logits_top, logits_bottom = model(codes_top, codes_bottom, labels)
    assert torch.equal(codes_top, logits_top.argmax(1))
    assert torch.equal(codes_bottom, logits_bottom.argmax(1))  # sampled given the very top codes returned


@pytest.mark.parametrize('cached', [True, False])
def test_hierarchical_sampler_draws_from_the_forward_logits_of_its_codes(monkeypatch, cached):
    """Each code is drawn from the logits that forward() gives at its position, for the codes that were returned."""
    model = tiny_prior(HierarchicalPixelCNN, num_layers=3, num_classes=3).double()
    recorded = []
    real_sample = pixelcnn_prior.sample_from_logits

    def recording_sample(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return real_sample(logits, *args, **kwargs)

    monkeypatch.setattr(pixelcnn_prior, 'sample_from_logits', recording_sample)
    labels = torch.tensor([0, 2])
    codes_top, codes_bottom = model.sample(2, (3, 4), (6, 8), temperature=1.5, class_labels=labels,
                                           generator=torch.Generator().manual_seed(0), cached=cached)
    assert len(codes_top.unique()) > 1 and len(recorded) == 3 * 4 + 6 * 8
    with torch.no_grad():
        logits_top, logits_bottom = model(codes_top, codes_bottom, labels)
    expected = list(logits_top.flatten(2).permute(2, 0, 1)) + list(logits_bottom.flatten(2).permute(2, 0, 1))
    for position, (got, want) in enumerate(zip(recorded, expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=lambda m: f'step {position}: {m}')


def test_int_class_label_applies_to_every_sample():
    model = tiny_prior(num_classes=4)
    samples = {labels: model.sample(3, (4, 5), class_labels=labels, generator=torch.Generator().manual_seed(0))
               for labels in (2, (2, 2, 2), 1)}
    assert torch.equal(samples[2], samples[(2, 2, 2)])
    assert not torch.equal(samples[2], samples[1])


def test_sample_from_logits_draws_each_row_from_its_own_logits():
    logits = torch.full((6, 6), -50.0)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    logits[torch.arange(6), order] = 50.0
    samples = sample_from_logits(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, order)


@pytest.mark.parametrize('temperature, top_k', [(1.0, None), (0.5, None), (2.0, None), (1.0, 3)])
def test_sample_from_logits_matches_the_softmax(temperature, top_k):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    draws = 20000
    samples = sample_from_logits(logits.expand(draws, -1), temperature, top_k,
                                 generator=torch.Generator().manual_seed(0))
    assert samples.shape == (draws,) and samples.dtype == torch.long
    frequencies = torch.bincount(samples, minlength=len(logits)).float() / draws

    expected = torch.softmax(logits / temperature, 0)
    if top_k is not None:
        keep = torch.zeros_like(expected, dtype=torch.bool)
        keep[logits.topk(top_k).indices] = True
        expected = torch.where(keep, expected, torch.zeros_like(expected))
        expected = expected / expected.sum()
        assert torch.all(frequencies[~keep] == 0)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.02)


@pytest.mark.parametrize('top_p, kept', [(1.0, [0, 1, 2, 3, 4, 5]), (0.9, [3, 0, 4, 1]), (0.6, [3, 0]), (0.5, [3]),
                                         (1e-6, [3])])
def test_top_p_sampling_matches_the_renormalised_nucleus(top_p, kept):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    probs = torch.softmax(logits, 0)  # by size: 3 (0.55), 0 (0.20), 4 (0.10), 1 (0.07), 2 (0.05), 5 (0.03)
    order = probs.argsort(descending=True).tolist()
    # The nucleus by its definition: the fewest most likely codes whose probability reaches p.
    cumulative = probs[order].cumsum(0)
    nucleus = order[:int((cumulative < top_p).sum()) + 1]
    assert sorted(nucleus) == sorted(kept)
    draws = 20000
    samples = sample_from_logits(logits.expand(draws, -1), top_p=top_p, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(samples, minlength=len(logits)).float() / draws
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert torch.all(frequencies[expected == 0] == 0)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.02)


@pytest.mark.parametrize('temperature', [1e-8, 1e-30])
def test_a_tiny_temperature_picks_the_most_likely_code_without_nan(temperature):
    logits = torch.tensor([[0.0, 3.0, 2.999, -1.0], [50.0, 49.0, -50.0, 0.0], [-2.0, -2.5, -1.0, -3.0]])
    samples = sample_from_logits(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert samples.tolist() == [1, 0, 2]


@pytest.mark.parametrize('uniform, logits, top_k', [
    (0.0, [0.0, 5.0, 1.0], 1),
    (0.0, [-200.0, 0.0, 0.0], None),
    (1 - 2 ** -24, [0.0, 5.0, 1.0], 2),
    (1 - 2 ** -24, [0.0, 0.0, -200.0], None),
])
def test_codes_of_zero_probability_are_never_drawn(monkeypatch, uniform, logits, top_k):
    """The extreme uniform draws (torch.rand gives exactly 0 once in 2**24) must still land on a possible code."""
    monkeypatch.setattr(pixelcnn_prior.torch, 'rand',
                        lambda *size, generator=None, device=None: torch.full(size, uniform))
    probs = torch.softmax(torch.tensor(logits), 0)
    if top_k is not None:
        probs[probs.argsort(descending=True)[top_k:]] = 0
    assert probs[sample_from_logits(torch.tensor([logits]), top_k=top_k).item()] > 0


# -----------------------------------------------------------------------------
# Losses and shapes

def test_loss_is_the_cross_entropy_of_the_logits():
    model = tiny_prior(num_classes=3, cond_channels=4)
    codes, cond, labels = random_codes(2, 4, 5), torch.randn(2, 4, 4, 5), torch.tensor([0, 2])
    with torch.no_grad():
        logits = model(codes, cond, labels)
        assert tuple(logits.shape) == (2, K, 4, 5)
        log_probs = logits.log_softmax(1).gather(1, codes[:, None])  # [B, 1, H, W]
        torch.testing.assert_close(model.loss(codes, cond, labels), -log_probs.mean())
        torch.testing.assert_close(model.loss(codes, cond, labels), F.cross_entropy(logits, codes))


def test_hierarchical_forward_shapes_and_losses():
    model = tiny_prior(HierarchicalPixelCNN, num_layers=3, num_classes=3)
    codes_top, codes_bottom, labels = random_codes(2, 3, 4), random_codes(2, 6, 8), torch.tensor([1, 2])
    with torch.no_grad():
        logits_top, logits_bottom = model(codes_top, codes_bottom, labels)
        assert tuple(logits_top.shape) == (2, K, 3, 4) and tuple(logits_bottom.shape) == (2, K, 6, 8)
        losses = model.loss(codes_top, codes_bottom, labels)
        assert set(losses) == {'top', 'bottom'}
        torch.testing.assert_close(losses['top'], F.cross_entropy(logits_top, codes_top))
        torch.testing.assert_close(losses['bottom'], F.cross_entropy(logits_bottom, codes_bottom))
        only_top, no_bottom = model(codes_top, codes_bottom, labels, levels=('top',))
        assert torch.equal(only_top, logits_top) and no_bottom is None
        top_only = model.loss(codes_top, codes_bottom, labels, levels=('top',))
        assert set(top_only) == {'top'}
        torch.testing.assert_close(top_only['top'], losses['top'])
        assert set(model.loss(codes_top, codes_bottom, labels, levels=('bottom',))) == {'bottom'}


# -----------------------------------------------------------------------------
# The per-level interface (models/prior.py)

def test_pixelcnn_level_interface_equals_its_forward_and_sampler():
    model = tiny_prior(num_classes=3)
    assert isinstance(model, CodePrior) and model.levels == ('flat',)
    codes, labels = random_codes(2, 4, 5), torch.tensor([0, 2])
    with torch.no_grad():
        logits = model.level_logits({'flat': codes}, labels)
        assert list(logits) == ['flat'] and torch.equal(logits['flat'], model(codes, class_labels=labels))
        for reduction in ('mean', 'sum'):
            losses = model.level_losses({'flat': codes}, labels, reduction=reduction)
            torch.testing.assert_close(losses['flat'], F.cross_entropy(logits['flat'], codes, reduction=reduction))
        torch.testing.assert_close(model.level_losses({'flat': codes}, labels)['flat'], model.loss(codes, None, labels))
    sampled = model.sample_levels(2, {'flat': (4, 5)}, temperature=0.8, top_k=4, top_p=0.9, class_labels=labels,
                                  generator=torch.Generator().manual_seed(3))
    expected = model.sample(2, (4, 5), 0.8, 4, labels, generator=torch.Generator().manual_seed(3), top_p=0.9)
    assert list(sampled) == ['flat'] and torch.equal(sampled['flat'], expected)


def test_hierarchical_level_interface_computes_only_the_asked_levels():
    model = tiny_prior(HierarchicalPixelCNN, num_layers=2, num_classes=3)
    assert model.levels == ('top', 'bottom')
    codes = {'top': random_codes(2, 3, 4), 'bottom': random_codes(2, 6, 8, seed=2)}
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        logits_top, logits_bottom = model(codes['top'], codes['bottom'], labels)
        both = model.level_logits(codes, labels)
        assert list(both) == ['top', 'bottom']
        assert torch.equal(both['top'], logits_top) and torch.equal(both['bottom'], logits_bottom)
        assert list(model.level_logits({'top': codes['top']}, labels, levels=('top',))) == ['top']  # no bottom needed
        bottom = model.level_logits(codes, labels, levels=('bottom',))
        assert list(bottom) == ['bottom'] and torch.equal(bottom['bottom'], logits_bottom)
        sums = model.level_losses(codes, labels, ('bottom',), reduction='sum')
        torch.testing.assert_close(sums['bottom'], F.cross_entropy(logits_bottom, codes['bottom'], reduction='sum'))
    sampled = model.sample_levels(2, {'top': (3, 4), 'bottom': (6, 8)}, class_labels=labels,
                                  generator=torch.Generator().manual_seed(3))
    expected = model.sample(2, (3, 4), (6, 8), class_labels=labels, generator=torch.Generator().manual_seed(3))
    assert list(sampled) == ['top', 'bottom']
    assert all(torch.equal(got, want) for got, want in zip(sampled.values(), expected))


@pytest.mark.parametrize('cached', [True, False])
def test_sample_with_vq_decodes_the_codes_sample_levels_draws(cached):
    torch.manual_seed(0)
    vqvae2 = VQVAE2(image_size=16, num_embeddings=K, **VQ_TINY).eval()
    model = tiny_prior(HierarchicalPixelCNN, num_layers=2)
    images = model.sample_with_vq(vqvae2, 2, temperature=0.9, generator=torch.Generator().manual_seed(1),
                                  cached=cached)
    codes = model.sample_levels(2, vqvae2.level_shapes(), temperature=0.9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(images, vqvae2.decode_level_codes(codes))


def test_a_prior_refuses_a_vq_model_with_other_levels_or_codebook_size():
    torch.manual_seed(0)
    vqvae = VQVAE(image_size=16, num_embeddings=K, **VQ_TINY)
    vqvae2 = VQVAE2(image_size=16, num_embeddings=K, **VQ_TINY)
    with pytest.raises(ValueError, match=r"levels \('flat',\) but the vq_vae2 has \('top', 'bottom'\)"):
        tiny_prior(num_layers=1).sample_with_vq(vqvae2, 1)
    with pytest.raises(ValueError, match='levels'):
        tiny_prior(HierarchicalPixelCNN, num_layers=1).sample_with_vq(vqvae, 1)
    with pytest.raises(ValueError, match=f'the prior has {2 * K} codes but the vq_vae has {K}'):
        tiny_prior(num_layers=1, num_embeddings=2 * K).sample_with_vq(vqvae, 1)


# -----------------------------------------------------------------------------
# Decoding samples through the VQ-VAEs

@pytest.mark.parametrize('in_channels, image_size', [(3, 32), (1, 28)])
def test_sample_with_vqvae_decodes_images(in_channels, image_size):
    torch.manual_seed(0)
    vqvae = VQVAE(in_channels=in_channels, image_size=image_size, num_embeddings=K, **VQ_TINY)
    model = tiny_prior(num_layers=2, num_classes=2)
    images = model.sample_with_vqvae(vqvae, 3, class_labels=1, generator=torch.Generator().manual_seed(0))
    assert tuple(images.shape) == (3, in_channels, image_size, image_size)
    with pytest.raises(ValueError):
        tiny_prior(num_embeddings=2 * K).sample_with_vqvae(vqvae, 1)


def test_sample_with_vqvae2_decodes_images():
    torch.manual_seed(0)
    vqvae2 = VQVAE2(image_size=32, num_embeddings=K, **VQ_TINY)
    model = tiny_prior(HierarchicalPixelCNN, num_layers=2)
    images = model.sample_with_vqvae2(vqvae2, 2, generator=torch.Generator().manual_seed(0))
    assert tuple(images.shape) == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        tiny_prior(HierarchicalPixelCNN, num_layers=2, num_embeddings=2 * K).sample_with_vqvae2(vqvae2, 1)


# -----------------------------------------------------------------------------
# Configs

@pytest.mark.parametrize('overrides, message', [
    (dict(kernel_size=4), 'kernel_size must be odd'),
    (dict(first_kernel_size=2), 'first_kernel_size must be odd'),
    (dict(num_layers=0), 'num_layers must be >= 1'),
    (dict(num_classes=1), 'num_classes must be >= 2'),
    (dict(layers=3), 'unknown setting layers'),
])
def test_a_bad_prior_config_is_refused(overrides, message):
    for kind in ('pixelcnn', 'hierarchical_pixelcnn'):
        with pytest.raises(ConfigError, match=message):
            build_model(kind, {**TINY, **overrides})


def test_prior_presets_are_valid_and_the_hierarchical_config_records_its_conditioning_width():
    for preset in PRIOR_PRESETS.values():
        count_parameters('pixelcnn', preset)  # builds it without allocating its weights
    model = tiny_prior(HierarchicalPixelCNN, num_layers=2)
    assert model.config['cond_channels'] == TINY['hidden_channels']
    assert model.config['conditioner_res_blocks'] == 2


# -----------------------------------------------------------------------------
# Checkpoints

def test_pixelcnn_checkpoint_round_trip(tmp_path):
    model = tiny_prior(num_classes=3, cond_channels=4)
    path = tmp_path / 'prior.pth'
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict()}, path)
    torch.manual_seed(99)
    loaded = load_model(path, kinds=('pixelcnn',))
    assert type(loaded) is PixelCNN and not loaded.training
    codes, cond, labels = random_codes(2, 4, 5), torch.randn(2, 4, 4, 5), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(loaded(codes, cond, labels), model(codes, cond, labels))


def test_hierarchical_pixelcnn_checkpoint_round_trip(tmp_path):
    model = tiny_prior(HierarchicalPixelCNN, num_layers=3, num_classes=3)
    path = tmp_path / 'prior.pth'
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict()}, path)
    torch.manual_seed(99)
    loaded = load_model(path)
    assert type(loaded) is HierarchicalPixelCNN and not loaded.training
    codes_top, codes_bottom, labels = random_codes(2, 3, 4), random_codes(2, 6, 8), torch.tensor([1, 2])
    with torch.no_grad():
        for got, expected in zip(loaded(codes_top, codes_bottom, labels), model(codes_top, codes_bottom, labels)):
            assert torch.equal(got, expected)
