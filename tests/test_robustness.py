"""Robustness of training through the real scripts: a run killed with SIGKILL (or stopped by --max_steps) and resumed
ends bitwise identical to a straight run, fp16's GradScaler included; checkpoints survive SIGKILL at any moment; a
checkpoint that would run code is refused; a NaN loss stops with the last good state (or is skipped); --debug shows
the traceback.

The runs execute main.py in this process. Where a process must die by SIGKILL, it is a fork of this process: a real
process that the kill ends without any clean-up, which needs no second import of torch.
"""
import os
import random
import signal
import sys
import time
import traceback

import pytest
import torch
from torch.utils.data import TensorDataset

import main as stage1
from common.errors import UserError
from common.trainer import Trainer, train
from helpers import error_lines, load_state, run_in_process
from models import VQVAE, CheckpointError, VectorQuantizer, load_checkpoint, load_model, save_checkpoint

TIMEOUT_S = 120
# 64 images in batches of 16: 4 steps per epoch, 8 in all.
TINY_RUN = ['main.py', '--arch', 'vq_vae', '--hidden_channels', '16', '--res_channels', '8', '--num_embeddings', '32',
            '--embedding_dim', '8', '--batch_size', '16', '--num_train', '64', '--num_val', '32', '--epochs', '2',
            '--device', 'cpu']
TOTAL_STEPS = 8
KILL_AT_STEP = 6  # two steps into epoch 2


def run_ok(args):
    """Run main.py in this process; it must succeed. Returns its stdout."""
    result = run_in_process(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def fork(child, log_path):
    """Run child() in a forked copy of this process, its output in log_path; returns the child's pid.

    The child leaves with os._exit, so nothing of the test session (atexit hooks, pytest) runs in it.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = open(log_path, 'w', buffering=1)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = log
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def sigkill(pid):
    """SIGKILL a forked child and reap it; asserts that the signal is what ended it."""
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def wait_for(path, pid, log_path):
    """Wait until `path` exists; fail with the child's log if it ends first or takes too long."""
    deadline = time.time() + TIMEOUT_S
    while not os.path.exists(path):
        ended, _ = os.waitpid(pid, os.WNOHANG)
        if ended or time.time() > deadline:
            if not ended:
                sigkill(pid)
            pytest.fail(f'the child ended or hung before {path} appeared:\n{open(log_path).read()[-3000:]}')
        time.sleep(0.01)


def assert_same_training_state(path, reference_path):
    """Model weights and buffers, Adam moments, GradScaler, step and epoch of two checkpoints are bitwise equal."""
    state, reference = load_checkpoint(path), load_checkpoint(reference_path)
    assert (state['step'], state['epoch'], state['batch_in_epoch']) == (TOTAL_STEPS, 2, 0)
    assert (reference['step'], reference['epoch']) == (TOTAL_STEPS, 2)
    assert state['model'].keys() == reference['model'].keys()
    for key, tensor in reference['model'].items():
        assert torch.equal(state['model'][key], tensor), f'{key} differs from the straight run'
    for index, moments in reference['optimizer']['state'].items():
        for key, tensor in moments.items():
            assert torch.equal(state['optimizer']['state'][index][key], tensor), f'Adam {key} of parameter {index}'
    assert state['scaler'] == reference['scaler'] and state['scheduler'] == reference['scheduler']
    assert state['metrics']['val/mse'] == reference['metrics']['val/mse']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """The 8-step run without interruption, to compare the resumed runs with."""
    out_dir = tmp_path_factory.mktemp('straight')
    run_ok(TINY_RUN + ['--out_dir', out_dir])
    return out_dir / 'last.pth'


def test_a_run_killed_inside_epoch_2_and_resumed_ends_bitwise_equal_to_a_straight_run(straight, tmp_path):
    out_dir, paused, log = tmp_path / 'run', tmp_path / 'paused', tmp_path / 'killed.log'

    def run_until_paused_after_step_6():
        # The run stops (forever) right after writing last.pth at step 6, and the kill lands there: what a kill
        # at any moment of step 7 leaves on disk. (A kill during the write itself is the next test.)
        real_save = Trainer.save

        def save_then_pause(self, name):
            real_save(self, name)
            if name == 'last.pth' and self.step == KILL_AT_STEP:
                paused.touch()
                time.sleep(TIMEOUT_S)

        Trainer.save = save_then_pause
        run_in_process(TINY_RUN + ['--save_every_steps', '1', '--out_dir', out_dir])

    pid = fork(run_until_paused_after_step_6, log)
    wait_for(paused, pid, log)
    sigkill(pid)
    state = load_checkpoint(out_dir / 'last.pth')
    assert (state['step'], state['epoch'], state['batch_in_epoch']) == (KILL_AT_STEP, 1, 2)
    assert len((out_dir / 'metrics.jsonl').read_text().splitlines()) == 1
    # The dead run's lock file names it, but its lock died with it; what a kill during a save leaves is cleaned up.
    assert (out_dir / '.lock').read_text().strip() == str(pid)
    (out_dir / '.tmp_abc123.pth').write_bytes(b'half a checkpoint')

    run_ok(TINY_RUN + ['--save_every_steps', '1', '--resume', out_dir / 'last.pth', '--out_dir', out_dir])
    assert_same_training_state(out_dir / 'last.pth', straight)
    assert not (out_dir / '.tmp_abc123.pth').exists()
    assert len((out_dir / 'metrics.jsonl').read_text().splitlines()) == 2


def test_a_run_stopped_by_max_steps_inside_an_epoch_and_resumed_ends_bitwise_equal_to_a_straight_run(straight,
                                                                                                   tmp_path):
    # The first run stops at step 6, two batches into the second epoch, where the resume takes over.
    assert 'epoch 1.5:' in run_ok(TINY_RUN + ['--max_steps', '6', '--out_dir', tmp_path])
    # The flags that fix the data order and the optimisation come from the checkpoint, whatever is given now.
    stdout = run_ok(TINY_RUN + ['--resume', tmp_path / 'last.pth', '--batch_size', '8', '--seed', '3',
                              '--out_dir', tmp_path])
    (line,) = [line for line in stdout.splitlines() if line.startswith("resuming with the checkpoint's")]
    assert '--batch_size 16' in line and '--seed 0' in line
    assert_same_training_state(tmp_path / 'last.pth', straight)


def test_an_fp16_run_resumed_mid_way_continues_its_grad_scaler_and_ends_bitwise_equal(tmp_path):
    # CPU autocast supports float16 in this torch, so --amp fp16 runs here for real, GradScaler and all.
    fp16 = TINY_RUN + ['--amp', 'fp16']
    run_ok(fp16 + ['--out_dir', tmp_path / 'straight'])
    run_ok(fp16 + ['--max_steps', '6', '--out_dir', tmp_path / 'resumed'])
    scaler = load_state(tmp_path / 'resumed' / 'last.pth')['scaler']
    assert scaler and scaler != torch.amp.GradScaler('cpu').state_dict()  # six steps of growth tracking (or backoff)
    # --amp comes from the checkpoint.
    run_ok(TINY_RUN + ['--resume', tmp_path / 'resumed' / 'last.pth', '--out_dir', tmp_path / 'resumed'])
    assert load_state(tmp_path / 'resumed' / 'last.pth')['args']['amp'] == 'fp16'
    assert_same_training_state(tmp_path / 'resumed' / 'last.pth', tmp_path / 'straight' / 'last.pth')


def write_forever(path, iteration):
    """Save ~10 MB checkpoints to the same path, each holding its iteration number in every tensor."""
    while True:
        iteration += 1
        weights = {f'w{k}': torch.full((262144,), float(iteration)) for k in range(10)}
        save_checkpoint({'kind': 'vq_vae', 'config': {}, 'model': weights, 'step': iteration}, path)


def test_a_checkpoint_written_in_a_loop_survives_sigkill_at_random_moments(tmp_path):
    path, log = tmp_path / 'last.pth', tmp_path / 'writer.log'
    rng, last_step, leftovers, rounds_that_saved = random.Random(0), 0, [], 0
    for round_ in range(10):
        # Round r numbers its saves from r * 10**6, so the step on disk tells which round wrote it.
        pid = fork(lambda: write_forever(path, round_ * 10 ** 6), log)
        wait_for(path, pid, log)
        time.sleep(rng.uniform(0, 0.2))
        sigkill(pid)

        state = load_checkpoint(str(path))
        assert sorted(state['model']) == [f'w{k}' for k in range(10)]
        for key, tensor in state['model'].items():
            assert tensor.shape == (262144,) and torch.all(tensor == state['step']), f'{key} is from another save'
        assert state['step'] >= last_step
        rounds_that_saved += state['step'] > round_ * 10 ** 6
        last_step = state['step']
        leftovers.append(len([name for name in os.listdir(tmp_path) if name.startswith('.tmp_')]))
    assert rounds_that_saved > 0, 'no writer lived long enough to replace the file: the kills tested nothing'
    # A SIGKILL during torch.save leaves its temporary file behind (nothing can clean up); loading never sees it,
    # and the next run that takes the folder removes it (see the resume test above).
    print(f'\n{rounds_that_saved} of 10 killed writers had replaced last.pth; .tmp_ files after each kill: '
          f'{leftovers}')


class RunsCode:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_checkpoint_that_would_run_code_is_refused_by_main_and_load_model(tmp_path):
    marker, unsafe = tmp_path / 'MARKER', tmp_path / 'unsafe.pth'
    torch.save({'kind': 'vq_vae', 'config': {}, 'model': {}, 'payload': RunsCode(marker)}, unsafe)
    result = run_in_process(TINY_RUN + ['--resume', unsafe, '--out_dir', tmp_path / 'out'])
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith('error: ') and 'refused' in lines[0] and 'weights_only' in lines[0]
    with pytest.raises(CheckpointError, match=r'refused.*weights_only'):
        load_model(str(unsafe))
    assert not marker.exists() and not (tmp_path / 'out').exists()
    # The file really is dangerous: an unsafe load runs its payload.
    torch.load(unsafe, weights_only=False)
    assert marker.exists()


def test_a_nan_loss_stops_in_one_line_naming_the_step_and_keeps_the_finite_state_before_it(tmp_path):
    # Adam with this step size sends the weights to ~1e30 after step 1, so the loss of step 2 is NaN/inf.
    result = run_in_process(TINY_RUN + ['--lr', '10', '--out_dir', tmp_path])
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert 'NaN/inf at step' in lines[0] and '--skip_nonfinite' in lines[0]
    step = int(lines[0].split('NaN/inf at step ')[1].split(';')[0])
    state = load_checkpoint(str(tmp_path / 'last.pth'))
    assert state['step'] == step - 1 >= 1
    for key, tensor in state['model'].items():
        assert torch.isfinite(tensor).all(), f'{key} holds NaN/inf; the EMA codebook took the bad batch'


def test_debug_shows_the_traceback_and_still_exits_2(tmp_path):
    result = run_in_process(TINY_RUN + ['--resume', tmp_path / 'missing.pth', '--debug', '--out_dir', tmp_path / 'o'])
    assert result.returncode == 2, result.stderr
    assert 'Traceback (most recent call last)' in result.stderr and 'CheckpointError' in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: checkpoint not found')


def test_an_ema_quantizer_fed_a_nan_leaves_its_codebook_as_it_was():
    quantizer = VectorQuantizer(num_embeddings=8, embedding_dim=4, dead_code_threshold=1.0).train()
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    z[1, 2, 0, 1] = float('nan')
    quantizer(z)
    for key, tensor in before.items():
        assert torch.equal(quantizer.state_dict()[key], tensor), key


def train_with_nan_inputs(tmp_path, nan_calls, skip_nonfinite=0):
    """Train a tiny EMA VQ-VAE in-process for one epoch of 4 steps, feeding NaN images at the given calls.

    Returns (the model state at the start of the first NaN call, the exception raised or None).
    """
    args = stage1.build_parser().parse_args([
        '--arch', 'vq_vae', '--epochs', '1', '--batch_size', '4', '--device', 'cpu', '--out_dir', str(tmp_path),
        '--skip_nonfinite', str(skip_nonfinite)])
    os.makedirs(tmp_path, exist_ok=True)
    torch.manual_seed(0)
    images = torch.rand(16, 3, 8, 8) * 2 - 1
    train_set = val_set = TensorDataset(images, torch.zeros(16, dtype=torch.long))
    model = VQVAE(image_size=8, hidden_channels=8, num_res_blocks=1, res_channels=4, num_embeddings=8,
                  embedding_dim=4)
    data = {'name': 'random'}
    task = stage1.make_task(args, model, train_set, val_set, data, torch.device('cpu'))
    calls, before = [], {}
    training_step = task.training_step

    def poisoned_step(model, batch):
        calls.append(len(calls) + 1)
        if calls[-1] in nan_calls:
            before.setdefault('state', {k: v.clone() for k, v in model.state_dict().items()})
            batch = [batch[0] * float('nan'), batch[1]]
        return training_step(model, batch)

    task.training_step = poisoned_step
    try:
        train(args, task, rank=0, world_size=1, device=torch.device('cpu'))
    except UserError as e:
        return before['state'], e
    return before['state'], None


def test_a_nan_at_step_3_saves_the_exact_state_after_step_2_and_names_step_3(tmp_path):
    before, error = train_with_nan_inputs(tmp_path, nan_calls={3})
    assert error is not None and 'at step 3' in str(error) and str(tmp_path / 'last.pth') in str(error)
    state = load_checkpoint(str(tmp_path / 'last.pth'))
    assert (state['step'], state['epoch'], state['batch_in_epoch']) == (2, 0, 2)
    for key, tensor in before.items():
        assert torch.equal(state['model'][key], tensor), f'{key} changed by the NaN batch'


def test_skip_nonfinite_skips_one_nan_batch_and_finishes_with_finite_weights(tmp_path):
    _, error = train_with_nan_inputs(tmp_path, nan_calls={3}, skip_nonfinite=1)
    assert error is None
    state = load_checkpoint(str(tmp_path / 'last.pth'))
    assert (state['step'], state['epoch'], state['batch_in_epoch']) == (3, 1, 0)
    for key, tensor in state['model'].items():
        assert torch.isfinite(tensor).all(), f'{key} holds NaN/inf after the skipped batch'
    # A second NaN batch is one more than --skip_nonfinite 1 allows.
    _, error = train_with_nan_inputs(tmp_path / 'twice', nan_calls={2, 3}, skip_nonfinite=1)
    assert error is not None and 'at step 2' in str(error)
