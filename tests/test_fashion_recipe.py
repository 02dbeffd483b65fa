"""A tiny version of the Fashion-MNIST recipe (bench/reproduce_fashion_mnist.py): every stage for a few steps, then
the evaluation, the results table and the pictures; and what stage 1 makes of the real one-channel data.

The recipe runs each stage as `python <script> ...`; here those commands run in this process (helpers.run_in_process),
with tiny model flags appended, so the recipe's own logic and the real scripts run without five more torch imports
and minutes of default-size models. Skips cleanly where Debian's dataset-fashion-mnist is not installed.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO, assert_succeeded, load_state, run_in_process

NUM_EMBEDDINGS = 32
TINY_FLAGS = {  # appended to each stage's command line: later flags win
    'main.py': ['--hidden_channels', '16', '--res_channels', '8', '--num_res_blocks', '1', '--num_embeddings',
                str(NUM_EMBEDDINGS), '--embedding_dim', '8'],
    'train_pixelcnn_vqvae.py': ['--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8'],
    'train_pixelcnn_vqvae2.py': ['--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8'],
}


@pytest.fixture(scope='module')
def recipe(fashion_data_dir, tmp_path_factory, monkeypatch_module):
    """The recipe's results folder, after a run at --scale 0.005 (7 steps per stage) on 256 training images."""
    stages = []
    real_run = subprocess.run

    def run_stage_in_process(command, cwd=None, check=False, **kwargs):
        if command[0] != sys.executable or command[1] not in TINY_FLAGS:
            return real_run(command, cwd=cwd, check=check, **kwargs)
        stages.append(command[1:])
        result = run_in_process([*command[1:], *TINY_FLAGS[command[1]]], cwd=cwd or REPO)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
        return result

    monkeypatch_module.setattr(subprocess, 'run', run_stage_in_process)
    out_dir = tmp_path_factory.mktemp('fashion_recipe') / 'results'
    result = run_in_process(['bench/reproduce_fashion_mnist.py', '--scale', '0.005', '--num_train', '256',
                             '--num_val', '32', '--num_test', '64', '--vq_batch_size', '32', '--prior_batch_size',
                             '32', '--out_dir', out_dir, '--data_dir', fashion_data_dir, '--quiet'])
    assert_succeeded(result)
    assert [stage[0] for stage in stages] == ['main.py', 'main.py', 'train_pixelcnn_vqvae.py',
                                              'train_pixelcnn_vqvae2.py', 'train_pixelcnn_vqvae2.py']
    return out_dir


@pytest.fixture(scope='module')
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


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


def test_stage_1_reads_fashion_mnist_as_one_channel_with_ten_classes(recipe, fashion_data_dir):
    checkpoint = load_state(recipe / 'vq_vae' / 'best.pth')
    assert checkpoint['config']['in_channels'] == checkpoint['data']['in_channels'] == 1
    assert checkpoint['config']['image_size'] == 32  # 28x28 padded with the black background
    assert checkpoint['data']['name'] == 'fashion_mnist' and checkpoint['data']['num_classes'] == 10
    assert checkpoint['data']['data_dir'] == os.path.abspath(fashion_data_dir)
    assert os.listdir(fashion_data_dir / 'FashionMNIST' / 'raw')
    # The class-conditional prior took its ten classes from there.
    assert load_state(recipe / 'prior_vqvae2_classes' / 'best.pth')['config']['num_classes'] == 10
