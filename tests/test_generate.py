"""Stage 3 through the real scripts, on the checkpoints the session's chained run trained (stage 1 -> 2 -> 3): the files
written, decoded samples that match their codes, seed determinism whatever the batch size, the cached sampler drawing
the same codes as the naive one, top-k/top-p wiring, and bad input ending in one line on stderr, exit status 2 and no
files. Mismatched or damaged checkpoints are derived from the real ones.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import to_uint8
from common.sampling import sample_seed
from helpers import (ScriptRun, assert_one_line_error, assert_succeeded, derive_checkpoint, load_state, run_in_process,
                     run_ok, sampling_args, write_random_bytes)
from models import load_model

VQVAE_SCRIPT = 'generate_samples_pixelcnn_vqvae.py'
VQVAE2_SCRIPT = 'generate_samples_pixelcnn_vqvae2.py'
NUM_EMBEDDINGS = 32


def load_codes(run):
    return load_state(run.path('codes.pt'))


def tweak_one_weight(state):
    """A retrained VQ model, as far as its file's content goes."""
    name = next(name for name, value in state['model'].items() if value.is_floating_point())
    state['model'][name] = state['model'][name].clone()
    state['model'][name].view(-1)[0] += 0.01


def smaller_codebook(state):
    """The VQ model with its first 16 codes only: a VQ checkpoint whose codebook size the prior does not model."""
    state['config'] = {**state['config'], 'num_embeddings': 16}
    state['model'] = {name: value[:16] if name.startswith('quantizer.') else value
                      for name, value in state['model'].items()}


def format_1(state):
    """The prior as format 1 stored it: one 'code_shape' grid instead of 'code_shapes' per level."""
    state['format_version'] = 1
    state['code_shape'] = state.pop('code_shapes')['flat']


@pytest.fixture(scope='module')
def paths(stage1, priors, tmp_path_factory):
    """The session's checkpoints and files derived from them."""
    folder = tmp_path_factory.mktemp('stage3_inputs')
    paths = {'vq': stage1['vq_vae'].path(), 'vq2': stage1['vq_vae2'].path(), 'prior': priors['flat'].path(),
             'prior2': priors['hierarchical'].path(), 'folder': folder}
    derive = {'vq2_retrained': ('vq2', tweak_one_weight), 'vq_k16': ('vq', smaller_codebook),
              'vq_16px': ('vq', lambda state: state['config'].update(image_size=16)),  # 4x4 codes, same weights
              'prior_format_1': ('prior', format_1),
              'prior_without_grids': ('prior', lambda state: state.pop('code_shapes')),
              'prior_bad_grids': ('prior', lambda state: state.update(code_shapes={'flat': [8, -8]}))}
    for name, (source, edit) in derive.items():
        paths[name] = derive_checkpoint(paths[source], folder / f'{name}.pth', edit)
    content = paths['prior'].read_bytes()
    paths['truncated'] = folder / 'truncated.pth'
    paths['truncated'].write_bytes(content[:len(content) // 2])
    paths['random_bytes'], paths['text'], paths['missing'] = (folder / name for name in
                                                              ('random_bytes.pth', 'text.pth', 'missing.pth'))
    write_random_bytes(paths['random_bytes'])
    paths['text'].write_text('this is not a checkpoint\n')
    return paths


MORE_RUNS = {  # name -> (a run of the session's `samples` fixture, flags that override its own)
    # Without --save_individual (which does not change the samples), and all 5 samples in one batch instead of 2+2+1.
    'flat_same_seed': ('flat', ['--batch_size', '5']),
    'flat_other_seed': ('flat', ['--seed', '2']),
    'flat_naive': ('flat', ['--naive']),
    'hierarchical_naive': ('hierarchical', ['--naive']),
    'flat_top_k_1': ('flat', ['--top_k', '1']),
    'flat_tiny_top_p': ('flat', ['--top_p', '1e-6', '--temperature', '2']),
}


@pytest.fixture(scope='module')
def runs(samples, stage1, priors, paths, tmp_path_factory):
    """The session's two sampling runs and the variations of MORE_RUNS, finished."""
    folder = tmp_path_factory.mktemp('stage3_more')
    more = {}
    for name, (base, flags) in MORE_RUNS.items():
        args = sampling_args(base, stage1, priors, *flags)
        if name == 'flat_same_seed':
            args.remove('--save_individual')
        more[name] = run_ok(args, folder / name)
    more['hierarchical_retrained_vq'] = ScriptRun(folder / 'retrained', run_in_process([
        VQVAE2_SCRIPT, '--vqvae2_checkpoint', paths['vq2_retrained'], '--prior_checkpoint', paths['prior2'],
        '--num_samples', '2', '--class_label', '2', '--out_dir', folder / 'retrained']))
    more['flat_format_1_prior'] = run_ok(sampling_args('flat', stage1, priors, '--prior_checkpoint',
                                                       paths['prior_format_1']), folder / 'format_1')
    return {**samples, **more}


def test_vqvae_script_writes_a_grid_the_codes_and_one_png_per_sample(runs):
    run = runs['flat']
    assert 'WARNING' not in run.result.stderr
    assert '5 samples (8x8 flat codes each) written to' in run.result.stdout
    # 5 images of 32x32 in rows of ceil(sqrt(5)) = 3, with make_grid's 2-pixel padding.
    assert Image.open(run.path('samples.png')).size == (3 * 34 + 2, 2 * 34 + 2)
    individual = sorted(name for name in os.listdir(run.out_dir) if name.startswith('sample_'))
    assert individual == [f'sample_{index:04d}.png' for index in range(5)]
    saved = load_codes(run)
    assert saved['codes'].shape == (5, 8, 8) and saved['codes'].dtype == torch.long
    assert 0 <= saved['codes'].min() and saved['codes'].max() < NUM_EMBEDDINGS
    assert len(saved['codes'].unique()) > 1
    assert 'class_labels' not in saved
    settings = saved['settings']
    assert settings['seed'] == 1 and settings['num_samples'] == 5 and settings['batch_size'] == 2
    assert settings['temperature'] == 1.0 and settings['naive'] is False
    assert settings['top_k'] is None and settings['top_p'] is None
    assert not {'out_dir', 'device', 'debug', 'save_individual'} & set(settings)


def test_the_pngs_are_the_vq_models_decoding_of_the_saved_codes(runs, paths):
    run = runs['flat']
    vq_model = load_model(paths['vq'])
    with torch.no_grad():
        images = vq_model.decode_level_codes({'flat': load_codes(run)['codes']})  # [5, 3, 32, 32] in [-1, 1]
    for index, image in enumerate(images):
        png = torch.from_numpy(np.array(Image.open(run.path(f'sample_{index:04d}.png')))).permute(2, 0, 1)
        # save_image rounds x * 255 + 0.5 down, to_uint8 rounds to even: at most 1 apart, on exact halves.
        assert (png.int() - to_uint8(image).int()).abs().max() <= 1, index


def test_vqvae2_script_writes_both_levels_with_every_class_in_turn(runs):
    run = runs['hierarchical']
    assert 'WARNING' not in run.result.stderr
    assert '4 samples (4x4 top and 8x8 bottom codes each)' in run.result.stdout
    assert Image.open(run.path('samples.png')).size == (2 * 34 + 2, 2 * 34 + 2)
    assert not any(name.startswith('sample_') for name in os.listdir(run.out_dir))
    saved = load_codes(run)
    assert saved['codes_top'].shape == (4, 4, 4) and saved['codes_bottom'].shape == (4, 8, 8)
    for codes in (saved['codes_top'], saved['codes_bottom']):
        assert codes.dtype == torch.long and 0 <= codes.min() and codes.max() < NUM_EMBEDDINGS
    assert saved['class_labels'].tolist() == [0, 1, 2, 3]  # the six shapes, in turn


def test_the_same_seed_gives_the_same_samples_whatever_the_batch_size(runs):
    first, again = load_codes(runs['flat']), load_codes(runs['flat_same_seed'])
    assert torch.equal(first['codes'], again['codes'])
    assert again['settings'] == {**first['settings'], 'batch_size': 5}
    # Each sample draws from a generator of its own: sample 4 alone in its batch of 1, or among 5, is the same.
    assert first['settings']['batch_size'] == 2


def test_another_seed_gives_other_codes(runs):
    assert not torch.equal(load_codes(runs['flat'])['codes'], load_codes(runs['flat_other_seed'])['codes'])
    # torch's CPU generator keeps only the low 32 bits of a seed: every (seed, sample) pair must differ there.
    assert len({sample_seed(seed, index) % 2 ** 32 for seed in range(3) for index in range(1000)}) == 3000


@pytest.mark.parametrize('cached, naive, names', [('flat', 'flat_naive', ['codes']),
                                                  ('hierarchical', 'hierarchical_naive',
                                                   ['codes_top', 'codes_bottom', 'class_labels'])])
def test_the_naive_sampler_draws_the_same_codes_as_the_cached_one(runs, cached, naive, names):
    fast, slow = load_codes(runs[cached]), load_codes(runs[naive])
    for name in names:
        assert torch.equal(fast[name], slow[name]), name
    assert slow['settings']['naive'] is True


def test_top_k_and_top_p_reach_the_sampler(runs, paths):
    top_k_1, tiny_top_p = load_codes(runs['flat_top_k_1']), load_codes(runs['flat_tiny_top_p'])
    assert tiny_top_p['settings']['top_p'] == 1e-6 and top_k_1['settings']['top_k'] == 1
    assert tiny_top_p['settings']['temperature'] == 2.0
    # Both keep only the most likely code at every position, whatever the temperature: each code is the argmax of
    # the prior's logits given the codes before it.
    assert torch.equal(top_k_1['codes'], tiny_top_p['codes'])
    prior = load_model(paths['prior'])
    with torch.no_grad():
        assert torch.equal(top_k_1['codes'], prior.level_logits({'flat': top_k_1['codes']})['flat'].argmax(1))
    assert not torch.equal(top_k_1['codes'], load_codes(runs['flat'])['codes'])


def test_a_retrained_vq_file_gives_a_one_line_warning_but_samples(runs):
    run = runs['hierarchical_retrained_vq']
    assert_succeeded(run.result)
    warnings = [line for line in run.result.stderr.splitlines() if 'WARNING' in line]
    assert len(warnings) == 1 and 'sha256' in warnings[0]
    assert load_codes(run)['class_labels'].tolist() == [2, 2]


def test_a_format_1_prior_checkpoint_samples_as_before(runs):
    assert load_state(runs['flat_format_1_prior'].path('codes.pt'))['codes'].equal(load_codes(runs['flat'])['codes'])


# ----------------------------------------------------------------------------------------------------------------
# Bad input

# name -> (command line, a fragment the one-line error must contain)
FLAT = [VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{prior}', '--num_samples', '2']
HIERARCHICAL = [VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq2}', '--prior_checkpoint', '{prior2}', '--num_samples', '2']
BAD_INPUTS = {
    'num_embeddings_mismatch': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq_k16}', '--prior_checkpoint', '{prior}'],
                                'models 32 codes but'),
    'grid_mismatch': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq_16px}', '--prior_checkpoint', '{prior}'],
                      "was trained on code grids {'flat': [8, 8]} but"),
    'prior_as_vqvae': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{prior}', '--prior_checkpoint', '{prior}'],
                       'holds a pixelcnn model, but a vq_vae checkpoint is needed'),
    'vqvae_to_vqvae2_script': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq}', '--prior_checkpoint', '{prior2}'],
                               'holds a vq_vae model, but a vq_vae2 checkpoint is needed'),
    'flat_prior_to_vqvae2_script': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq2}', '--prior_checkpoint', '{prior}'],
                                    'holds a pixelcnn model, but a hierarchical_pixelcnn'),
    'vq_checkpoint_as_prior': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{vq}'],
                               'holds a vq_vae model'),
    'prior_without_grids': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint',
                             '{prior_without_grids}'], 'has no code_shapes/vq_checkpoint entries'),
    'prior_with_bad_grids': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{prior_bad_grids}'],
                             'code_shapes must map each level to a grid'),
    'missing_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{missing}'], 'not found'),
    'truncated_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{truncated}'],
                       'truncated'),
    'random_bytes': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{random_bytes}', '--prior_checkpoint', '{prior}'],
                     'random_bytes.pth'),
    'text_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{text}', '--prior_checkpoint', '{prior}'],
                  'not a readable checkpoint'),
    'directory': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{folder}', '--prior_checkpoint', '{prior}'],
                  'is a directory'),
    'temperature_0': (FLAT + ['--temperature', '0'], '--temperature'),
    'temperature_negative': (FLAT + ['--temperature', '-1'], '--temperature'),
    'top_k_0': (FLAT + ['--top_k', '0'], '--top_k'),
    'top_p_0': (FLAT + ['--top_p', '0'], '--top_p'),
    'top_p_above_1': (FLAT + ['--top_p', '1.5'], '--top_p'),
    'num_samples_0': (FLAT + ['--num_samples', '0'], '--num_samples'),
    'class_label_too_big': (HIERARCHICAL + ['--class_label', '6'], 'must be in [0, 6)'),
    'class_label_negative': (HIERARCHICAL + ['--class_label', '-1'], 'must be in [0, 6)'),
    'class_label_unconditional': (FLAT + ['--class_label', '0'], 'unconditional'),
}


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(paths, name):
    args, fragment = BAD_INPUTS[name]
    out_dir = paths['folder'] / 'out' / name
    result = run_in_process([arg.format(**paths) for arg in args] + ['--device', 'cpu', '--out_dir', out_dir])
    assert fragment in assert_one_line_error(result, out_dir)
    assert not out_dir.exists()


def test_bad_input_in_a_real_process_is_one_line_too(process_checks):
    """The runs above check each message in this process; this one checks what the shell sees (tests/background.py)."""
    job, out_dir, fragment = process_checks['stage3_missing_checkpoint']
    assert fragment in assert_one_line_error(job.result(), out_dir)
    assert not out_dir.exists()


def test_the_quick_benchmark_prints_a_table():
    result = run_in_process([os.path.join('bench', 'bench_sampling.py'), '--quick'])
    assert_succeeded(result)
    rows = [line for line in result.stdout.splitlines() if line.startswith('| ')]
    assert '| grid | batch | naive (s) | cached (s) | speed-up |' in rows[0]
    assert len([row for row in rows[1:] if 'pixelcnn' in row]) == 2 * 2  # 2 grids x 2 batch sizes
    assert torch.is_grad_enabled()  # the benchmark turned gradients off in its own run only
