"""A tiny version of the Fashion-MNIST recipe (bench/reproduce_fashion_mnist.py): every stage for a few steps or
seconds, evaluate.py on every model, then the results table and the pictures; and what stage 1 makes of the real
one-channel data.

The recipe runs in a fork of the test process as the session starts (tests/background.py, fashion_recipe: its script
commands run in-process, with tiny model flags; the test split is cut to 1000 images). Skips cleanly where Debian's
dataset-fashion-mnist is not installed.
"""
import json
import math
import os

import pytest

from background import TINY_RECIPE_FLAGS
from helpers import REPO, assert_one_line_error, load_state, run_in_process

NUM_EMBEDDINGS = int(TINY_RECIPE_FLAGS['main.py'][TINY_RECIPE_FLAGS['main.py'].index('--num_embeddings') + 1])
PRIORS = ('prior_vqvae', 'prior_vqvae2', 'prior_vqvae2_transformer', 'prior_vqvae2_classes')
EVALUATIONS = ['prior_vqvae_t1', 'prior_vqvae2_classes_t1'] + [f'{prior}_t{t}' for prior in PRIORS[1:3]
                                                                for t in ('1', '0.8')]  # --temperatures 1.0,0.8
SEEDED = [f'{prior}_seed1' for prior in PRIORS[1:3]]  # --seeds 2: the compared priors again, bits per code only


@pytest.fixture(scope='module')
def recipe(fashion_job):
    """(the recipe's results folder, results.json)."""
    out_dir, commands = fashion_job.result()
    scripts = [command[0] for command in commands]
    assert scripts == ['main.py'] * 2 + ['train_pixelcnn_vqvae.py'] + ['train_pixelcnn_vqvae2.py'] * 5 + \
        ['evaluate.py'] * (len(EVALUATIONS) + len(SEEDED))
    with open(out_dir / 'results.json') as f:
        return out_dir, json.load(f)


def test_tiny_recipe_trains_every_model_and_scores_it(recipe):
    out_dir, results = recipe
    assert sorted(results['train_seconds']) == sorted(['vq_vae', 'vq_vae2', *PRIORS, *SEEDED])
    evaluations = results['evaluations']
    assert sorted(evaluations) == sorted(EVALUATIONS + [f'{name}_t1' for name in SEEDED])
    for name, evaluation in evaluations.items():
        reconstruction = evaluation['reconstruction']
        assert 0 < reconstruction['mse'] < 4 and reconstruction['psnr'] > 0, name
        levels = [key.split('/')[1] for key in reconstruction if key.startswith('perplexity/')]
        assert levels == (['flat'] if name.startswith('prior_vqvae_') else ['top', 'bottom']), name
        for level in levels:
            assert 1 <= reconstruction[f'perplexity/{level}'] <= NUM_EMBEDDINGS
            assert 0 < reconstruction[f'code_usage/{level}'] <= 1
            assert 0 < evaluation['prior'][f'bits_per_code/{level}'] < 12
        assert evaluation['bits_per_dim'] == pytest.approx(evaluation['latent_bits_per_dim']
                                                           + evaluation['decoder_bits_per_dim'])
        if name.removesuffix('_t1') in SEEDED:  # scored with --num_samples 0: the model, no samples
            assert 'scores' not in evaluation, name
            continue
        assert math.isfinite(evaluation['scores']['fid']) and evaluation['scores']['fid'] >= 0, name
    assert 'cas' in evaluations['prior_vqvae2_classes_t1']['scores']
    # The class-conditional prior is of the family with the lower held-out bits per code.
    bits = results['validation_bits_per_code']
    assert results['conditional_family'] == min(bits, key=bits.get)
    classes = load_state(out_dir / 'prior_vqvae2_classes' / 'best.pth')
    assert classes['kind'] == {'pixelcnn': 'hierarchical_pixelcnn',
                               'transformer': 'hierarchical_transformer'}[results['conditional_family']]
    assert classes['config']['num_classes'] == 10  # from the VQ checkpoint's data: Fashion-MNIST's ten classes
    # Each prior trains at its family's learning rate and batch size (the flat one at its own), after the same warm-up.
    settings = {'flat': (8e-3, 64), 'pixelcnn': (4e-3, 32), 'transformer': (5e-3, 32)}
    for name, family in (('prior_vqvae', 'pixelcnn'), ('prior_vqvae2', 'pixelcnn'),
                         ('prior_vqvae2_transformer', 'transformer'),
                         ('prior_vqvae2_classes', results['conditional_family'])):
        state = load_state(out_dir / name / 'best.pth')
        args = state['args']
        lr, batch = settings['flat' if name == 'prior_vqvae' else family]
        assert (args['prior'], args['lr'], args['batch_size'], args['warmup_steps']) == (family, lr, batch, 50), name
        if family == 'transformer':  # no top-encoder block, not the small preset's two
            assert state['config']['top_encoder_layers'] == 0, name


def test_tiny_recipe_trains_the_compared_priors_again_with_other_seeds(recipe):
    """--seeds 2: each compared prior a second time with seed 1 and the same flags otherwise, its test bits per code
    beside seed 0's in the JSON and in a seed table with the ratio of the means."""
    out_dir, results = recipe
    by_seed = results['test_bits_per_code_by_seed']
    for (name, family), seeded in zip((('prior_vqvae2', 'pixelcnn'), ('prior_vqvae2_transformer', 'transformer')),
                                      SEEDED):
        main, other = load_state(out_dir / name / 'best.pth'), load_state(out_dir / seeded / 'best.pth')
        assert (main['args']['seed'], other['args']['seed']) == (0, 1)
        assert {k: v for k, v in main['args'].items() if k not in ('seed', 'out_dir')} == \
            {k: v for k, v in other['args'].items() if k not in ('seed', 'out_dir')}
        assert main['kind'] == other['kind'] and main['config'] == other['config']
        evaluations = results['evaluations']
        assert by_seed[family] == [evaluations[f'{name}_t1']['prior']['bits_per_code'],
                                   evaluations[f'{seeded}_t1']['prior']['bits_per_code']]
    table = (out_dir / 'results.md').read_text()
    assert '| prior | seed 0 | seed 1 | mean | std |' in table
    for family, (first, second) in by_seed.items():  # mean and sample standard deviation of the two seeds
        assert f'| {family} | {first:.3f} | {second:.3f} | {(first + second) / 2:.3f} | ' \
               f'{abs(first - second) / math.sqrt(2):.3f} |' in table
    ratio = (by_seed['transformer'][0] + by_seed['transformer'][1]) / (by_seed['pixelcnn'][0] + by_seed['pixelcnn'][1])
    assert f'transformer / PixelCNN: {ratio:.4f}x of the means over 2 seed(s)' in table


def test_tiny_recipe_writes_the_results_table_and_pictures(recipe):
    out_dir, results = recipe
    for name, seconds in results['train_seconds'].items():  # each stage's wall time, kept for a later --reuse
        assert json.loads((out_dir / name / 'recipe_seconds.json').read_text())['seconds'] == pytest.approx(seconds)
    for name in [f'{vq}_recon.png' for vq in ('vq_vae', 'vq_vae2')] + [f'{prior}_samples.png' for prior in PRIORS]:
        assert (out_dir / name).stat().st_size > 0, name
    table = (out_dir / 'results.md').read_text()
    assert table.count('\n| vq_vae') == 4 and table.count('\n| prior_vqvae2') == 2 and 'FID at temperature' in table


def test_stage_1_reads_fashion_mnist_as_one_channel_with_ten_classes(recipe):
    out_dir, _ = recipe
    checkpoint = load_state(out_dir / 'vq_vae' / 'best.pth')
    assert checkpoint['config']['in_channels'] == checkpoint['data']['in_channels'] == 1
    assert checkpoint['config']['image_size'] == 32  # 28x28 padded with the black background
    assert checkpoint['data']['name'] == 'fashion_mnist' and checkpoint['data']['num_classes'] == 10
    data_dir = checkpoint['data']['data_dir']
    assert os.path.isabs(data_dir) and os.listdir(os.path.join(data_dir, 'FashionMNIST', 'raw'))


def recipe_script():
    """bench/reproduce_fashion_mnist.py as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('recipe_script',
                                                  os.path.join(REPO, 'bench', 'reproduce_fashion_mnist.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize('prior_batch_size', [None, 48])
def test_prior_batch_size_overrides_every_family_s_own(tmp_path, monkeypatch, prior_batch_size):
    """The command lines the recipe builds, read by the training scripts' own parsers: each prior at its family's
    batch size, or at --prior_batch_size when given (the flag comes after the family's, so it wins)."""
    script = recipe_script()
    import train_pixelcnn_vqvae
    import train_pixelcnn_vqvae2
    parsers = {'train_pixelcnn_vqvae.py': train_pixelcnn_vqvae.build_parser(),
               'train_pixelcnn_vqvae2.py': train_pixelcnn_vqvae2.build_parser()}
    commands = []
    monkeypatch.setattr(script.subprocess, 'run', lambda command, **kwargs: commands.append(command))
    args = script.build_parser().parse_args(['--out_dir', str(tmp_path), '--quiet'] + (
        [] if prior_batch_size is None else ['--prior_batch_size', str(prior_batch_size)]))
    expected = [('prior_vqvae', (), 64), ('prior_vqvae2', (), 32), ('prior_vqvae2_transformer', (), 32),
                ('prior_vqvae2_classes', script.FAMILY_FLAGS['transformer'], 32)]  # as main() runs it
    for name, extra, batch_size in expected:
        (tmp_path / name).mkdir()
        script.run_stage(name, args, extra)
        parsed = parsers[commands[-1][1]].parse_args(commands[-1][2:])
        assert parsed.batch_size == (prior_batch_size or batch_size), name


def test_reuse_keeps_each_seed_s_finished_folder_and_trains_the_rest(tmp_path, monkeypatch):
    """--reuse with --seeds: a seed's own folder with a best.pth is kept (its recorded time comes back), a seed whose
    folder has none is trained, with its seed; without --reuse everything is trained."""
    script = recipe_script()
    trained = []
    monkeypatch.setattr(script, 'run_stage', lambda name, args, extra=(), seed=0: trained.append((name, seed)) or 1.0)
    for folder, seconds in (('prior_vqvae2', 301.0), ('prior_vqvae2_seed2', 302.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'best.pth').write_bytes(b'')
        (tmp_path / folder / 'recipe_seconds.json').write_text(json.dumps({'seconds': seconds}))
    args = script.build_parser().parse_args(['--out_dir', str(tmp_path), '--reuse', '--seeds', '3'])
    assert [script.run('prior_vqvae2', args, seed=seed) for seed in range(3)] == [301.0, 1.0, 302.0]
    assert trained == [('prior_vqvae2', 1)]
    args.reuse = False
    assert script.run('prior_vqvae2', args, seed=2) == 1.0 and trained[-1] == ('prior_vqvae2', 2)


@pytest.mark.parametrize('flags, fragment', [(['--num_samples', '3'], '--num_samples must be at least 4'),
                                             (['--temperatures', '0.9,0.8'], '--temperatures must include 1.0'),
                                             (['--seeds', '0'], '--seeds')])
def test_flags_that_would_fail_after_the_training_are_refused_first(tmp_path, flags, fragment):
    result = run_in_process(['bench/reproduce_fashion_mnist.py', '--out_dir', tmp_path / 'out', *flags])
    assert fragment in assert_one_line_error(result, tmp_path / 'out')


def test_reuse_counts_the_training_time_of_the_last_run_in_a_folder_only(tmp_path):
    """--reuse reads a finished stage's time from its metrics.jsonl, which every run in that folder appends to."""
    script = recipe_script()
    runs = [[(859, 300.0), (1500, 200.0)],  # an earlier run
            [(859, 100.0), (1000, 20.0), (1500, 80.0)]]  # the last one, resumed at step 1000
    (tmp_path / 'stage').mkdir()
    (tmp_path / 'stage' / 'metrics.jsonl').write_text(''.join(
        json.dumps({'step': step, 'epoch_seconds': seconds}) + '\n' for run in runs for step, seconds in run))

    class Args:
        out_dir = str(tmp_path)
    assert script.trained_seconds('stage', Args) == pytest.approx(200.0)
    # A stage the recipe ran itself has its wall time on record, which wins.
    (tmp_path / 'stage' / 'recipe_seconds.json').write_text(json.dumps({'seconds': 215.5}))
    assert script.trained_seconds('stage', Args) == pytest.approx(215.5)
