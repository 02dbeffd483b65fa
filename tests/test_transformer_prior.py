"""Behaviour of the transformer priors: causality over every position with no blind spot, cached sampling equal to the
reference sampler, errors users see, losses, parameter groups and config round trips."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.transformer_prior as transformer_prior
from models import load_model
from models.config import ConfigError
from models.transformer_prior import (TRANSFORMER_PRESETS, HierarchicalTransformerPrior, TransformerConfig,
                                      TransformerPrior)

K = 16  # codes in the tiny priors
TINY = dict(num_embeddings=K, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, max_height=8, max_width=8)

pytestmark = pytest.mark.usefixtures('single_thread')  # see tests/conftest.py


def tiny_prior(cls=TransformerPrior, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(**{**TINY, **overrides}).eval()


def peaked(model):
    """`model` with logits ~30 times larger: far from uniform, each draw then hangs on the earlier codes, so a
    sampler that computes them wrongly draws different codes."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, transformer_prior.CodeTransformer):
                module.head.weight.mul_(30)
    return model


def random_codes(batch, height, width, seed=1):
    return torch.randint(0, K, (batch, height, width), generator=torch.Generator().manual_seed(seed))


def perturbed(codes, where, seed=2):
    """`codes` [H, W] with every position in `where` [H, W] replaced by a different random code."""
    shift = torch.randint(1, K, codes.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(where, (codes + shift) % K, codes)


def repeat(x, n):
    return x.expand(n, *x.shape[1:])


# -----------------------------------------------------------------------------
# Causality: codes at or after t never move the logits at t; every code before t does

def assert_causal(logits_fn, codes):
    """For every raster position p: changing the codes at positions >= p leaves the logits at positions <= p as they
    were (up to float64 rounding), and changing only the code at p moves the logits at every later position (no
    blind spot).

    `codes` [H, W]; `logits_fn` maps codes [N, H, W] to logits [N, K, H, W].
    """
    height, width = codes.shape
    n = height * width
    index = torch.arange(n).view(height, width)
    suffix = torch.stack([perturbed(codes, index >= p, seed=p) for p in range(n)])
    single = torch.stack([perturbed(codes, index == p, seed=n + p) for p in range(n)])
    with torch.no_grad():
        logits = logits_fn(torch.cat([codes[None], suffix, single])).double().flatten(2)  # [1 + 2n, K, H*W]
    base, suffix_logits, single_logits = logits[0], logits[1:n + 1], logits[n + 1:]
    for p in range(n):
        torch.testing.assert_close(suffix_logits[p, :, :p + 1], base[:, :p + 1], rtol=0, atol=1e-10,
                                   msg=lambda m: f'changing codes >= {p} changed the logits at or before {p}: {m}')
        change = (single_logits[p, :, p + 1:] - base[:, p + 1:]).abs().amax(0)  # [n - p - 1]
        blind = (change <= 1e-8).nonzero().flatten() + p + 1
        assert blind.numel() == 0, f'the code at {p} does not reach the logits at positions {blind.tolist()}'


def test_flat_prior_is_causal_at_every_position_with_no_blind_spot():
    model = tiny_prior().double()
    assert_causal(model, random_codes(1, 4, 5)[0])


def test_multi_head_prior_without_shared_keys_is_causal():
    model = tiny_prior(num_heads=4, num_kv_heads=4, num_layers=1).double()
    assert_causal(model, random_codes(1, 3, 4)[0])


def test_class_conditional_prior_is_causal_and_every_position_sees_the_class():
    model = tiny_prior(num_classes=3).double()
    codes = random_codes(1, 4, 5)[0]
    for label in range(3):
        assert_causal(lambda c: model(c, torch.full((len(c),), label)), codes)
    with torch.no_grad():
        logits = model(codes.expand(3, -1, -1), torch.arange(3))
    assert ((logits[0] - logits[1]).abs().amax(0) > 1e-8).all()
    assert ((logits[0] - logits[2]).abs().amax(0) > 1e-8).all()


@pytest.mark.parametrize('num_classes', [None, 3])
def test_hierarchical_prior_is_causal_at_both_levels(num_classes):
    model = tiny_prior(HierarchicalTransformerPrior, num_classes=num_classes).double()
    codes_top, codes_bottom = random_codes(1, 3, 3, seed=3), random_codes(1, 6, 6, seed=4)
    labels = torch.tensor([2]) if num_classes else None
    rep_labels = (lambda n: repeat(labels, n)) if num_classes else (lambda n: None)
    assert_causal(lambda c: model(c, repeat(codes_bottom, len(c)), rep_labels(len(c)))[0], codes_top[0])
    assert_causal(lambda c: model(repeat(codes_top, len(c)), c, rep_labels(len(c)))[1], codes_bottom[0])


def test_bottom_logits_see_every_top_code_and_top_logits_no_bottom_code():
    model = tiny_prior(HierarchicalTransformerPrior).double()
    codes_top, codes_bottom = random_codes(1, 3, 3, seed=3)[0], random_codes(1, 6, 6, seed=4)[0]
    index = torch.arange(9).view(3, 3)
    tops = torch.stack([codes_top] + [perturbed(codes_top, index == q, seed=q) for q in range(9)])
    bottoms = torch.stack([codes_bottom, perturbed(codes_bottom, torch.ones(6, 6, dtype=torch.bool))])
    with torch.no_grad():
        _, logits_bottom = model(tops, repeat(bottoms[:1], 10))
        logits_top = model(repeat(tops[:1], 2), bottoms, levels=('top',))[0]
    # Every top code reaches every bottom position, the first one included.
    change = (logits_bottom[1:] - logits_bottom[:1]).abs().amax(1)  # [9, 6, 6]
    assert (change > 1e-8).all(), f'unseen (top code, bottom position) pairs: {(change <= 1e-8).nonzero().tolist()}'
    torch.testing.assert_close(logits_top[0], logits_top[1], rtol=0, atol=1e-10)


# -----------------------------------------------------------------------------
# Cached sampling equals the reference sampler

def assert_samplers_agree(sample_fn):
    """sample_fn(cached, generator) -> codes; both samplers must draw identical codes from the same seed."""
    cached = sample_fn(True, torch.Generator().manual_seed(7))
    reference = sample_fn(False, torch.Generator().manual_seed(7))
    if isinstance(cached, tuple):
        assert all(torch.equal(c, r) for c, r in zip(cached, reference))
    else:
        assert torch.equal(cached, reference)
    return cached


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, None, None), (0.7, None, None), (1.0, 3, None),
                                                       (1.0, None, 0.8), (0.7, 5, 0.9)])
@pytest.mark.parametrize('num_heads, num_kv_heads', [(2, 1), (2, 2), (4, 2)])
def test_cached_sampling_equals_reference(temperature, top_k, top_p, num_heads, num_kv_heads):
    model = peaked(tiny_prior(num_heads=num_heads, num_kv_heads=num_kv_heads))
    codes = assert_samplers_agree(lambda cached, g: model.sample(4, (4, 5), temperature, top_k, generator=g,
                                                                 cached=cached, top_p=top_p))
    assert codes.shape == (4, 4, 5) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < K


@pytest.mark.parametrize('class_labels', [1, torch.tensor([0, 2, 1])])
def test_cached_sampling_equals_reference_class_conditional(class_labels):
    model = peaked(tiny_prior(num_classes=3))
    assert_samplers_agree(lambda cached, g: model.sample(3, (3, 4), 0.7, class_labels=class_labels, generator=g,
                                                         cached=cached))


@pytest.mark.parametrize('num_classes, class_labels, top_p', [(None, None, None), (3, 2, 0.9)])
def test_hierarchical_cached_sampling_equals_reference(num_classes, class_labels, top_p):
    model = peaked(tiny_prior(HierarchicalTransformerPrior, num_classes=num_classes))
    codes_top, codes_bottom = assert_samplers_agree(
        lambda cached, g: model.sample(2, (3, 3), (6, 6), 0.7, class_labels=class_labels, generator=g,
                                       cached=cached, top_p=top_p))
    assert codes_top.shape == (2, 3, 3) and codes_bottom.shape == (2, 6, 6)


@pytest.mark.parametrize('num_heads, num_kv_heads', [(2, 1), (4, 2), (4, 4)])
def test_cached_sampler_computes_the_forward_logits(monkeypatch, num_heads, num_kv_heads):
    """Stronger than equal codes: each step's logits are those a full forward pass gives for the sampled codes."""
    model = tiny_prior(num_classes=3, num_heads=num_heads, num_kv_heads=num_kv_heads)
    seen = []
    draw = transformer_prior.sample_from_logits

    def recording(logits, *args):
        seen.append(logits.clone())
        return draw(logits, *args)

    monkeypatch.setattr(transformer_prior, 'sample_from_logits', recording)
    labels = torch.tensor([0, 1, 2])
    codes = model.sample(3, (4, 5), class_labels=labels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(codes, labels).flatten(2).permute(2, 0, 1)  # [T, B, K]
    torch.testing.assert_close(torch.stack(seen), expected, rtol=1e-5, atol=1e-5)


def test_sampling_runs_without_dropout_and_restores_training_mode():
    model = tiny_prior(HierarchicalTransformerPrior, dropout=0.5)
    reference = model.sample(2, (2, 2), (4, 4), generator=torch.Generator().manual_seed(0))
    model.train()
    again = model.sample(2, (2, 2), (4, 4), generator=torch.Generator().manual_seed(0), cached=False)
    assert all(torch.equal(a, b) for a, b in zip(reference, again))
    assert model.training and all(m.training for m in model.modules())


# -----------------------------------------------------------------------------
# Errors users see

def test_grid_larger_than_the_position_table_is_refused():
    model = tiny_prior(max_height=4, max_width=5)
    model(random_codes(1, 4, 5))
    with pytest.raises(ValueError, match='larger than the position table 4x5'):
        model(random_codes(1, 5, 5))
    with pytest.raises(ValueError, match='larger than the position table'):
        model.sample(1, (4, 6))
    hierarchical = tiny_prior(HierarchicalTransformerPrior, max_height=4, max_width=4)
    with pytest.raises(ValueError, match='larger than the position table'):
        hierarchical(random_codes(1, 2, 2), random_codes(1, 6, 6))


@pytest.mark.parametrize('config, message', [
    (dict(embed_dim=30, num_heads=4), 'divisible by num_heads'),
    (dict(num_heads=4, num_kv_heads=3), 'divisible by num_kv_heads'),
    (dict(hidden_channels=64), 'unknown setting hidden_channels'),
    (dict(dropout=1.0), 'dropout must be < 1'),
    (dict(num_embeddings=1), 'num_embeddings must be >= 2'),
    (dict(num_layers=2.5), 'num_layers must be an integer'),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        TransformerPrior(**{**TINY, **config})


def test_hierarchical_settings_belong_to_the_hierarchical_prior():
    assert tiny_prior(HierarchicalTransformerPrior, top_encoder_layers=0).config['top_encoder_layers'] == 0
    with pytest.raises(ConfigError, match='unknown setting top_encoder_layers'):
        TransformerPrior(**TINY, top_encoder_layers=1)


@pytest.mark.parametrize('kwargs, message', [(dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
                                             (dict(top_k=0), 'top_k'), (dict(temperature=0.0), 'temperature')])
def test_bad_sampling_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_prior().sample(1, (2, 2), **kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_prior(HierarchicalTransformerPrior).sample(1, (2, 2), (4, 4), **kwargs)


def test_class_labels_must_match_the_prior():
    with pytest.raises(ValueError, match='class-conditional: pass class_labels'):
        tiny_prior(num_classes=3).sample(1, (2, 2))
    with pytest.raises(ValueError, match='not class-conditional'):
        tiny_prior()(random_codes(1, 2, 2), torch.tensor([0]))


# -----------------------------------------------------------------------------
# Losses, levels and parameter groups

def test_loss_is_the_cross_entropy_of_the_logits():
    model = tiny_prior()
    codes = random_codes(3, 4, 5)
    logits = model(codes)
    assert logits.shape == (3, K, 4, 5)
    torch.testing.assert_close(model.loss(codes), F.cross_entropy(logits, codes))
    torch.testing.assert_close(model.loss(codes, reduction='sum'), model.loss(codes) * codes.numel())
    assert list(model.level_logits({'flat': codes})) == ['flat']


def test_hierarchical_levels_are_computed_only_when_asked():
    model = tiny_prior(HierarchicalTransformerPrior)
    codes_top, codes_bottom = random_codes(2, 3, 3), random_codes(2, 6, 6)
    logits_top, logits_bottom = model(codes_top, codes_bottom)
    assert logits_top.shape == (2, K, 3, 3) and logits_bottom.shape == (2, K, 6, 6)
    assert model(codes_top, codes_bottom, levels=('top',))[1] is None
    assert model(codes_top, codes_bottom, levels=('bottom',))[0] is None
    losses = model.loss(codes_top, codes_bottom, levels=('bottom',))
    assert list(losses) == ['bottom']
    torch.testing.assert_close(losses['bottom'], F.cross_entropy(logits_bottom, codes_bottom))
    assert list(model.level_logits({'top': codes_top}, levels=('top',))) == ['top']
    with pytest.raises(ValueError, match='unknown levels'):
        model(codes_top, codes_bottom, levels=('flat',))


def test_optim_groups_decay_only_matmul_weights():
    model = tiny_prior(HierarchicalTransformerPrior, num_classes=3)
    decay, no_decay = model.optim_groups(0.1)
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    not_decayed = {names[id(p)] for p in no_decay['params']}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert all(name.endswith('.weight') and 'ln_' not in name and 'embedding' not in name for name in decayed)
    assert {'transformer_top.start', 'transformer_top.code_embedding.weight', 'transformer_top.ln_f.weight',
            'transformer_bottom.class_embedding.weight', 'top_encoder.position.row.weight',
            'transformer_bottom.blocks.0.attn.qkv.bias'} <= not_decayed
    torch.optim.AdamW(model.optim_groups(0.1))


def test_a_few_steps_fit_a_fixed_batch():
    model = tiny_prior(dropout=0.0).train()
    codes = random_codes(4, 4, 5)
    optimizer = torch.optim.AdamW(model.optim_groups(0.01), lr=3e-3)
    first = model.loss(codes).item()
    for _ in range(30):
        loss = model.loss(codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize('cls', [TransformerPrior, HierarchicalTransformerPrior])
def test_bf16_autocast_on_a_cpu_attends_in_float32_and_trains_like_float32(monkeypatch, cls):
    """Under --amp bf16 on a CPU the fused attention runs in float32 (its bf16 backward is several times slower there),
    the matrix products around it in bf16; the loss and gradients stay close to a float32 step's."""
    model = tiny_prior(cls, dropout=0.0).train()
    codes = {'flat': random_codes(4, 4, 5)} if cls is TransformerPrior else \
        {'top': random_codes(4, 2, 3), 'bottom': random_codes(4, 4, 6, seed=3)}

    def step(amp):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = sum(model.level_losses(codes, None, model.levels).values())
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    dtypes = []
    attend = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled('cpu')))
        return attend(q, k, v, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording)
    loss32, grad32 = step(amp=False)
    assert dtypes and all(d == (torch.float32,) * 3 + (False,) for d in dtypes)
    dtypes.clear()
    loss16, grad16 = step(amp=True)
    assert dtypes and all(d == (torch.float32,) * 3 + (False,) for d in dtypes)  # float32, outside autocast
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


# -----------------------------------------------------------------------------
# Round trips and decoding

@pytest.mark.parametrize('cls', [TransformerPrior, HierarchicalTransformerPrior])
def test_rebuilt_from_config_and_state_dict_gives_identical_logits(cls, tmp_path):
    model = tiny_prior(cls, num_classes=3, dropout=0.2)
    assert all(isinstance(value, (int, float, str, type(None))) for value in model.config.values())
    torch.save({'kind': model.kind, 'config': model.config, 'model': model.state_dict()}, tmp_path / 'prior.pth')
    state = torch.load(tmp_path / 'prior.pth', weights_only=True)
    rebuilt = cls(**state['config'])
    rebuilt.load_state_dict(state['model'])
    rebuilt.eval()
    codes, labels = (random_codes(2, 3, 3), random_codes(2, 6, 6)), torch.tensor([0, 2])
    with torch.no_grad():
        if cls is TransformerPrior:
            assert torch.equal(rebuilt(codes[1], labels), model(codes[1], labels))
        else:
            for a, b in zip(rebuilt(*codes, labels), model(*codes, labels)):
                assert torch.equal(a, b)


def test_config_defaults_and_presets():
    config = TransformerPrior().config
    assert config == TransformerConfig().to_dict()
    assert (config['embed_dim'], config['num_layers'], config['num_heads'], config['dropout']) == (352, 4, 8, 0.1)
    assert config['activation'] == 'silu'
    assert set(TRANSFORMER_PRESETS) == {'small', 'default', 'large'}
    for preset in TRANSFORMER_PRESETS.values():
        TransformerConfig(**preset)


@pytest.mark.parametrize('kind, cls', [('transformer', TransformerPrior),
                                       ('hierarchical_transformer', HierarchicalTransformerPrior)])
def test_a_checkpoint_from_before_the_activation_option_loads_with_gelu(kind, cls, tmp_path):
    """Format-2 files have no 'activation' and were trained with GELU; loading must rebuild GELU, not the new SiLU."""
    model = tiny_prior(cls, activation='gelu')
    config = {name: value for name, value in model.config.items() if name != 'activation'}
    torch.save({'format_version': 2, 'kind': kind, 'config': config, 'model': model.state_dict()},
               tmp_path / 'old.pth')
    loaded = load_model(str(tmp_path / 'old.pth')).eval()
    assert loaded.config['activation'] == 'gelu'
    codes = (random_codes(2, 3, 3), random_codes(2, 6, 6))
    with torch.no_grad():
        if cls is TransformerPrior:
            assert torch.equal(loaded(codes[1]), model(codes[1]))
        else:
            for a, b in zip(loaded(*codes), model(*codes)):
                assert torch.equal(a, b)
    assert tiny_prior(cls).config['activation'] == 'silu'  # and a new prior uses SiLU


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
@pytest.mark.parametrize('cls, levels', [(TransformerPrior, None), (HierarchicalTransformerPrior, None),
                                         (HierarchicalTransformerPrior, ('top',)),
                                         (HierarchicalTransformerPrior, ('bottom',))])
def test_fast_level_losses_equal_cross_entropy_of_the_level_logits(cls, levels, reduction):
    """The losses read the logits as the [B*T, K] matrix they are; the reference is cross-entropy over dim 1 of the
    same logits made contiguous in [B, K, H, W] layout (the strided path)."""
    model = tiny_prior(cls, num_classes=3, dropout=0.0).double()
    codes = {'top': random_codes(2, 3, 3), 'bottom': random_codes(2, 6, 5, seed=3)} if cls is not TransformerPrior \
        else {'flat': random_codes(2, 6, 5)}
    labels = torch.tensor([1, 2])
    fast = model.level_losses(codes, labels, levels, reduction)
    reference = {level: F.cross_entropy(logits.contiguous(), codes[level], reduction=reduction)
                 for level, logits in model.level_logits(codes, labels, levels).items()}
    assert list(fast) == list(reference)
    for level in fast:
        torch.testing.assert_close(fast[level], reference[level], rtol=1e-12, atol=1e-12)


class StubVQ(nn.Module):
    """Just enough of a VQ model for `sample_with_vq`: its levels, grids and a decoder that returns the codes."""

    def __init__(self, levels, shapes):
        super().__init__()
        self.kind, self.levels, self.num_embeddings, self.shapes = 'stub', levels, K, shapes

    def level_shapes(self):
        return dict(zip(self.levels, self.shapes))

    def decode_level_codes(self, codes):
        return {level: value.float() for level, value in codes.items()}


def test_sample_with_vq_models_samples_their_grids():
    images = tiny_prior().sample_with_vqvae(StubVQ(('flat',), [(3, 4)]), 2, temperature=0.7, top_p=0.9)
    assert images['flat'].shape == (2, 3, 4)
    images = tiny_prior(HierarchicalTransformerPrior, num_classes=3).sample_with_vqvae2(
        StubVQ(('top', 'bottom'), [(2, 2), (4, 4)]), 2, class_labels=1, top_k=4)
    assert images['top'].shape == (2, 2, 2) and images['bottom'].shape == (2, 4, 4)
    with pytest.raises(ValueError, match='levels'):
        tiny_prior().sample_with_vqvae(StubVQ(('top', 'bottom'), [(2, 2), (4, 4)]), 1)
