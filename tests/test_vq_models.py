"""Behaviour of the quantizer, VQ-VAE, VQ-VAE-2 and checkpoint files: brute-force references, hand-computed EMA steps,
straight-through gradients, shapes on several image sizes, the per-level interface and decode round trips, checked
configs, and safe, atomic checkpoints."""
import builtins
import copy
import os
import shlex

import pytest
import torch
import torch.nn as nn

import models.checkpoint as checkpoint_module
from models import (VQ_PRESETS, VQVAE, VQVAE2, CheckpointError, ConfigError, VectorQuantizer, build_model,
                    code_statistics, count_parameters, load_checkpoint, load_model, save_checkpoint)
from models.config import check_value

TINY = dict(hidden_channels=16, res_channels=8, num_res_blocks=1, num_embeddings=32, embedding_dim=8)


def tiny_model(cls, spread=False, **overrides):
    """A small model; `spread`: after one training forward, whose dead-code restarts move the codebooks onto encoder
    outputs (a fresh model maps every vector to the same code, which would make code round trips vacuous)."""
    torch.manual_seed(0)
    model = cls(**{**TINY, **overrides})
    if spread:
        size = model.image_size
        model.train()(torch.rand(4, model.config['in_channels'], size, size) * 2 - 1)
    return model


def vectors_to_map(vectors):
    """Rows [N, D] -> feature map [1, D, 1, N], whose flattened order (B, H, W) is the row order."""
    return vectors.t()[None, :, None, :].contiguous()


# -----------------------------------------------------------------------------
# Quantizer: nearest codes, EMA, gradients, precision, statistics

@pytest.mark.parametrize('ema', [True, False])
def test_nearest_codes_equal_brute_force_search(ema):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=37, embedding_dim=5, ema=ema).eval()
    z = torch.randn(3, 5, 6, 7)
    quantized, indices, _ = quantizer(z)

    codebook = quantizer.codebook().detach().double()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5).double()
    distances = torch.stack([((flat - codebook[k]) ** 2).sum(1) for k in range(codebook.shape[0])], 1)  # [N, K]
    expected = distances.argmin(1).view(3, 6, 7)
    assert torch.equal(indices, expected)
    assert torch.equal(indices, torch.cdist(flat, codebook).argmin(1).view(3, 6, 7))
    assert indices.dtype == torch.long
    assert len(indices.unique()) > 10  # the data spreads over many codes, so the comparison means something

    looked_up = quantizer.codebook().detach()[indices].permute(0, 3, 1, 2)  # [B, D, H, W]
    torch.testing.assert_close(quantized.detach(), looked_up, rtol=0, atol=1e-6)
    assert torch.equal(quantizer.lookup(indices), looked_up)


def test_initial_ema_state_is_consistent():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=16, embedding_dim=4)
    torch.testing.assert_close(quantizer.embed_avg / quantizer.cluster_size[:, None], quantizer.embedding)
    assert torch.all(quantizer.cluster_size > 0)


def test_one_ema_update_equals_hand_computation():
    decay, eps = 0.9, 1e-5
    quantizer = VectorQuantizer(num_embeddings=3, embedding_dim=2, decay=decay, epsilon=eps, dead_code_threshold=0)
    codes = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    with torch.no_grad():
        quantizer.embedding.copy_(codes)
        quantizer.embed_avg.copy_(codes)
        quantizer.cluster_size.fill_(1.0)
    # Two vectors near code 0, two near code 1, none near code 2.
    vectors = torch.tensor([[0.5, 0.0], [-0.5, 0.5], [3.0, 1.0], [5.0, -1.0]])
    _, indices, stats = quantizer.train()(vectors_to_map(vectors))
    assert indices.flatten().tolist() == [0, 0, 1, 1]

    # counts = [2, 2, 0]; sums = [(0, 0.5), (8, 0), (0, 0)]
    expected_cluster_size = [0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 0]  # [1.1, 1.1, 0.9]
    expected_embed_avg = [[0.9 * 0 + 0.1 * 0, 0.9 * 0 + 0.1 * 0.5],
                          [0.9 * 4 + 0.1 * 8, 0.9 * 0 + 0.1 * 0],
                          [0.9 * 0 + 0.1 * 0, 0.9 * 4 + 0.1 * 0]]
    n = 1.1 + 1.1 + 0.9
    smoothed = [(size + eps) / (n + 3 * eps) * n for size in expected_cluster_size]
    expected_embedding = [[value / smoothed[k] for value in expected_embed_avg[k]] for k in range(3)]

    torch.testing.assert_close(quantizer.cluster_size, torch.tensor(expected_cluster_size))
    torch.testing.assert_close(quantizer.embed_avg, torch.tensor(expected_embed_avg))
    torch.testing.assert_close(quantizer.embedding, torch.tensor(expected_embedding))
    assert torch.equal(stats['code_counts'], torch.tensor([2.0, 2.0, 0.0]))


def test_ema_codebook_is_frozen_in_eval_and_learns_in_training():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=8, embedding_dim=4)
    assert not any(p is quantizer.embedding for p in quantizer.parameters())
    z = torch.randn(2, 4, 5, 5)
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    quantizer.eval()(z)
    for name, buffer in quantizer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    quantizer.train()(z)
    assert not torch.equal(quantizer.embedding, before['embedding'])


def test_loss_based_codebook_is_a_parameter_that_gets_gradient():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=8, embedding_dim=4, ema=False)
    assert isinstance(quantizer.embedding, nn.Parameter)
    assert any(p is quantizer.embedding for p in quantizer.parameters())
    _, indices, stats = quantizer(torch.randn(2, 4, 5, 5))
    stats['vq_loss'].backward()
    grad = quantizer.embedding.grad
    assert grad is not None
    used = indices.unique()
    assert grad[used].abs().sum(1).gt(0).all()  # every code that was used is pulled towards its vectors


def test_dead_codes_restart_onto_encoder_outputs():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=4, embedding_dim=3, decay=0.99, dead_code_threshold=1.0)
    far = torch.tensor([[0.0, 0.0, 0.0], [100.0, 100.0, 100.0], [-100.0, 100.0, 0.0], [100.0, -100.0, 50.0]])
    with torch.no_grad():
        quantizer.embedding.copy_(far)
        quantizer.embed_avg.copy_(far)
    z = torch.randn(2, 3, 4, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    _, indices, _ = quantizer.train()(z)
    assert torch.all(indices == 0)

    for k in (1, 2, 3):  # dead: every vector went to code 0
        matches = (flat == quantizer.embedding[k]).all(1)
        assert matches.any(), f'code {k} was not moved onto an encoder output'
        assert torch.equal(quantizer.embed_avg[k], quantizer.embedding[k])
        assert quantizer.cluster_size[k] == 1.0
    assert not (flat == quantizer.embedding[0]).all(1).any()  # the live code follows the EMA, not a restart
    assert quantizer.cluster_size[0] > 1.0


def test_straight_through_gradient_reaches_the_input():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=8, embedding_dim=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, _, _ = quantizer(z)
    upstream = torch.randn_like(quantized)
    (quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_vqvae_loss_reaches_the_first_encoder_conv():
    model = tiny_model(VQVAE)
    _, metrics = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    metrics['loss'].backward()
    first_conv = model.encoder.net[0]
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('input_dtype', [torch.float32, torch.bfloat16])
def test_quantizer_works_in_float32_under_autocast(input_dtype):
    torch.manual_seed(0)
    reference = VectorQuantizer(num_embeddings=16, embedding_dim=4)
    quantizer = copy.deepcopy(reference)
    z = torch.randn(2, 4, 6, 6).to(input_dtype)

    _, expected_indices, expected_stats = reference.train()(z.float())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        quantized, indices, stats = quantizer.train()(z)
    assert quantized.dtype == input_dtype
    assert torch.equal(indices, expected_indices)
    for name in ('vq_loss', 'commitment_loss', 'perplexity'):
        assert stats[name].dtype == torch.float32, name
        torch.testing.assert_close(stats[name], expected_stats[name])
    for name, buffer in quantizer.named_buffers():  # the EMA step ran in float32 too
        assert buffer.dtype == torch.float32, name
        torch.testing.assert_close(buffer, dict(reference.named_buffers())[name])


def test_perplexity_and_code_usage():
    torch.manual_seed(0)
    k = 8
    quantizer = VectorQuantizer(num_embeddings=k, embedding_dim=4).eval()
    codebook = quantizer.embedding

    one_code = vectors_to_map(codebook[3:4].repeat(10, 1))
    _, indices, stats = quantizer(one_code)
    assert torch.all(indices == 3)
    torch.testing.assert_close(stats['perplexity'], torch.tensor(1.0))
    torch.testing.assert_close(stats['code_usage'], torch.tensor(1 / k))

    uniform = vectors_to_map(codebook.repeat(5, 1))  # each code 5 times
    _, indices, stats = quantizer(uniform)
    assert torch.equal(indices.flatten(), torch.arange(k).repeat(5))
    torch.testing.assert_close(stats['perplexity'], torch.tensor(float(k)))
    torch.testing.assert_close(stats['code_usage'], torch.tensor(1.0))
    assert torch.equal(stats['code_counts'], torch.full((k,), 5.0))


def test_code_statistics_is_the_exponentiated_entropy_of_the_counts():
    counts = torch.tensor([6.0, 2.0, 0.0, 0.0])
    probs = torch.tensor([0.75, 0.25])
    perplexity, usage = code_statistics(counts)
    torch.testing.assert_close(perplexity, torch.exp(-(probs * probs.log()).sum()))
    assert usage == 0.5
    perplexity, usage = code_statistics(torch.zeros(4))  # no codes at all, e.g. an empty validation shard
    assert perplexity == 1 and usage == 0


# -----------------------------------------------------------------------------
# Forward statistics

@pytest.mark.parametrize('cls, levels', [(VQVAE, ('flat',)), (VQVAE2, ('top', 'bottom'))])
def test_forward_returns_the_losses_and_per_level_quantizer_statistics(cls, levels):
    model = tiny_model(cls).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, stats = model(x)
    assert recon.shape == x.shape and cls.levels == levels
    assert set(stats) == {'loss', 'recon_loss', 'vq_loss', 'levels'} and tuple(stats['levels']) == levels
    torch.testing.assert_close(stats['recon_loss'], torch.nn.functional.mse_loss(recon, x))
    torch.testing.assert_close(stats['vq_loss'], sum(s['vq_loss'] for s in stats['levels'].values()))
    torch.testing.assert_close(stats['loss'], stats['recon_loss'] + stats['vq_loss'])
    for level, level_stats in stats['levels'].items():
        assert {'vq_loss', 'commitment_loss', 'perplexity', 'code_usage', 'code_counts'} <= set(level_stats)
        (h, w) = model.level_shapes()[level]
        assert level_stats['code_counts'].sum() == 2 * h * w  # every code of the batch counted once


# -----------------------------------------------------------------------------
# Code grids and decoding

@pytest.mark.parametrize('image_size, in_channels', [(32, 3), (64, 3), (28, 1)])
def test_vqvae_code_indices_shape(image_size, in_channels):
    model = tiny_model(VQVAE, spread=True, in_channels=in_channels, image_size=image_size).eval()
    codes = model.get_code_indices(torch.rand(2, in_channels, image_size, image_size) * 2 - 1)
    assert len(codes.unique()) > 1
    assert codes.dtype == torch.long
    assert tuple(codes.shape) == (2, *model.code_shape())
    assert model.code_shape() == (image_size // 4, image_size // 4)
    assert codes.min() >= 0 and codes.max() < model.num_embeddings


@pytest.mark.parametrize('image_size', [32, 64])
def test_vqvae2_code_indices_shape(image_size):
    model = tiny_model(VQVAE2, spread=True, image_size=image_size).eval()
    codes_top, codes_bottom = model.get_code_indices(torch.rand(2, 3, image_size, image_size) * 2 - 1)
    top_shape, bottom_shape = model.code_shape()
    assert top_shape == (image_size // 8, image_size // 8) and bottom_shape == (image_size // 4, image_size // 4)
    assert tuple(codes_top.shape) == (2, *top_shape) and tuple(codes_bottom.shape) == (2, *bottom_shape)
    for codes in (codes_top, codes_bottom):
        assert codes.dtype == torch.long and len(codes.unique()) > 1
        assert codes.min() >= 0 and codes.max() < model.num_embeddings


def test_vqvae2_at_256_has_32_and_64_grids():
    model = tiny_model(VQVAE2, image_size=256, hidden_channels=8, res_channels=4, embedding_dim=4).eval()
    assert model.code_shape() == ((32, 32), (64, 64))
    with torch.no_grad():
        codes_top, codes_bottom = model.get_code_indices(torch.zeros(1, 3, 256, 256))
    assert tuple(codes_top.shape) == (1, 32, 32) and tuple(codes_bottom.shape) == (1, 64, 64)


def test_sizes_the_downsampling_cannot_take_are_refused():
    with pytest.raises(ValueError):
        VQVAE2(**TINY, image_size=28)  # 28 is not divisible by 4 * 2
    with pytest.raises(ValueError):
        VQVAE(**TINY, image_size=30)
    with pytest.raises(ValueError):
        VQVAE(**TINY, downsample=3)
    assert tiny_model(VQVAE2, image_size=32).code_shape(48) == ((6, 6), (12, 12))
    with pytest.raises(ValueError):
        tiny_model(VQVAE2, image_size=32).code_shape(28)


def test_vqvae_decode_codes_equals_decode_of_quantized():
    model = tiny_model(VQVAE, spread=True).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        quantized, codes, _ = model.encode(x)
        assert len(codes.unique()) > 5
        assert torch.equal(codes, model.get_code_indices(x))
        torch.testing.assert_close(model.decode_codes(codes), model.decode(quantized), rtol=0, atol=1e-5)


def test_vqvae2_decode_codes_equals_decode_of_quantized():
    model = tiny_model(VQVAE2, spread=True).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        quant_top, quant_bottom, codes_top, codes_bottom, _ = model.encode(x)
        assert len(codes_top.unique()) > 5 and len(codes_bottom.unique()) > 5
        got_top, got_bottom = model.get_code_indices(x)
        assert torch.equal(got_top, codes_top) and torch.equal(got_bottom, codes_bottom)
        torch.testing.assert_close(model.decode_codes(codes_top, codes_bottom), model.decode(quant_top, quant_bottom),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize('cls', [VQVAE, VQVAE2])
def test_the_per_level_interface_round_trips_through_the_codes(cls):
    model = tiny_model(cls, spread=True).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = model.level_codes(x)
        assert tuple(codes) == cls.levels
        indices = model.get_code_indices(x)
        for level, expected in zip(cls.levels, indices if isinstance(indices, tuple) else (indices,)):
            assert torch.equal(codes[level], expected)
            assert tuple(codes[level].shape) == (2, *model.level_shapes()[level])
        shapes = model.code_shape()
        assert list(model.level_shapes().values()) == (list(shapes) if cls is VQVAE2 else [shapes])
        assert list(model.level_shapes(64).values())[-1] == (16, 16)
        images = model.decode_level_codes(codes)
        assert images.shape == x.shape
        assert torch.equal(images, model.decode_codes(*codes.values()))
        # The codes decode to what the model reconstructs from the image itself.
        torch.testing.assert_close(images, model(x)[0], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# Configs

def test_the_config_holds_every_setting_and_rebuilds_the_same_model():
    model = tiny_model(VQVAE2)
    assert model.config == {**dict(in_channels=3, image_size=32, num_res_blocks=1, downsample=4, commitment_cost=0.25,
                                   ema=True, decay=0.99, dead_code_threshold=1.0), **TINY}
    torch.manual_seed(0)
    rebuilt = build_model('vq_vae2', model.config)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert count_parameters('vq_vae2', model.config) == sum(p.numel() for p in model.parameters())
    for preset in VQ_PRESETS.values():  # every preset is a valid config
        count_parameters('vq_vae2', preset)  # builds it without allocating its weights


@pytest.mark.parametrize('overrides, message', [
    (dict(hidden_size=16), 'unknown setting hidden_size'),
    (dict(hidden_channels='16'), 'hidden_channels must be an integer'),
    (dict(hidden_channels=16.0), 'hidden_channels must be an integer'),
    (dict(ema=1), 'ema must be true or false'),
    (dict(num_embeddings=1), 'num_embeddings must be >= 2'),
    (dict(num_embeddings=40000), 'num_embeddings must be <= 32768'),
    (dict(decay=1.0), 'decay must be < 1.0'),
    (dict(commitment_cost=float('nan')), 'commitment_cost must be a finite number'),
    (dict(downsample=3), 'downsample must be one of 2, 4, 8'),
    (dict(image_size=None), 'image_size must be set'),
])
def test_a_bad_config_is_refused_with_a_config_error_naming_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        VQVAE(**{**TINY, **overrides})
    with pytest.raises(ConfigError, match=message):
        build_model('vq_vae2', {**TINY, **overrides})


def test_build_model_refuses_an_unknown_kind_and_check_value_converts_ints_to_floats():
    with pytest.raises(ConfigError, match='unknown model kind'):
        build_model('vq_gan', {})
    assert check_value('decay', float, 1, {}) == 1.0 and isinstance(check_value('decay', float, 1, {}), float)


# -----------------------------------------------------------------------------
# Checkpoints

@pytest.mark.parametrize('cls', [VQVAE, VQVAE2])
def test_checkpoint_round_trip_rebuilds_an_identical_model(cls, tmp_path):
    model = tiny_model(cls, spread=True)  # trained a step, so the EMA buffers differ from a fresh model's
    path = tmp_path / 'model.pth'
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict()}, path)

    raw = torch.load(path, weights_only=True)
    assert raw['kind'] == cls.kind and raw['config'] == model.config

    torch.manual_seed(123)  # the rebuilt model starts from different random weights
    loaded = load_model(path)
    assert type(loaded) is cls and not loaded.training
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert any('cluster_size' in name for name in got)  # the EMA buffers travel with the weights

    model.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    path = tmp_path / 'vq.pth'
    model = tiny_model(VQVAE)
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, kinds=('pixelcnn',))
    with pytest.raises(CheckpointError):
        load_model(path, kinds=('pixelcnn', 'hierarchical_pixelcnn'))
    assert load_checkpoint(path, kinds=('vq_vae',))['kind'] == 'vq_vae'


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    model = tiny_model(VQVAE)
    path = tmp_path / 'vq.pth'
    save_checkpoint({'kind': model.kind, 'config': {**model.config, 'num_embeddings': 64},
                     'model': model.state_dict()}, path)
    with pytest.raises(CheckpointError, match='do not fit a vq_vae built from the stored config: .*quantizer'):
        load_model(path)


@pytest.mark.parametrize('config, message', [
    ({**TINY, 'image_size': 32, 'colour': True}, 'config: unknown setting colour'),
    ({**TINY, 'image_size': 30}, 'config: image size 30 is not divisible'),
    ([1, 2], 'config must be a dict'),
])
def test_checkpoint_whose_config_is_bad_is_refused_naming_the_problem(tmp_path, config, message):
    path = tmp_path / 'vq.pth'
    save_checkpoint({'kind': 'vq_vae', 'config': config, 'model': tiny_model(VQVAE).state_dict()}, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint(tmp_path / 'missing.pth')
    with pytest.raises(CheckpointError, match='is a directory'):
        load_checkpoint(tmp_path)

    good = tmp_path / 'good.pth'
    model = tiny_model(VQVAE)
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict()}, good)
    content = good.read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(content[:len(content) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)

    garbage = tmp_path / 'garbage.pth'
    torch.manual_seed(0)
    garbage.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)

    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)

    not_ours = tmp_path / 'not_ours.pth'
    torch.save({'state_dict': model.state_dict()}, not_ours)
    with pytest.raises(CheckpointError):
        load_checkpoint(not_ours)


class ShellPayload:
    """Unpickles by running a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(self.marker)}',)


class OpenPayload:
    """Unpickles by creating `marker` with builtins.open."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, 'w')


@pytest.mark.parametrize('payload', [ShellPayload, OpenPayload])
def test_checkpoint_that_would_run_code_is_refused_without_running_it(payload, tmp_path):
    # The payload is live: an unsafe load does create its marker.
    live_marker = tmp_path / 'live_marker'
    live = tmp_path / 'live.pth'
    torch.save({'kind': 'vq_vae', 'config': {}, 'model': payload(live_marker)}, live)
    loaded = torch.load(live, weights_only=False)
    if hasattr(loaded['model'], 'close'):
        loaded['model'].close()
    assert live_marker.exists()

    marker = tmp_path / 'marker'
    evil = tmp_path / 'evil.pth'
    torch.save({'kind': 'vq_vae', 'config': {}, 'model': payload(marker)}, evil)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        load_model(evil)
    assert not marker.exists()


def test_save_checkpoint_leaves_only_the_complete_file(tmp_path):
    model = tiny_model(VQVAE)
    state = {'kind': model.kind, 'config': model.config, 'model': model.state_dict()}
    path = tmp_path / 'model.pth'
    save_checkpoint(state, path)
    save_checkpoint({**state, 'epoch': 2}, path)  # overwriting is atomic too
    assert os.listdir(tmp_path) == ['model.pth']
    assert load_checkpoint(path)['epoch'] == 2


def test_save_checkpoint_interrupted_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = tiny_model(VQVAE)
    state = {'kind': model.kind, 'config': model.config, 'model': model.state_dict()}
    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)
        raise KeyboardInterrupt('killed while writing')

    new_path = tmp_path / 'new.pth'
    old_path = tmp_path / 'old.pth'
    save_checkpoint({**state, 'epoch': 1}, old_path)
    monkeypatch.setattr(checkpoint_module.torch, 'save', crash_half_way)
    for path in (new_path, old_path):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint({**state, 'epoch': 2}, path)
    monkeypatch.undo()

    assert not new_path.exists()
    assert load_checkpoint(old_path)['epoch'] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ['old.pth']
