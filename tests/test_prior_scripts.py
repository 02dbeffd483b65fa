"""Stage 2 through the real prior scripts, on the session's stage-1 checkpoints: a few steps bring the codes below
log2(num_embeddings) bits; the checkpoint records which VQ file, levels and code grids it was trained on; the code
cache is reused, and refreshed when the VQ file changes; one level can be trained, then the other by a resume that
starts best.pth afresh; and bad input ends in one line on stderr, exit status 2 and no files.

The flat and the class-conditional hierarchical prior are the session's `priors` fixture; the other runs are short
ones in this process.
"""
import math
import os
import shutil

import pytest
import torch

from common.codes import cache_key, cache_path
from common.data import build_dataset
from helpers import (TINY_PRIOR, ScriptRun, assert_one_line_error, derive_checkpoint, load_state, run_in_process,
                     run_ok, write_random_bytes)
from models import HierarchicalPixelCNN, PixelCNN, build_model, file_sha256, load_model

VQVAE_SCRIPT = 'train_pixelcnn_vqvae.py'
VQVAE2_SCRIPT = 'train_pixelcnn_vqvae2.py'
NUM_EMBEDDINGS = 32  # TINY_STAGE1's codebook
UNIFORM_BITS = math.log2(NUM_EMBEDDINGS)


def cache_files(vq_path):
    """{file name: mtime in ns} of the code cache next to a VQ checkpoint."""
    folder = os.path.join(os.path.dirname(vq_path), 'codes_cache')
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def tweak_one_weight(state):
    """A retrained VQ model, as far as its file's content goes."""
    name = next(name for name, value in state['model'].items() if value.is_floating_point())
    state['model'][name] = state['model'][name].clone()
    state['model'][name].view(-1)[0] += 0.01


def copy_run(src, dst, names=('last.pth', 'best.pth')):
    """Copy a run's checkpoints to a folder of its own, to resume there without touching the original."""
    os.makedirs(dst)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope='module')
def runs(stage1, priors, tmp_path_factory):
    """More prior runs on the session's VQ checkpoints, after a snapshot of the code cache the session's runs filled."""
    folder = tmp_path_factory.mktemp('stage2_more')
    vq, vq2 = stage1['vq_vae'].path(), stage1['vq_vae2'].path()
    cache_after_filling = cache_files(vq)
    vq_retrained = folder / 'vq_vae_retrained' / 'best.pth'
    shutil.copytree(vq.parent / 'codes_cache', vq_retrained.parent / 'codes_cache')  # the stale cache comes along
    derive_checkpoint(vq, vq_retrained, tweak_one_weight)
    flat = [VQVAE_SCRIPT, '--vqvae_checkpoint', vq, *TINY_PRIOR]
    hierarchical = [VQVAE2_SCRIPT, '--vqvae2_checkpoint', vq2, *TINY_PRIOR]
    more = {'flat_again': run_ok(flat, folder / 'flat_again'),
            'hierarchical_top': run_ok(hierarchical + ['--level', 'top'], folder / 'top'),
            'flat_retrained_vq': run_ok([VQVAE_SCRIPT, '--vqvae_checkpoint', vq_retrained, *TINY_PRIOR],
                                        folder / 'flat_retrained_vq')}
    # The other level, by a resume of a copy of the --level top run, its best.pth included.
    resumed = copy_run(more['hierarchical_top'].out_dir, folder / 'top_then_bottom')
    # 10 of the 15 steps of an epoch are done: the resume ends the epoch, validates once and writes best.pth.
    result = run_in_process(hierarchical + ['--level', 'bottom', '--resume', resumed / 'last.pth', '--max_steps', '15',
                                            '--out_dir', resumed])
    more['top_then_bottom'] = ScriptRun(resumed, result)
    return {'runs': {**priors, **more}, 'cache_after_filling': cache_after_filling, 'vq': vq, 'vq2': vq2,
            'vq_retrained': vq_retrained}


def final_metrics(run, steps=10):
    """The last validation metrics of a prior run, from its checkpoint, checked against metrics.jsonl and stdout."""
    checkpoint = run.state('last.pth')
    with open(run.path('metrics.jsonl')) as f:
        last_line = f.readlines()[-1]
    assert f'"step": {checkpoint["step"]}' in last_line and checkpoint['step'] == steps
    metrics = checkpoint['metrics']
    (final_line,) = [line for line in run.result.stdout.splitlines() if line.startswith('final validation: ')]
    assert final_line.startswith(f"final validation: bits_per_code {metrics['val/bits_per_code']:.4g}")
    return metrics


def check_prior_files(run, vq_path, kind, model_class, levels, code_shapes):
    """Check last.pth and best.pth (load_model rebuilds both) and samples.png; returns best.pth, checked."""
    assert {'last.pth', 'best.pth', 'samples.png', 'metrics.jsonl'} <= set(os.listdir(run.out_dir))
    checkpoint = run.state('best.pth')
    assert checkpoint['kind'] == model_class.kind
    for file_name in ('last.pth', 'best.pth'):
        model = load_model(run.path(file_name))
        assert type(model) is model_class and model.num_embeddings == NUM_EMBEDDINGS
    assert checkpoint['vq_checkpoint'] == {'path': str(vq_path), 'sha256': file_sha256(vq_path), 'kind': kind}
    assert checkpoint['config']['num_embeddings'] == NUM_EMBEDDINGS
    assert checkpoint['levels'] == levels and checkpoint['code_shapes'] == code_shapes
    assert 'code_shape' not in checkpoint and 'num_embeddings' not in checkpoint  # one place for each fact
    assert checkpoint['data'] == load_state(vq_path)['data']
    assert checkpoint['score_scope'] == 'levels ' + '+'.join(levels)
    return checkpoint


def test_the_flat_prior_learns_the_codes_and_records_its_vq_checkpoint(runs):
    run = runs['runs']['flat']
    checkpoint = check_prior_files(run, runs['vq'], 'vq_vae', PixelCNN, ['flat'], {'flat': [8, 8]})
    assert checkpoint['config']['num_classes'] is None
    metrics = final_metrics(run)
    # Uniform guessing costs log2(K) bits per code; ten steps already find which codes are common.
    assert metrics['val/bits_per_code'] == metrics['val/bits_per_code/flat'] < UNIFORM_BITS - 1


def test_the_class_conditional_hierarchical_prior_learns_both_levels(runs):
    run = runs['runs']['hierarchical']
    checkpoint = check_prior_files(run, runs['vq2'], 'vq_vae2', HierarchicalPixelCNN, ['top', 'bottom'],
                                   {'top': [4, 4], 'bottom': [8, 8]})
    # The number of classes comes from the VQ checkpoint's data: the six shapes.
    assert checkpoint['config']['num_classes'] == checkpoint['data']['num_classes'] == 6
    metrics = final_metrics(run)
    for key in ('val/bits_per_code/top', 'val/bits_per_code/bottom', 'val/bits_per_code'):
        assert metrics[key] < UNIFORM_BITS - 1, key
    # The overall figure weighs each level by its number of codes: 16 top and 64 bottom codes per image.
    assert metrics['val/bits_per_code'] == pytest.approx(
        (16 * metrics['val/bits_per_code/top'] + 64 * metrics['val/bits_per_code/bottom']) / 80)


@pytest.mark.parametrize('name, levels', [('flat', ['flat']), ('hierarchical', ['top', 'bottom'])])
def test_metrics_are_named_by_split_then_metric_then_level(runs, name, levels):
    metrics = runs['runs'][name].state('last.pth')['metrics']
    expected = {'epoch', 'epoch_seconds', 'train/bits_per_code', 'val/bits_per_code'}
    expected |= {f'{split}/bits_per_code/{level}' for split in ('train', 'val') for level in levels}
    assert set(metrics) == expected


def trained_tensors(checkpoint):
    """{name: whether it differs from the prior the script started from (its config after the default --seed)}."""
    torch.manual_seed(0)
    initial = build_model(checkpoint['kind'], checkpoint['config']).state_dict()
    return {name: not torch.equal(value, initial[name]) for name, value in checkpoint['model'].items()}


def test_level_top_trains_the_top_prior_only(runs):
    run = runs['runs']['hierarchical_top']
    checkpoint = check_prior_files(run, runs['vq2'], 'vq_vae2', HierarchicalPixelCNN, ['top'],
                                   {'top': [4, 4], 'bottom': [8, 8]})
    metrics = final_metrics(run)
    assert 'val/bits_per_code/bottom' not in metrics
    assert metrics['val/bits_per_code/top'] == metrics['val/bits_per_code'] < UNIFORM_BITS - 1
    trained = trained_tensors(checkpoint)
    assert any(changed for name, changed in trained.items() if name.startswith('prior_top.'))
    assert not any(changed for name, changed in trained.items() if not name.startswith('prior_top.'))


def test_a_resume_with_the_other_level_trains_it_and_starts_best_pth_afresh(runs):
    run, top = runs['runs']['top_then_bottom'], runs['runs']['hierarchical_top']
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert 'best.pth starts afresh' in run.result.stdout
    top_best = top.state('best.pth')
    best, last = run.state('best.pth'), run.state('last.pth')
    # The best score of the top level (a lower number of bits) must not keep the bottom run from writing best.pth.
    assert best['levels'] == ['bottom'] and best['score_scope'] == 'levels bottom'
    assert best['step'] == last['step'] == 15 and best['metrics'] == last['metrics']
    assert best['best_score'] == best['metrics']['val/bits_per_code/bottom'] > top_best['best_score']
    # The top prior kept the weights of the top run; the bottom prior and its conditioner trained now.
    for name, value in best['model'].items():
        assert torch.equal(value, top_best['model'][name]) == name.startswith('prior_top.'), name


@pytest.mark.parametrize('filling, reading', [('flat', 'flat_again'), ('hierarchical', 'hierarchical_top')])
def test_codes_are_extracted_once_then_read_from_the_cache(runs, filling, reading):
    first, again = runs['runs'][filling].result, runs['runs'][reading].result
    assert 'train codes: extracted and cached (480 items)' in first.stdout
    assert 'val codes: extracted and cached (128 items)' in first.stdout
    assert 'train codes: read from the cache (480 items)' in again.stdout
    assert 'val codes: read from the cache (128 items)' in again.stdout


def test_reading_the_cache_leaves_its_files_untouched(runs):
    cached = runs['cache_after_filling']
    assert sorted(name.split('_')[1] for name in cached) == ['train', 'val']
    assert all(name.startswith('shapes_') and name.endswith('.pt') for name in cached)
    assert cache_files(runs['vq']) == cached


def test_the_cache_holds_the_codes_of_every_level_as_the_vq_model_encodes_them(runs):
    vq_model = load_model(runs['vq2'])
    (path,) = [path for path in (runs['vq2'].parent / 'codes_cache').iterdir() if '_val_' in path.name]
    cached = load_state(path)
    levels, labels = cached['codes']['levels'], cached['codes']['labels']
    assert list(levels) == ['top', 'bottom'] and levels['top'].dtype == torch.int16 and len(labels) == 128
    data = load_state(runs['vq2'])['data']
    dataset, _ = build_dataset(data['name'], 'val', 32, data['data_dir'], seed=data['seed'],
                               num_samples=data['num_samples']['val'])
    images = torch.stack([dataset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = vq_model.level_codes(images)
    for level in levels:
        assert torch.equal(levels[level][:8].long(), expected[level])


def test_a_changed_vq_checkpoint_gets_its_codes_extracted_again(runs):
    run = runs['runs']['flat_retrained_vq']
    vq_path = runs['vq_retrained']
    assert file_sha256(vq_path) != file_sha256(runs['vq'])
    assert 'train codes: extracted and cached' in run.result.stdout
    assert 'val codes: extracted and cached' in run.result.stdout
    # The stale cache copied beside it stays, unused; the fresh codes go to files of their own.
    copied = runs['cache_after_filling']
    now = cache_files(vq_path)
    assert {name: now[name] for name in copied} == copied and len(now) == 2 * len(copied)
    assert run.state('best.pth')['vq_checkpoint']['sha256'] == file_sha256(vq_path)


def test_the_cache_is_keyed_by_the_vq_file_and_every_data_setting(tmp_path):
    data = {'name': 'shapes', 'data_dir': '/data', 'seed': 0, 'num_samples': {'train': 480, 'val': 128},
            'num_classes': 6}
    vq_path = tmp_path / 'best.pth'
    path = cache_path(vq_path, cache_key('a' * 64, data, 32, 'train'))
    assert os.path.dirname(path) == str(tmp_path / 'codes_cache')
    assert cache_path(vq_path, cache_key('a' * 64, dict(data), 32, 'train')) == path
    assert cache_path(vq_path, cache_key('a' * 64, {**data, 'num_classes': None}, 32, 'train')) == path  # no setting
    others = [cache_key('b' * 64, data, 32, 'train'), cache_key('a' * 64, data, 32, 'val'),
              cache_key('a' * 64, data, 64, 'train'),
              *(cache_key('a' * 64, {**data, name: value}, 32, 'train') for name, value in
                [('name', 'mnist'), ('data_dir', '/elsewhere'), ('seed', 1),
                 ('num_samples', {'train': 960, 'val': 128})])]
    assert len({path, *(cache_path(vq_path, key) for key in others)}) == 1 + len(others)


# ----------------------------------------------------------------------------------------------------------------
# Bad input

# name -> (command line, a fragment the one-line error must contain)
BAD_INPUTS = {
    'prior_as_vqvae': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{prior}'],
                       'holds a pixelcnn model, but a vq_vae checkpoint is needed'),
    'vqvae_to_vqvae2_script': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq}'],
                               'holds a vq_vae model, but a vq_vae2 checkpoint is needed'),
    'missing_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{missing}'], 'not found'),
    'corrupt_file': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{corrupt}'], 'corrupt.pth'),
    'class_conditional_without_labels': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq_unlabelled}',
                                          '--class_conditional'], '--class_conditional needs class labels'),
    'resume_a_vq_checkpoint': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--resume', '{vq}'],
                               'holds a vq_vae model, but a pixelcnn'),
    'unknown_level': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq2}', '--level', 'middle'], '--level'),
    'unknown_prior_family': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior', 'rnn'], '--prior'),
}


@pytest.fixture(scope='module')
def bad_paths(stage1, priors, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stage2_bad')
    paths = {'vq': stage1['vq_vae'].path(), 'vq2': stage1['vq_vae2'].path(), 'prior': priors['flat'].path(),
             'missing': folder / 'missing.pth', 'corrupt': folder / 'corrupt.pth', 'folder': folder,
             'vq_unlabelled': folder / 'vq_vae_unlabelled' / 'best.pth'}
    write_random_bytes(paths['corrupt'])
    # The VQ checkpoint of a dataset without class labels.
    derive_checkpoint(paths['vq'], paths['vq_unlabelled'],
                      lambda state: state.update(data={**state['data'], 'num_classes': None}))
    return paths


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(bad_paths, name):
    args, fragment = BAD_INPUTS[name]
    out_dir = bad_paths['folder'] / 'out' / name
    result = run_in_process([arg.format(**bad_paths) for arg in args] + TINY_PRIOR + ['--out_dir', out_dir])
    assert fragment in assert_one_line_error(result, out_dir)
    assert not out_dir.exists()


def test_bad_input_in_a_real_process_is_one_line_too(process_checks):
    """The runs above check each message in this process; this one checks what the shell sees (tests/background.py)."""
    job, out_dir, fragment = process_checks['stage2_corrupt_checkpoint']
    assert fragment in assert_one_line_error(job.result(), out_dir)
    assert not out_dir.exists()
