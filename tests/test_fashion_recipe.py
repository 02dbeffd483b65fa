"""A tiny version of the Fashion-MNIST recipe (bench/reproduce_fashion_mnist.py): every stage for a few steps, then
the evaluation, the results table and the pictures; and what stage 1 makes of the real one-channel data.

The recipe runs in a fork of the test process as the session starts (tests/background.py, fashion_recipe: its stage
commands run in-process, with tiny model flags). Skips cleanly where Debian's dataset-fashion-mnist is not installed.
"""
import json
import math
import os

import pytest

from background import TINY_RECIPE_FLAGS
from helpers import load_state

NUM_EMBEDDINGS = int(TINY_RECIPE_FLAGS['main.py'][TINY_RECIPE_FLAGS['main.py'].index('--num_embeddings') + 1])


@pytest.fixture(scope='module')
def recipe(fashion_job):
    """The recipe's results folder."""
    out_dir, stages = fashion_job.result()
    scripts = [stage[0] for stage in stages]
    assert scripts.count('main.py') == 2 and {'train_pixelcnn_vqvae.py', 'train_pixelcnn_vqvae2.py'} <= set(scripts)
    return out_dir


def test_tiny_recipe_writes_the_results_table_and_pictures(recipe):
    with open(recipe / 'results.json') as f:
        results = json.load(f)['results']
    for vq_name, levels in (('vq_vae', ['codes']), ('vq_vae2', ['codes_top', 'codes_bottom'])):
        assert 0 < results[vq_name]['test_mse'] < 4 and results[vq_name]['test_psnr'] > 0
        for level in levels:
            assert 0 < results[vq_name][f'{level}_usage'] <= 1
            assert 1 <= results[vq_name][f'{level}_perplexity'] <= NUM_EMBEDDINGS
            assert 0 < results[vq_name][f'{level}_unigram_bits'] <= math.log2(NUM_EMBEDDINGS) + 1
    for prior_name, levels in (('prior_vqvae', ['codes']), ('prior_vqvae2', ['codes_top', 'codes_bottom']),
                               ('prior_vqvae2_classes', ['codes_top', 'codes_bottom'])):
        assert sorted(results[prior_name]['test_bits']) == sorted(levels)
        assert all(0 < bits < 12 for bits in results[prior_name]['test_bits'].values())
        assert results[prior_name]['sampling_seconds_per_image'] > 0
        assert (recipe / f'{prior_name}_samples.png').stat().st_size > 0
    assert (recipe / 'vq_vae2_recon.png').exists()
    table = (recipe / 'results.md').read_text()
    assert table.count('\n| vq_vae') == 5 and 'unigram bits/code' in table


def test_stage_1_reads_fashion_mnist_as_one_channel_with_ten_classes(recipe):
    checkpoint = load_state(recipe / 'vq_vae' / 'best.pth')
    assert checkpoint['config']['in_channels'] == checkpoint['data']['in_channels'] == 1
    assert checkpoint['config']['image_size'] == 32  # 28x28 padded with the black background
    assert checkpoint['data']['name'] == 'fashion_mnist' and checkpoint['data']['num_classes'] == 10
    data_dir = checkpoint['data']['data_dir']
    assert os.path.isabs(data_dir) and os.listdir(os.path.join(data_dir, 'FashionMNIST', 'raw'))
    # The class-conditional prior took its ten classes from there.
    assert load_state(recipe / 'prior_vqvae2_classes' / 'best.pth')['config']['num_classes'] == 10
