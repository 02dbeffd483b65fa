"""Stage 2 through the real prior scripts, on VQ models that main.py trains first: a few steps bring the codes below
log2(num_embeddings) bits, the checkpoint records which VQ file it was trained on, the code cache is reused, and
refreshed when the VQ file changes, and bad input ends in one line on stderr, exit status 2 and no files.

Every run spends seconds importing torch, so the `runs` fixture starts runs in three waves of concurrent processes:
stage 1, then the runs that fill each code cache, then the runs that read it.
"""
import math
import os
import shutil

import pytest
import torch

from common.codes import cache_key, cache_path
from helpers import (TINY_STAGE1, assert_one_line_error, assert_succeeded, run_scripts, save_tiny_prior,
                     write_random_bytes)
from models import HierarchicalPixelCNN, PixelCNN, build_model, file_sha256, load_model, save_checkpoint

VQVAE_SCRIPT = 'train_pixelcnn_vqvae.py'
VQVAE2_SCRIPT = 'train_pixelcnn_vqvae2.py'
NUM_EMBEDDINGS = 32  # TINY_STAGE1's codebook
TINY_PRIOR = ['--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8', '--batch_size', '32',
              '--max_steps', '10', '--num_epoch_samples', '4', '--lr', '1e-2', '--device', 'cpu']
FLAT = [VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}']
HIERARCHICAL = [VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq2}']

# Three waves; the runs of a wave start together, after the wave before has finished.
STAGE1_RUNS = {'vq': ['main.py', '--arch', 'vq_vae'], 'vq2': ['main.py', '--arch', 'vq_vae2']}
CACHE_FILLING_RUNS = {'flat': FLAT, 'hierarchical': HIERARCHICAL}
CACHE_READING_RUNS = {
    'flat_again': FLAT,
    'flat_retrained_vq': [VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq_retrained}'],
    'hierarchical_top': HIERARCHICAL + ['--level', 'top'],
    'hierarchical_class_conditional': HIERARCHICAL + ['--class_conditional'],
}
# name -> (command line, a fragment the one-line error must contain); those naming {vq} run with the second wave.
BAD_INPUTS = {
    'prior_as_vqvae': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{prior}'],
                       'holds a pixelcnn model, but a vq_vae checkpoint is needed'),
    'vqvae_to_vqvae2_script': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq}'],
                               'holds a vq_vae model, but a vq_vae2 checkpoint is needed'),
    'missing_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{missing}'], 'not found'),
    'corrupt_file': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{corrupt}'], 'corrupt.pth'),
    'class_conditional_without_labels': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq_unlabelled}',
                                          '--class_conditional'], '--class_conditional needs class labels'),
}


def cache_files(vq_path):
    """{file name: mtime in ns} of the code cache next to a VQ checkpoint."""
    folder = os.path.join(os.path.dirname(vq_path), 'codes_cache')
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def copy_vq_checkpoint(src, dst, edit, with_cache=False):
    """Re-save the VQ checkpoint `src` as `dst` after `edit(state)`; with_cache copies its code cache along."""
    os.makedirs(os.path.dirname(dst))
    if with_cache:
        shutil.copytree(os.path.join(os.path.dirname(src), 'codes_cache'),
                        os.path.join(os.path.dirname(dst), 'codes_cache'))
    state = torch.load(src, map_location='cpu', weights_only=True)
    edit(state)
    save_checkpoint(state, dst)


def tweak_one_weight(state):
    """A retrained VQ model, as far as its file's content goes."""
    name = next(name for name, value in state['model'].items() if value.is_floating_point())
    state['model'][name] = state['model'][name].clone()
    state['model'][name].view(-1)[0] += 0.01


def drop_labels(state):
    """The VQ checkpoint of a dataset without class labels."""
    state['data'] = {**state['data'], 'num_classes': None}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """{'results': {name: (finished process, its --out_dir)}, 'paths': the files used, 'cache_after_filling': ...}."""
    folder = tmp_path_factory.mktemp('stage2')
    paths = {'vq': folder / 'out' / 'vq' / 'best.pth', 'vq2': folder / 'out' / 'vq2' / 'best.pth',
             'vq_retrained': folder / 'vq_vae_retrained' / 'best.pth',
             'vq_unlabelled': folder / 'vq_vae_unlabelled' / 'best.pth',
             'prior': folder / 'prior.pth', 'missing': folder / 'missing.pth', 'corrupt': folder / 'corrupt.pth'}
    save_tiny_prior(paths['prior'], NUM_EMBEDDINGS)
    write_random_bytes(paths['corrupt'])
    results = {}

    def run_wave(commands):
        out_dirs = {name: folder / 'out' / name for name in commands}
        argvs = {name: [arg.format(**paths) for arg in args] + ['--out_dir', out_dirs[name]]
                 for name, args in commands.items()}
        results.update({name: (result, out_dirs[name]) for name, result in run_scripts(argvs).items()})

    bad_now = {name: args for name, (args, _) in BAD_INPUTS.items() if not any('{vq' in arg for arg in args)}
    bad_later = {name: args for name, (args, _) in BAD_INPUTS.items() if name not in bad_now}
    run_wave({name: args + TINY_STAGE1 for name, args in STAGE1_RUNS.items()} | bad_now)
    for name in STAGE1_RUNS:
        assert_succeeded(results[name][0])
    copy_vq_checkpoint(paths['vq'], paths['vq_unlabelled'], drop_labels)

    run_wave({name: args + TINY_PRIOR for name, args in CACHE_FILLING_RUNS.items()} | bad_later)
    cache_after_filling = cache_files(paths['vq'])
    copy_vq_checkpoint(paths['vq'], paths['vq_retrained'], tweak_one_weight, with_cache=True)

    run_wave({name: args + TINY_PRIOR for name, args in CACHE_READING_RUNS.items()})
    return {'results': results, 'paths': paths, 'cache_after_filling': cache_after_filling}


def succeeded(runs, name):
    """The finished run `name`, which must have exited 0, and its out_dir."""
    result, out_dir = runs['results'][name]
    assert_succeeded(result)
    return result, out_dir


def final_metrics(result, out_dir):
    """The last validation metrics of a prior run, from its checkpoint, checked against metrics.jsonl and stdout."""
    checkpoint = torch.load(out_dir / 'last.pth', map_location='cpu', weights_only=True)
    with open(out_dir / 'metrics.jsonl') as f:
        last_line = f.readlines()[-1]
    assert f'"step": {checkpoint["step"]}' in last_line and checkpoint['step'] == 10
    metrics = checkpoint['metrics']
    (final_line,) = [line for line in result.stdout.splitlines() if line.startswith('final validation: ')]
    assert final_line.endswith(f"bits_per_code {metrics['val_bits_per_code']:.4g}")
    return metrics


def check_prior_files(out_dir, vq_path, kind, model_class):
    """Check last.pth and best.pth (load_model rebuilds both) and samples.png; returns best.pth, checked."""
    assert {'last.pth', 'best.pth', 'samples.png', 'metrics.jsonl'} <= set(os.listdir(out_dir))
    checkpoint = torch.load(out_dir / 'best.pth', map_location='cpu', weights_only=True)
    assert checkpoint['kind'] == model_class.kind
    for file_name in ('last.pth', 'best.pth'):
        model = load_model(out_dir / file_name)
        assert type(model) is model_class and model.num_embeddings == NUM_EMBEDDINGS
    assert checkpoint['vq_checkpoint'] == {'path': str(vq_path), 'sha256': file_sha256(vq_path), 'kind': kind}
    assert checkpoint['num_embeddings'] == checkpoint['config']['num_embeddings'] == NUM_EMBEDDINGS
    vq_state = torch.load(vq_path, map_location='cpu', weights_only=True)
    assert checkpoint['data'] == vq_state['data']
    return checkpoint


def test_the_flat_prior_learns_the_codes_and_records_its_vq_checkpoint(runs):
    result, out_dir = succeeded(runs, 'flat')
    checkpoint = check_prior_files(out_dir, runs['paths']['vq'], 'vq_vae', PixelCNN)
    assert checkpoint['code_shape'] == [8, 8]
    assert checkpoint['config']['num_classes'] is None
    # Uniform guessing costs log2(K) bits per code; ten steps already find which codes are common.
    assert final_metrics(result, out_dir)['val_bits_per_code'] < math.log2(NUM_EMBEDDINGS) - 1


def test_the_hierarchical_prior_learns_both_levels(runs):
    result, out_dir = succeeded(runs, 'hierarchical')
    checkpoint = check_prior_files(out_dir, runs['paths']['vq2'], 'vq_vae2', HierarchicalPixelCNN)
    assert checkpoint['code_shape'] == {'top': [4, 4], 'bottom': [8, 8]}
    assert checkpoint['levels'] == ['top', 'bottom']
    metrics = final_metrics(result, out_dir)
    for key in ('val_bits_top', 'val_bits_bottom', 'val_bits_per_code'):
        assert metrics[key] < math.log2(NUM_EMBEDDINGS) - 1, key


def test_level_top_trains_the_top_prior_only(runs):
    result, out_dir = succeeded(runs, 'hierarchical_top')
    checkpoint = check_prior_files(out_dir, runs['paths']['vq2'], 'vq_vae2', HierarchicalPixelCNN)
    assert checkpoint['levels'] == ['top']
    metrics = final_metrics(result, out_dir)
    assert 'val_bits_bottom' not in metrics
    assert metrics['val_bits_top'] == metrics['val_bits_per_code'] < math.log2(NUM_EMBEDDINGS) - 1
    torch.manual_seed(0)  # the script's default --seed, set before it builds the prior
    initial = build_model(checkpoint['kind'], checkpoint['config']).state_dict()
    trained = {name: not torch.equal(value, initial[name]) for name, value in checkpoint['model'].items()}
    assert any(changed for name, changed in trained.items() if name.startswith('prior_top.'))
    assert not any(changed for name, changed in trained.items() if not name.startswith('prior_top.'))


def test_class_conditional_takes_the_number_of_classes_from_the_vq_checkpoint(runs):
    result, out_dir = succeeded(runs, 'hierarchical_class_conditional')
    checkpoint = check_prior_files(out_dir, runs['paths']['vq2'], 'vq_vae2', HierarchicalPixelCNN)
    assert checkpoint['config']['num_classes'] == checkpoint['data']['num_classes'] == 6  # the six shapes
    assert final_metrics(result, out_dir)['val_bits_per_code'] < math.log2(NUM_EMBEDDINGS) - 1


@pytest.mark.parametrize('filling, reading', [('flat', 'flat_again'), ('hierarchical', 'hierarchical_top'),
                                              ('hierarchical', 'hierarchical_class_conditional')])
def test_codes_are_extracted_once_then_read_from_the_cache(runs, filling, reading):
    first, _ = succeeded(runs, filling)
    again, _ = succeeded(runs, reading)
    assert 'train codes: extracted and cached (480 items)' in first.stdout
    assert 'val codes: extracted and cached (128 items)' in first.stdout
    assert 'train codes: read from the cache (480 items)' in again.stdout
    assert 'val codes: read from the cache (128 items)' in again.stdout


def test_reading_the_cache_leaves_its_files_untouched(runs):
    succeeded(runs, 'flat_again')
    cached = runs['cache_after_filling']
    assert sorted(name.split('_')[1] for name in cached) == ['train', 'val']
    assert all(name.startswith('shapes_') and name.endswith('.pt') for name in cached)
    assert cache_files(runs['paths']['vq']) == cached


def test_a_changed_vq_checkpoint_gets_its_codes_extracted_again(runs):
    result, out_dir = succeeded(runs, 'flat_retrained_vq')
    vq_path = runs['paths']['vq_retrained']
    assert file_sha256(vq_path) != file_sha256(runs['paths']['vq'])
    assert 'train codes: extracted and cached' in result.stdout and 'val codes: extracted and cached' in result.stdout
    # The stale cache copied beside it stays, unused; the fresh codes go to files of their own.
    copied = runs['cache_after_filling']
    now = cache_files(vq_path)
    assert {name: now[name] for name in copied} == copied and len(now) == 2 * len(copied)
    assert torch.load(out_dir / 'best.pth', weights_only=True)['vq_checkpoint']['sha256'] == file_sha256(vq_path)


def test_the_cache_is_keyed_by_the_vq_file_and_every_data_setting(tmp_path):
    data = {'name': 'shapes', 'image_size': 32, 'data_dir': '/data', 'seed': 0,
            'num_samples': {'train': 480, 'val': 128}, 'num_classes': 6}
    vq_path = tmp_path / 'best.pth'
    path = cache_path(vq_path, cache_key('a' * 64, data, 'train'))
    assert os.path.dirname(path) == str(tmp_path / 'codes_cache')
    assert cache_path(vq_path, cache_key('a' * 64, dict(data), 'train')) == path
    assert cache_path(vq_path, cache_key('a' * 64, {**data, 'num_classes': None}, 'train')) == path  # not a setting
    others = [cache_key('b' * 64, data, 'train'), cache_key('a' * 64, data, 'val'),
              *(cache_key('a' * 64, {**data, name: value}, 'train') for name, value in
                [('name', 'mnist'), ('image_size', 64), ('data_dir', '/elsewhere'), ('seed', 1),
                 ('num_samples', {'train': 960, 'val': 128})])]
    assert len({path, *(cache_path(vq_path, key) for key in others)}) == 1 + len(others)


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(runs, name):
    result, out_dir = runs['results'][name]
    line = assert_one_line_error(result, out_dir)
    assert BAD_INPUTS[name][1] in line
