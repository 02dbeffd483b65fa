"""Stage 1 through the real main.py: a short run lowers the validation MSE below an untrained model's; the files a run
writes, what its checkpoint and metrics.jsonl hold; mixed precision, the cosine schedule, channels-last, torch.compile,
the loss-learned codebook and W&B offline; and bad input ending in one line on stderr, exit status 2 and no files.

The VQ-VAE and VQ-VAE-2 runs are the session's `stage1` fixture; the other runs are short ones in this process.
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from background import SHORT_STAGE1
from common.data import build_dataset
from common.trainer import Trainer
from helpers import TINY_STAGE1, assert_one_line_error, load_state, run_in_process, run_ok, write_random_bytes
from models import VQVAE, VQVAE2, build_model, load_model

CHECKPOINT_KEYS = {'format_version', 'kind', 'config', 'model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'step',
                   'batch_in_epoch', 'metrics', 'best_score', 'score_scope', 'args', 'wandb_run_id', 'rng', 'data'}
SHORT = SHORT_STAGE1  # 64 images in batches of 16: 4 steps, one epoch


def read_metrics(out_dir):
    with open(out_dir / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


def untrained_val_mse(checkpoint):
    """Validation MSE of the model main.py starts from (same config and seed), on the same validation images."""
    data = checkpoint['data']
    val_set, _ = build_dataset(data['name'], 'val', checkpoint['config']['image_size'], data['data_dir'],
                               seed=data['seed'], download=False, num_samples=data['num_samples']['val'])
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    torch.manual_seed(0)  # main.py's default --seed
    model = build_model(checkpoint['kind'], checkpoint['config']).eval()
    with torch.no_grad():
        recon, _ = model(images)
    return float((recon - images).pow(2).mean())


def initial_state(checkpoint):
    """The weights main.py started from: the checkpoint's config built after its default --seed."""
    torch.manual_seed(0)
    return build_model(checkpoint['kind'], checkpoint['config']).state_dict()


# ----------------------------------------------------------------------------------------------------------------
# The session's runs

@pytest.mark.parametrize('arch, model_class, code_shapes', [
    ('vq_vae', VQVAE, {'flat': (8, 8)}),
    ('vq_vae2', VQVAE2, {'top': (4, 4), 'bottom': (8, 8)}),
])
def test_a_short_run_lowers_the_validation_mse_and_writes_checkpoints_and_images(stage1, arch, model_class,
                                                                                  code_shapes):
    run = stage1[arch]
    assert f'code grids {code_shapes}' in run.result.stdout
    assert {'last.pth', 'best.pth', 'reconstructions.png', 'metrics.jsonl', '.lock'} <= set(os.listdir(run.out_dir))

    (final,) = read_metrics(run.out_dir)  # one validation: the 30 steps are one epoch
    assert final['step'] == 30
    assert f"final validation: mse {final['val/mse']:.4g}" in run.result.stdout
    checkpoint = run.state('last.pth')
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert final['val/mse'] < 0.95 * untrained_val_mse(checkpoint)

    assert checkpoint['kind'] == model_class.kind and checkpoint['step'] == 30
    assert checkpoint['metrics'] == {key: value for key, value in final.items() if key != 'step'}
    assert checkpoint['data']['num_samples'] == {'train': 480, 'val': 128}
    assert checkpoint['data']['in_channels'] == 3 and checkpoint['data']['num_classes'] == 6
    # The image size lives in the model config only, never in a second place that could disagree with it.
    assert checkpoint['config']['image_size'] == 32
    assert 'image_size' not in checkpoint and 'image_size' not in checkpoint['data']
    for file_name in ('last.pth', 'best.pth'):
        model = load_model(run.path(file_name))
        assert type(model) is model_class and model.level_shapes() == code_shapes
        assert model.config == checkpoint['config']
        # The rebuilt model holds the trained weights, not a fresh initialisation.
        assert all(torch.equal(value, checkpoint['model'][key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize('arch, levels', [('vq_vae', ['flat']), ('vq_vae2', ['top', 'bottom'])])
def test_metrics_are_named_by_split_then_metric_then_level(stage1, arch, levels):
    (line,) = read_metrics(stage1[arch].out_dir)
    expected = {'step', 'epoch', 'epoch_seconds', 'train/loss', 'train/mse', 'val/mse', 'val/psnr'}
    expected |= {f'train/perplexity/{level}' for level in levels}
    expected |= {f'{name}/{level}' for name in ('val/perplexity', 'val/code_usage') for level in levels}
    assert set(line) == expected
    assert line['epoch'] == 1
    assert line['val/psnr'] == pytest.approx(10 * math.log10(4 / line['val/mse']))
    for level in levels:
        assert 1 <= line[f'val/perplexity/{level}'] <= 32 and 0 < line[f'val/code_usage/{level}'] <= 1


# ----------------------------------------------------------------------------------------------------------------
# Training options, each in a short run

@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_trains_and_writes_a_finite_float32_checkpoint(tmp_path, amp):
    run = run_ok(['main.py', '--arch', 'vq_vae2', *SHORT, '--amp', amp], tmp_path)
    state = run.state('last.pth')
    assert state['args']['amp'] == amp and state['step'] == 4
    for name, tensor in state['model'].items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
    assert all(math.isfinite(value) for value in state['metrics'].values())
    assert not torch.equal(state['model']['decoder.net.0.weight'], initial_state(state)['decoder.net.0.weight'])
    # fp16 needs a GradScaler, whose state (4 steps on) goes into the checkpoint for a resume (test_robustness.py).
    if amp == 'fp16':
        assert state['scaler'] and state['scaler'] != torch.amp.GradScaler('cpu').state_dict()
    else:
        assert state['scaler'] == {}


@pytest.mark.parametrize('schedule, warmup', [('cosine', 0), ('cosine', 3), ('constant', 3)])
def test_the_schedule_and_warmup_set_the_learning_rate_of_every_checkpoint(tmp_path, monkeypatch, schedule, warmup):
    saved = []
    real_save = Trainer.save

    def save_and_read_back(self, name):
        real_save(self, name)
        saved.append(load_state(os.path.join(self.args.out_dir, name)))

    monkeypatch.setattr(Trainer, 'save', save_and_read_back)
    # 4 steps per epoch for 2 epochs, cut to 6 steps: the cosine spans the 6 steps that will run.
    run_ok(['main.py', '--arch', 'vq_vae', *SHORT, '--epochs', '2', '--max_steps', '6', '--lr', '1e-3',
            '--lr_schedule', schedule, '--warmup_steps', str(warmup), '--save_every_steps', '1'], tmp_path)
    steps = [state['step'] for state in saved]
    assert sorted(set(steps)) == list(range(1, 7))
    for state in saved:
        # The learning rate of the next step, the step-th counted from 0: warm-up factor times the schedule's.
        step = state['step']
        factor = min(1, (step + 1) / warmup) if warmup else 1
        if schedule == 'cosine':
            factor *= 0.5 * (1 + math.cos(math.pi * step / 6))
        assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-3 * factor, abs=1e-12), step
        assert state['scheduler']['last_epoch'] == step
        assert state['args']['warmup_steps'] == warmup
    if schedule == 'cosine':
        assert saved[-1]['optimizer']['param_groups'][0]['lr'] == pytest.approx(0, abs=1e-12)


@pytest.fixture(scope='module')
def plain_run(tmp_path_factory):
    """A short VQ-VAE-2 run without any option, to compare the options with."""
    return run_ok(['main.py', '--arch', 'vq_vae2', *SHORT], tmp_path_factory.mktemp('plain'))


def assert_same_weights(state, reference, tolerance):
    assert state['model'].keys() == reference['model'].keys()
    for name, tensor in reference['model'].items():
        torch.testing.assert_close(state['model'][name].contiguous(), tensor, rtol=tolerance, atol=tolerance,
                                   msg=lambda m: f'{name}: {m}')


def test_channels_last_trains_the_same_model(plain_run, tmp_path):
    run = run_ok(['main.py', '--arch', 'vq_vae2', *SHORT, '--channels_last'], tmp_path)
    state = run.state('last.pth')
    # The convolutions did run channels-last (their weights are stored so) ...
    assert state['model']['decoder.net.0.weight'].is_contiguous(memory_format=torch.channels_last)
    assert not state['model']['decoder.net.0.weight'].is_contiguous()
    # ... and computed the same model, up to the rounding of other convolution algorithms.
    assert_same_weights(state, plain_run.state('last.pth'), 1e-4)
    assert load_model(run.path('last.pth')).config == state['config']


def test_compile_trains_the_same_model_and_saves_plain_weights(compile_job):
    # Both runs start from a fork of this process (tests/background.py, compile_runs). They compile with the 'eager'
    # backend: inductor's C++ code generation takes 10-75 s here; compile_runs says what the test still covers.
    runs = compile_job.result()
    assert runs['compiled_models'] == ['VQVAE2']  # the trainer compiled the model, once
    state = load_state(runs['compiled'] / 'last.pth')
    assert state['args']['compile'] is True and state['step'] == 4
    assert not any(name.startswith('_orig_mod.') for name in state['model'])  # the model's keys, not the wrapper's
    assert_same_weights(state, load_state(runs['plain'] / 'last.pth'), 1e-5)
    load_model(runs['compiled'] / 'last.pth')


def test_codebook_update_loss_learns_the_codebook_by_gradient(tmp_path):
    run = run_ok(['main.py', '--arch', 'vq_vae', *SHORT, '--codebook_update', 'loss'], tmp_path)
    state = run.state('last.pth')
    assert state['config']['ema'] is False
    assert 'quantizer.embedding' in state['model'] and 'quantizer.cluster_size' not in state['model']
    initial = initial_state(state)
    assert not torch.equal(initial['quantizer.embedding'], state['model']['quantizer.embedding'])
    # The codebook is a parameter that Adam steps, with moments of its own (an EMA codebook is a buffer).
    model = load_model(run.path('last.pth'))
    names = [name for name, _ in model.named_parameters()]
    assert 'quantizer.embedding' in names and len(state['optimizer']['state']) == len(names)
    moments = state['optimizer']['state'][names.index('quantizer.embedding')]['exp_avg']
    assert moments.shape == (32, 8) and moments.abs().sum() > 0


def test_wandb_offline_writes_a_run_under_out_dir_and_a_resume_continues_it(wandb_job):
    # Both runs happen in a fork of this process (tests/background.py, wandb_runs): W&B takes seconds to start.
    first, resumed = wandb_job.result()
    out_dir = Path(first.args[first.args.index('--out_dir') + 1])
    assert read_metrics(out_dir)[0]['step'] == 2 and read_metrics(out_dir)[-1]['step'] == 3
    runs = [entry for entry in os.listdir(out_dir / 'wandb') if entry.startswith('offline-run-')]
    run_id = load_state(out_dir / 'last.pth')['wandb_run_id']
    # Offline, each start writes a folder of its own; the resume's carries the same run id (wandb sync joins them).
    assert len(runs) == 2 and all(run.endswith(f'-{run_id}') for run in runs)
    assert resumed.returncode == 0 and load_state(out_dir / 'best.pth')['wandb_run_id'] == run_id


# ----------------------------------------------------------------------------------------------------------------
# Bad input

# name -> (flags after TINY_STAGE1, a fragment the one-line error must contain)
BAD_INPUTS = {
    'unknown_arch': (['--arch', 'vq_gan'], '--arch'),
    'unknown_dataset': (['--dataset', 'imagenet'], '--dataset'),
    'unknown_preset': (['--preset', 'huge'], '--preset'),
    'image_size_not_divisible': (['--arch', 'vq_vae2', '--image_size', '30'], 'not divisible'),
    'downsample_not_a_choice': (['--downsample', '3'], '--downsample'),
    'cifar10_offline': (['--dataset', 'cifar10', '--data_dir', '{empty_dir}'],
                        'the download failed; put cifar-10-python.tar.gz'),
    'resume_missing': (['--resume', '{missing}'], 'not found'),
    'resume_corrupt': (['--resume', '{corrupt}'], 'corrupt.pth'),
    'resume_prior': (['--resume', '{prior}'], 'holds a pixelcnn model'),
    'batch_size_0': (['--batch_size', '0'], '--batch_size'),
    'batch_size_above_the_data': (['--batch_size', '1000'], 'fewer than --batch_size 1000'),
    'lr_negative': (['--lr', '-1'], '--lr'),
    'lr_too_large': (['--lr', '100'], 'must be at most 10'),
    'amp_unknown': (['--amp', 'fp8'], '--amp'),
    'out_dir_under_a_file': ([], 'cannot write to output folder'),
    'empty_imagefolder': (['--dataset', 'imagefolder', '--data_dir', '{empty_dir}'], 'no images'),
    'cuda_without_a_gpu': (['--device', 'cuda'], 'no CUDA GPU'),
}


@pytest.fixture(scope='module')
def bad_paths(tmp_path_factory, priors):
    folder = tmp_path_factory.mktemp('stage1_bad')
    paths = {'empty_dir': folder / 'empty', 'missing': folder / 'missing.pth', 'corrupt': folder / 'corrupt.pth',
             'prior': priors['flat'].path(), 'a_file': folder / 'a_file', 'folder': folder}
    paths['empty_dir'].mkdir()
    write_random_bytes(paths['corrupt'])
    paths['a_file'].write_text('a file, not a folder\n')
    return paths


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(bad_paths, name):
    if name == 'cuda_without_a_gpu' and torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    flags, fragment = BAD_INPUTS[name]
    out_dir = bad_paths['a_file'] / 'sub' if name == 'out_dir_under_a_file' else bad_paths['folder'] / 'out' / name
    result = run_in_process(['main.py', *TINY_STAGE1, *[flag.format(**bad_paths) for flag in flags],
                             '--out_dir', out_dir])
    assert fragment in assert_one_line_error(result, out_dir)
    assert not out_dir.exists()
