"""A tiny version of the Fashion-MNIST recipe (bench/reproduce_fashion_mnist.py): every stage for a few steps.

Runs where Debian's dataset-fashion-mnist is installed (.ci/run installs it) and skips cleanly elsewhere.
"""
import json
import os

import pytest

from helpers import assert_succeeded, run_script

FASHION = '/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz'


@pytest.mark.skipif(not os.path.exists(FASHION), reason='needs apt-get install dataset-fashion-mnist')
def test_tiny_recipe_writes_the_results_table_and_pictures(tmp_path):
    out_dir = tmp_path / 'results'
    result = run_script(['bench/reproduce_fashion_mnist.py', '--scale', '0.01', '--num_train', '256',
                         '--num_val', '32', '--num_test', '64', '--vq_batch_size', '32', '--prior_batch_size', '32',
                         '--out_dir', out_dir, '--data_dir', tmp_path / 'data', '--quiet'])
    assert_succeeded(result)
    with open(out_dir / 'results.json') as f:
        results = json.load(f)['results']
    for vq_name, levels in (('vq_vae', ['codes']), ('vq_vae2', ['codes_top', 'codes_bottom'])):
        assert 0 < results[vq_name]['test_mse'] < 4 and results[vq_name]['test_psnr'] > 0
        for level in levels:
            assert 0 < results[vq_name][f'{level}_usage'] <= 1
            assert 0 < results[vq_name][f'{level}_unigram_bits'] <= 9  # log2(512 codes) = 9
    for prior_name in ('prior_vqvae', 'prior_vqvae2', 'prior_vqvae2_classes'):
        assert all(0 < b < 12 for b in results[prior_name]['test_bits'].values())
        assert results[prior_name]['sampling_seconds_per_image'] > 0
        assert (out_dir / f'{prior_name}_samples.png').stat().st_size > 0
    assert (out_dir / 'vq_vae2_recon.png').exists()
    table = (out_dir / 'results.md').read_text()
    assert table.count('\n| vq_vae') == 5 and 'unigram bits/code' in table
