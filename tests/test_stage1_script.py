"""Stage 1 through the real main.py: a few steps lower the validation MSE below an untrained model's, the files a run
writes and what its checkpoint holds, W&B offline, and bad input ending in one line on stderr, exit status 2, no files.

Every run spends seconds importing torch, so the `runs` fixture starts them all at once and the tests check the
finished results.
"""
import json
import os

import pytest
import torch

from common.data import FASHION_MNIST_SYSTEM_DIR, build_dataset
from helpers import (TINY_STAGE1, assert_one_line_error, assert_succeeded, run_scripts, save_tiny_prior,
                     write_random_bytes)
from models import VQVAE, VQVAE2, build_model, load_model

HAS_FASHION_MNIST = os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, 'train-images-idx3-ubyte.gz'))
CHECKPOINT_KEYS = {'kind', 'config', 'model', 'optimizer', 'epoch', 'step', 'metrics', 'data', 'image_size',
                   'format_version'}

GOOD_RUNS = {
    'vq_vae': ['--arch', 'vq_vae'],
    'vq_vae2': ['--arch', 'vq_vae2'],
    'wandb': ['--arch', 'vq_vae', '--max_steps', '2', '--wandb'],
}
if HAS_FASHION_MNIST:
    GOOD_RUNS['fashion_mnist'] = ['--arch', 'vq_vae', '--dataset', 'fashion_mnist', '--data_dir', '{fashion_dir}']
# name -> (flags after TINY_STAGE1, a fragment the one-line error must contain)
BAD_INPUTS = {
    'unknown_arch': (['--arch', 'vq_gan'], '--arch'),
    'unknown_dataset': (['--dataset', 'imagenet'], '--dataset'),
    'image_size_not_divisible': (['--arch', 'vq_vae2', '--image_size', '30'], 'not divisible'),
    'cifar10_offline': (['--dataset', 'cifar10', '--data_dir', '{empty_dir}'],
                        'the download failed; put cifar-10-python.tar.gz'),
    'resume_missing': (['--resume', '{missing}'], 'not found'),
    'resume_corrupt': (['--resume', '{corrupt}'], 'corrupt.pth'),
    'resume_prior': (['--resume', '{prior}'], 'holds a pixelcnn model'),
    'batch_size_0': (['--batch_size', '0'], '--batch_size'),
    'lr_negative': (['--lr', '-1'], '--lr'),
    'out_dir_under_a_file': ([], 'cannot write to output folder'),
    'empty_imagefolder': (['--dataset', 'imagefolder', '--data_dir', '{empty_dir}'], 'no images'),
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """name -> (finished process, its --out_dir) for every run in GOOD_RUNS and BAD_INPUTS."""
    folder = tmp_path_factory.mktemp('stage1')
    paths = {'fashion_dir': folder / 'fashion_data', 'empty_dir': folder / 'empty', 'missing': folder / 'missing.pth',
             'corrupt': folder / 'corrupt.pth', 'prior': folder / 'prior.pth', 'a_file': folder / 'a_file'}
    paths['empty_dir'].mkdir()
    write_random_bytes(paths['corrupt'])
    save_tiny_prior(paths['prior'])
    paths['a_file'].write_text('a file, not a folder\n')

    commands, out_dirs = {}, {}
    for name, flags in {**GOOD_RUNS, **{name: flags for name, (flags, _) in BAD_INPUTS.items()}}.items():
        out_dirs[name] = paths['a_file'] / 'sub' if name == 'out_dir_under_a_file' else folder / 'out' / name
        commands[name] = (['main.py'] + TINY_STAGE1 + [flag.format(**paths) for flag in flags] +
                          ['--out_dir', out_dirs[name]])
    results = run_scripts(commands)
    return {name: (result, out_dirs[name]) for name, result in results.items()}


def read_metrics(out_dir):
    with open(out_dir / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


def untrained_val_mse(checkpoint):
    """Validation MSE of the model main.py starts from (same config and seed), on the same validation images."""
    data = checkpoint['data']
    val_set, _ = build_dataset(data['name'], 'val', data['image_size'], data['data_dir'], seed=data['seed'],
                               download=False, num_samples=data['num_samples']['val'])
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    torch.manual_seed(0)  # main.py's default --seed
    model = build_model(checkpoint['kind'], checkpoint['config']).eval()
    with torch.no_grad():
        recon, _ = model(images)
    return float((recon - images).pow(2).mean())


@pytest.mark.parametrize('name, model_class, code_shape', [
    ('vq_vae', VQVAE, (8, 8)),
    ('vq_vae2', VQVAE2, ((4, 4), (8, 8))),
    pytest.param('fashion_mnist', VQVAE, (8, 8), marks=pytest.mark.skipif(
        not HAS_FASHION_MNIST, reason=f'Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR}')),
])
def test_a_short_run_lowers_the_validation_mse_and_writes_checkpoints_and_images(runs, name, model_class,
                                                                                  code_shape):
    result, out_dir = runs[name]
    assert_succeeded(result)
    assert f'code grid {code_shape}' in result.stdout
    assert {'last.pth', 'best.pth', 'reconstructions.png', 'metrics.jsonl'} <= set(os.listdir(out_dir))

    (final,) = read_metrics(out_dir)  # one validation: the 30 steps are one epoch
    assert final['step'] == 30
    assert f"final validation: mse {final['val_mse']:.4g}" in result.stdout
    checkpoint = torch.load(out_dir / 'last.pth', map_location='cpu', weights_only=True)
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert final['val_mse'] < 0.95 * untrained_val_mse(checkpoint)

    assert checkpoint['kind'] == model_class.kind and checkpoint['step'] == 30
    assert checkpoint['metrics']['val_mse'] == final['val_mse']
    assert checkpoint['data']['num_samples'] == {'train': 480, 'val': 128}
    assert checkpoint['image_size'] == checkpoint['data']['image_size'] == 32
    for file_name in ('last.pth', 'best.pth'):
        model = load_model(out_dir / file_name)
        assert type(model) is model_class and model.code_shape() == code_shape
        assert model.config == checkpoint['config']
        # The rebuilt model holds the trained weights, not a fresh initialisation.
        assert all(torch.equal(value, checkpoint['model'][key]) for key, value in model.state_dict().items())


def test_fashion_mnist_is_unpacked_into_data_dir_as_one_channel(runs):
    if not HAS_FASHION_MNIST:
        pytest.skip(f'Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR}')
    result, out_dir = runs['fashion_mnist']
    assert_succeeded(result)
    checkpoint = torch.load(out_dir / 'best.pth', map_location='cpu', weights_only=True)
    assert checkpoint['config']['in_channels'] == checkpoint['data']['in_channels'] == 1
    assert checkpoint['data']['name'] == 'fashion_mnist' and checkpoint['data']['num_classes'] == 10
    assert os.listdir(os.path.join(checkpoint['data']['data_dir'], 'FashionMNIST', 'raw'))


def test_wandb_offline_writes_a_run_under_out_dir(runs):
    result, out_dir = runs['wandb']
    assert_succeeded(result)
    assert read_metrics(out_dir)[-1]['step'] == 2
    assert any(entry.startswith('offline-run-') for entry in os.listdir(out_dir / 'wandb'))


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(runs, name):
    result, out_dir = runs[name]
    line = assert_one_line_error(result, out_dir)
    assert BAD_INPUTS[name][1] in line
