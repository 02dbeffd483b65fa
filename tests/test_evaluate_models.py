"""evaluate.py on models (--vq_checkpoint, --prior_checkpoint) through the real script: bits per dimension add up,
beat uniform pixels on a trained model and match an independent computation from the prior's losses; the JSON has
every section; a class-conditional prior's samples are class-balanced and scored; without a prior only the decoder
part is reported; checkpoints that do not fit end in one line and write nothing."""
import json
import math
import os

import pytest
import torch

from common.codes import extract_codes
from common.data import build_dataset, to_uint8
from common.features import SmallCNN, to_float
from common.metrics import discretized_gaussian_bits_per_dim
from evaluate import read_sample_folder
from helpers import (TINY_PRIOR, TINY_STAGE1, assert_one_line_error, assert_succeeded, derive_checkpoint,
                     run_in_process)
from models import load_model

# TINY_STAGE1 on 16x16 shapes with a bottom grid of 8x8 codes, for 150 steps: its 30 steps at 32x32 leave an MSE
# near 0.4, a decoder worse than uniform pixels (8.4 bits/dim); this one reaches an MSE near 0.05 in a few seconds.
STAGE1 = [*TINY_STAGE1, '--image_size', '16', '--downsample', '2', '--epochs', '5', '--max_steps', '150']
# A feature classifier that trains in a few seconds, the same recipe for CAS and its baseline.
TINY_CLASSIFIER = ['--classifier_num_train', '1500', '--classifier_epochs', '1', '--classifier_min_steps', '100']
NUM_SAMPLES = 60  # ten per shape class


def run_ok(args):
    """Run a script in this process; it must succeed."""
    result = run_in_process(args)
    assert_succeeded(result)
    return result


@pytest.fixture(scope='module')
def trained(tmp_path_factory, classifier_dir):
    """A VQ-VAE-2 trained through main.py (STAGE1) and a class-conditional prior of its codes (TINY_PRIOR)."""
    root = tmp_path_factory.mktemp('evaluate_models')
    run_ok(['main.py', '--arch', 'vq_vae2', *STAGE1, '--out_dir', root / 'vq_vae2'])
    run_ok(['train_pixelcnn_vqvae2.py', '--vqvae2_checkpoint', root / 'vq_vae2' / 'best.pth', *TINY_PRIOR,
            '--class_conditional', '--out_dir', root / 'prior'])
    return {'root': root, 'vq': str(root / 'vq_vae2' / 'best.pth'), 'prior': str(root / 'prior' / 'best.pth'),
            'classifiers': classifier_dir}


def evaluate_command(trained, name, *flags):
    """An evaluate.py command line writing into <root>/out_<name>, with the session's classifier cache (the 16px
    classifier of TINY_CLASSIFIER is test_evaluate.py's too: it trains once)."""
    return ['evaluate.py', '--out_dir', trained['root'] / f'out_{name}', '--device', 'cpu',
            '--classifier_dir', trained['classifiers'], *flags]


@pytest.fixture(scope='module')
def models_run(trained):
    """evaluate.py on the VQ-VAE-2 and its prior, saving the samples: (stdout, the JSON result)."""
    result = run_ok(evaluate_command(
        trained, 'models', '--vq_checkpoint', trained['vq'], '--prior_checkpoint', trained['prior'],
        '--num_samples', str(NUM_SAMPLES), '--sample_batch_size', '25', '--num_fit', '300', '--num_real', '300',
        '--save_samples', trained['root'] / 'samples', *TINY_CLASSIFIER))
    with open(trained['root'] / 'out_models' / 'eval.json') as f:
        return result.stdout, json.load(f)


def test_bits_per_dim_is_the_sum_of_its_parts_and_beats_uniform_pixels(models_run):
    _, result = models_run
    latent, decoder = result['latent_bits_per_dim'], result['decoder_bits_per_dim']
    assert result['bits_per_dim'] == pytest.approx(latent + decoder, rel=1e-12)
    assert 0 < latent < 1 and 0 < decoder < 8
    assert result['bits_per_dim'] < 8  # 8 bits/dim: every pixel value equally likely
    assert len(result['decoder_log_scales']) == 3


def test_latent_and_decoder_parts_match_an_independent_computation(trained, models_run):
    """The latent part is the prior's summed test nats / ln 2 / (C*H*W) per image, from its own level_losses."""
    _, result = models_run
    vq, prior = load_model(trained['vq']), load_model(trained['prior'])
    test_set, _ = build_dataset('shapes', 'test', 16, seed=0)
    codes = extract_codes(vq, test_set, batch_size=500, device='cpu')
    levels = {level: grid.long() for level, grid in codes['levels'].items()}
    with torch.no_grad():
        nats = {level: float(value) for level, value in
                prior.level_losses(levels, codes['labels'], reduction='sum').items()}
        recon = vq.decode_level_codes(levels)
    num_images, dims = len(test_set), 3 * 16 * 16
    assert result['num_test'] == num_images == 2000
    assert result['latent_bits_per_dim'] == pytest.approx(sum(nats.values()) / math.log(2) / dims / num_images,
                                                          rel=1e-5)
    for level, (h, w) in vq.level_shapes().items():
        assert result['prior'][f'bits_per_code/{level}'] == pytest.approx(
            nats[level] / math.log(2) / (num_images * h * w), rel=1e-5)
    assert result['prior']['bits_per_code'] == pytest.approx(sum(nats.values()) / math.log(2) / (num_images * 80),
                                                             rel=1e-5)  # 4x4 top + 8x8 bottom codes per image
    images = torch.stack([test_set[index][0] for index in range(num_images)])
    decoder = discretized_gaussian_bits_per_dim(images, recon, torch.tensor(result['decoder_log_scales']))
    assert result['decoder_bits_per_dim'] == pytest.approx(float(decoder.mean()), rel=1e-5)

    # How the dataset classifier (the cached one this run used: 1500 training images) sees the 8-bit reconstructions.
    folder = trained['classifiers']
    states = [torch.load(os.path.join(folder, name), weights_only=True) for name in sorted(os.listdir(folder))
              if name.startswith('classifier_shapes_16px_')]
    state, = [state for state in states if state['key']['num_train'] == 1500]
    classifier = SmallCNN(**state['config'])
    classifier.load_state_dict(state['model'])
    with torch.no_grad():
        probs = classifier.eval()(to_float(to_uint8(recon)))[1].softmax(1)
    reconstruction = result['reconstruction']
    assert reconstruction['confident_fraction'] == pytest.approx(float((probs.max(1).values >= 0.9).float().mean()),
                                                                 abs=1e-3)
    assert reconstruction['classifier_accuracy'] == pytest.approx(
        float((probs.argmax(1) == codes['labels']).float().mean()), abs=1e-3)


def test_models_mode_writes_every_section_and_scores_class_balanced_samples(trained, models_run):
    stdout, result = models_run
    reconstruction = result['reconstruction']
    assert set(reconstruction) == {'mse', 'psnr', 'perplexity/top', 'perplexity/bottom', 'code_usage/top',
                                   'code_usage/bottom', 'confident_fraction', 'classifier_accuracy'}
    assert reconstruction['psnr'] == pytest.approx(10 * math.log10(4 / reconstruction['mse']))
    assert 1 <= reconstruction['perplexity/bottom'] <= 32 and 0 < reconstruction['code_usage/bottom'] <= 1
    assert set(result['prior']) == {'bits_per_code/top', 'bits_per_code/bottom', 'bits_per_code'}
    assert result['num_fit'] == 300 and result['image_size'] == 16 and result['class_conditional']
    scores = result['scores']
    assert result['num_samples'] == NUM_SAMPLES and result['confidence_threshold'] == 0.9
    assert {'fid', 'kid_mean', 'precision', 'recall', 'cas', 'cas_real_baseline', 'classifier_test_accuracy'} <= set(
        scores)
    assert 0 <= scores['confident_fraction'] <= 1 and 0 <= scores['cas'] <= 1
    for name in ('bits_per_dim', 'latent_bits_per_dim', 'decoder_bits_per_dim', 'fid', 'confident_fraction'):
        assert name in stdout
    # The saved samples: one subfolder per class, every class drawn equally often; --samples reads them back.
    images, labels = read_sample_folder(str(trained['root'] / 'samples'), build_dataset('shapes', 'test', 16)[1])
    assert images.shape == (NUM_SAMPLES, 3, 16, 16)
    assert torch.bincount(labels).tolist() == [NUM_SAMPLES // 6] * 6


def test_without_a_prior_only_the_decoder_part_is_reported(stage1, tmp_path):
    result = run_ok(['evaluate.py', '--vq_checkpoint', stage1['vq_vae'].path(), '--num_fit', '200',
                     '--json', tmp_path / 'eval.json', '--out_dir', tmp_path / 'unused', '--device', 'cpu',
                     '--classifier_dir', tmp_path / 'classifiers', *TINY_CLASSIFIER])  # its own: other data
    with open(tmp_path / 'eval.json') as f:
        evaluation = json.load(f)
    assert set(evaluation['reconstruction']) == {'mse', 'psnr', 'perplexity/flat', 'code_usage/flat',
                                                 'confident_fraction', 'classifier_accuracy'}
    assert evaluation['prior'] is None and evaluation['latent_bits_per_dim'] is None
    assert evaluation['bits_per_dim'] is None and evaluation['decoder_bits_per_dim'] > 0
    assert 'scores' not in evaluation and not os.path.exists(tmp_path / 'unused')
    assert 'needs a prior' in result.stdout


def test_num_samples_0_scores_the_models_only_with_the_same_bits(trained, models_run):
    """--num_samples 0 (the recipe's bits-only evaluation): no samples drawn, no scores, the same model numbers."""
    _, full = models_run
    result = run_ok(evaluate_command(trained, 'no_samples', '--vq_checkpoint', trained['vq'], '--prior_checkpoint',
                                     trained['prior'], '--num_samples', '0', '--num_fit', '300', *TINY_CLASSIFIER))
    with open(trained['root'] / 'out_no_samples' / 'eval.json') as f:
        evaluation = json.load(f)
    assert 'scores' not in evaluation and 'num_samples' not in evaluation and 'samples from' not in result.stdout
    assert evaluation['prior'] == pytest.approx(full['prior'], rel=1e-9)
    assert evaluation['bits_per_dim'] == pytest.approx(full['bits_per_dim'], rel=1e-9)


BAD_INPUT = {  # name -> (flags, with {name} for a path of the test; a fragment of the one-line error)
    'nothing_to_evaluate': ([], 'nothing to evaluate'),
    'prior_without_vq': (['--prior_checkpoint', '{prior}'], '--prior_checkpoint needs --vq_checkpoint'),
    'prior_of_other_grids': (['--vq_checkpoint', '{vq_32px}', '--prior_checkpoint', '{prior}'],
                             'was trained on code grids'),
    'prior_of_other_levels': (['--vq_checkpoint', '{vq}', '--prior_checkpoint', '{flat_prior}'],
                              'checkpoint is needed'),
    'other_image_size': (['--vq_checkpoint', '{vq}', '--image_size', '32'], 'differs from'),
    'save_samples_without_prior': (['--vq_checkpoint', '{vq}', '--save_samples', '{root}/kept'], '--save_samples'),
    'save_samples_of_no_samples': (['--vq_checkpoint', '{vq}', '--prior_checkpoint', '{prior}', '--num_samples', '0',
                                    '--save_samples', '{root}/kept'], '--num_samples above 0'),
    'negative_num_samples': (['--vq_checkpoint', '{vq}', '--num_samples', '-1'], '--num_samples'),
}


@pytest.mark.parametrize('name', list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(trained, priors, name):
    paths = {'root': trained['root'], 'vq': trained['vq'], 'prior': trained['prior'],
             'flat_prior': priors['flat'].path(),
             # The same weights for 32x32 images: 8x8 and 16x16 code grids, not the prior's 4x4 and 8x8.
             'vq_32px': derive_checkpoint(trained['vq'], trained['root'] / 'vq_32px.pth',
                                          lambda state: state['config'].update(image_size=32))}
    flags, fragment = BAD_INPUT[name]
    out_dir = trained['root'] / f'out_{name}'
    result = run_in_process(evaluate_command(trained, name, *[flag.format(**paths) for flag in flags]))
    assert_one_line_error(result, out_dir)
    assert fragment in result.stderr
    assert not os.path.exists(out_dir) and not os.path.exists(trained['root'] / 'kept')
