"""Stage 3 through the real scripts, on tiny checkpoints: the files written, seed determinism, the cached sampler
drawing the same codes as the naive one, and bad input ending in one line on stderr, exit status 2 and no files.

Every script run spends seconds importing torch, so the `runs` fixture starts them all at once and the tests check
the finished results.
"""
import os

import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, assert_succeeded, run_scripts, write_random_bytes
from models import VQVAE, VQVAE2, HierarchicalPixelCNN, PixelCNN, file_sha256, save_checkpoint

VQVAE_SCRIPT = 'generate_samples_pixelcnn_vqvae.py'
VQVAE2_SCRIPT = 'generate_samples_pixelcnn_vqvae2.py'
# 16x16 images: 4x4 codes for the VQ-VAE; 2x2 top and 4x4 bottom codes for the VQ-VAE-2.
TINY_VQ = dict(image_size=16, hidden_channels=16, res_channels=8, num_res_blocks=1, num_embeddings=16, embedding_dim=8)
TINY_PRIOR = dict(num_embeddings=16, embedding_dim=8, hidden_channels=16, num_layers=3)

VQVAE_RUN = [VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{prior}', '--num_samples', '5',
             '--batch_size', '2', '--seed', '1']
VQVAE2_RUN = [VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq2}', '--prior_checkpoint', '{prior2}', '--num_samples', '4',
              '--batch_size', '3']
GOOD_RUNS = {
    'vqvae': VQVAE_RUN + ['--save_individual'],
    'vqvae_same_seed': VQVAE_RUN,
    'vqvae_other_seed': VQVAE_RUN + ['--seed', '2'],
    'vqvae_naive': VQVAE_RUN + ['--naive'],
    'vqvae2': VQVAE2_RUN,
    'vqvae2_naive': VQVAE2_RUN + ['--naive'],
    'vqvae2_retrained_vq': [VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq2_retrained}', '--prior_checkpoint', '{prior2}',
                            '--num_samples', '2', '--class_label', '2'],
}
BENCH_QUICK = [os.path.join('bench', 'bench_sampling.py'), '--quick']
# name -> (command line, a fragment the one-line error must contain)
BAD_INPUTS = {
    'num_embeddings_mismatch': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{prior_k32}'],
                                'models 32 codes'),
    'grid_mismatch': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq_32px}', '--prior_checkpoint', '{prior}'],
                      'trained on 4x4 code grids'),
    'prior_as_vqvae': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{prior}', '--prior_checkpoint', '{prior}'],
                       'holds a pixelcnn model, but a vq_vae checkpoint is needed'),
    'vqvae_to_vqvae2_script': ([VQVAE2_SCRIPT, '--vqvae2_checkpoint', '{vq}', '--prior_checkpoint', '{prior2}'],
                               'holds a vq_vae model, but a vq_vae2 checkpoint is needed'),
    'missing_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{missing}'], 'not found'),
    'truncated_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{vq}', '--prior_checkpoint', '{truncated}'],
                       'truncated'),
    'random_bytes': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{random_bytes}', '--prior_checkpoint', '{prior}'],
                     'random_bytes.pth'),
    'text_file': ([VQVAE_SCRIPT, '--vqvae_checkpoint', '{text}', '--prior_checkpoint', '{prior}'],
                  'not a readable checkpoint'),
    'temperature_0': (VQVAE_RUN + ['--temperature', '0'], '--temperature'),
    'temperature_negative': (VQVAE_RUN + ['--temperature', '-1'], '--temperature'),
    'num_samples_0': (VQVAE_RUN + ['--num_samples', '0'], '--num_samples'),
    'class_label_too_big': (VQVAE2_RUN + ['--class_label', '3'], 'must be in [0, 3)'),
    'class_label_negative': (VQVAE2_RUN + ['--class_label', '-1'], 'must be in [0, 3)'),
    'class_label_unconditional': (VQVAE_RUN + ['--class_label', '0'], 'unconditional'),
}


def save_vq(path, cls, seed=0, **overrides):
    """A stage-1 checkpoint of a tiny, untrained VQ model."""
    torch.manual_seed(seed)
    model = cls(**{**TINY_VQ, **overrides})
    data = {'name': 'shapes', 'image_size': model.image_size, 'in_channels': 3, 'num_classes': 3}
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict(), 'data': data}, path)
    return model


def save_prior(path, cls, vq_path, vq_model, **overrides):
    """A prior checkpoint laid out as the stage-2 scripts write it, for the VQ model saved at `vq_path`."""
    torch.manual_seed(0)
    prior = cls(**{**TINY_PRIOR, **overrides})
    shape = vq_model.code_shape()
    code_shape = list(shape) if cls is PixelCNN else {'top': list(shape[0]), 'bottom': list(shape[1])}
    save_checkpoint({'kind': prior.kind, 'config': prior.config, 'model': prior.state_dict(),
                     'vq_checkpoint': {'path': str(vq_path), 'sha256': file_sha256(vq_path), 'kind': vq_model.kind},
                     'num_embeddings': prior.num_embeddings, 'code_shape': code_shape,
                     'data': {'name': 'shapes', 'image_size': vq_model.image_size, 'in_channels': 3,
                              'num_classes': prior.num_classes}}, path)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """name -> (finished process, its --out_dir) for every run in GOOD_RUNS and BAD_INPUTS, and 'bench_quick'."""
    folder = tmp_path_factory.mktemp('stage3')
    paths = {name: str(folder / f'{name}.pth') for name in ('vq', 'vq2', 'vq2_retrained', 'vq_k32', 'vq_32px',
                                                            'prior', 'prior2', 'prior_k32', 'missing', 'truncated',
                                                            'random_bytes', 'text')}
    vq = save_vq(paths['vq'], VQVAE)
    vq2 = save_vq(paths['vq2'], VQVAE2)
    save_vq(paths['vq2_retrained'], VQVAE2, seed=1)  # same config, other weights: another file hash
    vq_k32 = save_vq(paths['vq_k32'], VQVAE, num_embeddings=32)
    save_vq(paths['vq_32px'], VQVAE, image_size=32)  # 8x8 codes
    save_prior(paths['prior'], PixelCNN, paths['vq'], vq)
    save_prior(paths['prior2'], HierarchicalPixelCNN, paths['vq2'], vq2, num_classes=3)
    save_prior(paths['prior_k32'], PixelCNN, paths['vq_k32'], vq_k32, num_embeddings=32)
    with open(paths['prior'], 'rb') as f:
        content = f.read()
    with open(paths['truncated'], 'wb') as f:
        f.write(content[:len(content) // 2])
    write_random_bytes(paths['random_bytes'])
    with open(paths['text'], 'w') as f:
        f.write('this is not a checkpoint\n')

    commands = GOOD_RUNS | {name: args for name, (args, _) in BAD_INPUTS.items()}
    out_dirs = {name: folder / 'out' / name for name in commands}
    argvs = {name: [arg.format(**paths) for arg in args] + ['--out_dir', out_dirs[name]]
             for name, args in commands.items()}
    argvs['bench_quick'] = BENCH_QUICK  # it writes no files, so it takes no --out_dir
    return {name: (result, out_dirs.get(name)) for name, result in run_scripts(argvs).items()}


def succeeded(runs, name):
    """The out_dir of a run that must have exited 0 without a warning."""
    result, out_dir = runs[name]
    assert_succeeded(result)
    assert 'WARNING' not in result.stderr
    return out_dir


def load_codes(out_dir):
    return torch.load(out_dir / 'codes.pt', weights_only=True)


def test_vqvae_script_writes_a_grid_the_codes_and_one_png_per_sample(runs):
    out_dir = succeeded(runs, 'vqvae')
    # 5 images of 16x16 in rows of ceil(sqrt(5)) = 3, with make_grid's 2-pixel padding.
    assert Image.open(out_dir / 'samples.png').size == (3 * 18 + 2, 2 * 18 + 2)
    individual = sorted(name for name in os.listdir(out_dir) if name.startswith('sample_'))
    assert individual == [f'sample_{index:04d}.png' for index in range(5)]
    assert Image.open(out_dir / 'sample_0004.png').size == (16, 16)
    saved = load_codes(out_dir)
    assert saved['codes'].shape == (5, 4, 4) and saved['codes'].dtype == torch.long
    assert 0 <= saved['codes'].min() and saved['codes'].max() < 16
    assert 'class_labels' not in saved
    assert saved['settings']['seed'] == 1 and saved['settings']['num_samples'] == 5
    assert saved['settings']['temperature'] == 1.0 and saved['settings']['naive'] is False


def test_vqvae2_script_writes_both_levels_with_every_class_in_turn(runs):
    out_dir = succeeded(runs, 'vqvae2')
    assert Image.open(out_dir / 'samples.png').size == (2 * 18 + 2, 2 * 18 + 2)
    assert not any(p.startswith('sample_') for p in os.listdir(out_dir))
    saved = load_codes(out_dir)
    assert saved['codes_top'].shape == (4, 2, 2) and saved['codes_bottom'].shape == (4, 4, 4)
    for codes in (saved['codes_top'], saved['codes_bottom']):
        assert codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 16
    assert saved['class_labels'].tolist() == [0, 1, 2, 0]


def test_the_same_seed_gives_an_identical_codes_file_and_another_seed_other_codes(runs):
    first, again, other = (succeeded(runs, name) for name in ('vqvae', 'vqvae_same_seed', 'vqvae_other_seed'))
    assert (first / 'codes.pt').read_bytes() == (again / 'codes.pt').read_bytes()
    assert not torch.equal(load_codes(first)['codes'], load_codes(other)['codes'])


@pytest.mark.parametrize('cached, naive, names', [('vqvae', 'vqvae_naive', ['codes']),
                                                  ('vqvae2', 'vqvae2_naive', ['codes_top', 'codes_bottom'])])
def test_the_naive_sampler_draws_the_same_codes_as_the_cached_one(runs, cached, naive, names):
    fast, slow = load_codes(succeeded(runs, cached)), load_codes(succeeded(runs, naive))
    for name in names:
        assert torch.equal(fast[name], slow[name])
    assert slow['settings']['naive'] is True


def test_a_retrained_vq_file_gives_a_one_line_warning_but_samples(runs):
    result, out_dir = runs['vqvae2_retrained_vq']
    assert_succeeded(result)
    warnings = [line for line in result.stderr.splitlines() if 'WARNING' in line]
    assert len(warnings) == 1 and 'sha256' in warnings[0]
    assert load_codes(out_dir)['class_labels'].tolist() == [2, 2]


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(runs, name):
    result, out_dir = runs[name]
    line = assert_one_line_error(result, out_dir)
    assert BAD_INPUTS[name][1] in line
    assert not out_dir.exists()


def test_the_quick_benchmark_prints_a_table(runs):
    result, _ = runs['bench_quick']
    assert_succeeded(result)
    rows = [line for line in result.stdout.splitlines() if line.startswith('| ')]
    assert rows[0].startswith('| grid | batch | naive (s) | cached (s) | speed-up |')
    assert len(rows) == 1 + 2 * 2  # the header, then 2 grids x 2 batch sizes
