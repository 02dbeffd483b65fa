"""Robustness of training through the real scripts: a run killed with SIGKILL (or stopped by --max_steps) and resumed
ends bitwise identical to a straight run; checkpoints survive SIGKILL at any moment; a checkpoint that would run code
is refused; a NaN loss stops with the last good state (or is skipped); --debug shows the traceback.

Every script run spends seconds importing torch, so the `runs` fixture starts them all at once and the tests check
the finished results.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import TensorDataset

import main as stage1
from common.errors import UserError
from common.trainer import train
from models import VQVAE, CheckpointError, VectorQuantizer, load_checkpoint, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per run: several runs share few busy cores, where OpenMP threads waiting on each other cost a lot.
ENV = {**os.environ, 'WANDB_MODE': 'disabled', 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
TIMEOUT_S = 600
# 64 images in batches of 16: 4 steps per epoch, 8 in all.
TINY_RUN = ['main.py', '--arch', 'vq_vae', '--hidden_channels', '16', '--res_channels', '8', '--num_embeddings', '32',
            '--embedding_dim', '8', '--batch_size', '16', '--num_train', '64', '--num_val', '32', '--epochs', '2',
            '--device', 'cpu']
TOTAL_STEPS = 8


class RunsCode:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def start(folder, name, argv):
    """Start a script in the repo root with its output in files (a full pipe would block it)."""
    out, err = open(folder / f'{name}.out', 'w'), open(folder / f'{name}.err', 'w')
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=ENV, stdout=out, stderr=err)


def finish(folder, name, proc):
    """Wait for a run; returns (exit status, stdout, stderr)."""
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, (folder / f'{name}.out').read_text(), (folder / f'{name}.err').read_text()


def error_lines(stderr):
    """stderr without tqdm's progress bars (lines redrawn with carriage returns)."""
    return [line for line in stderr.splitlines() if line.strip() and '\r' not in line and '%|' not in line]


def run_until_killed_mid_epoch_2(folder, out_dir, attempt):
    """Start the 2-epoch run saving every step; SIGKILL it once a checkpoint inside epoch 2 is on disk.

    Returns (step of the last.pth it left, None) or (None, why the kill did not land inside epoch 2).
    """
    name = f'killed_{attempt}'
    proc = start(folder, name, TINY_RUN + ['--save_every_steps', '1', '--out_dir', str(out_dir)])
    path, seen, deadline = out_dir / 'last.pth', None, time.time() + TIMEOUT_S
    while proc.poll() is None and time.time() < deadline:
        mtime = path.stat().st_mtime_ns if path.exists() else None
        if mtime is not None and mtime != seen:
            seen = mtime
            if torch.load(path, weights_only=True)['step'] > TOTAL_STEPS // 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    returncode, _, stderr = finish(folder, name, proc)
    if returncode != -signal.SIGKILL:
        return None, f'the run ended by itself (exit status {returncode}) before a step of epoch 2 was saved:\n{stderr}'
    step = torch.load(path, weights_only=True)['step']
    epochs_done = len((out_dir / 'metrics.jsonl').read_text().splitlines())
    if not (TOTAL_STEPS // 2 < step < TOTAL_STEPS and epochs_done == 1):
        return None, f'the kill landed after step {step} with {epochs_done} epochs logged, not inside epoch 2'
    return step, None


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Every script run of this file, started together; name -> (exit status, stdout, stderr), plus folders."""
    folder = tmp_path_factory.mktemp('robustness')
    dirs = {name: folder / name for name in ('straight', 'max_steps', 'nan', 'unsafe', 'debug')}
    unsafe = folder / 'unsafe.pth'
    torch.save({'kind': 'vq_vae', 'config': {}, 'model': {}, 'payload': RunsCode(folder / 'MARKER')}, unsafe)
    procs = {
        'straight': start(folder, 'straight', TINY_RUN + ['--out_dir', str(dirs['straight'])]),
        'max_steps': start(folder, 'max_steps', TINY_RUN + ['--save_every_steps', '1', '--max_steps', '6',
                                                            '--out_dir', str(dirs['max_steps'])]),
        # Adam with this step size sends the weights to ~1e30 after step 1, so the loss of step 2 is NaN/inf.
        'nan': start(folder, 'nan', TINY_RUN + ['--lr', '1e30', '--out_dir', str(dirs['nan'])]),
        'unsafe_resume': start(folder, 'unsafe_resume', TINY_RUN + ['--resume', str(unsafe),
                                                                    '--out_dir', str(dirs['unsafe'])]),
        'debug': start(folder, 'debug', TINY_RUN + ['--resume', str(folder / 'missing.pth'), '--debug',
                                                    '--out_dir', str(dirs['debug'])]),
    }
    result = {'folder': folder, 'dirs': dirs, 'unsafe': unsafe}
    # The other runs share the CPU meanwhile, which only widens the window for the kill; a retry starts afresh.
    for attempt in range(2):
        dirs['killed'] = folder / f'killed_{attempt}'
        result['killed_step'], result['kill_problem'] = run_until_killed_mid_epoch_2(folder, dirs['killed'], attempt)
        if result['killed_step'] is not None:
            break
    if result['killed_step'] is not None:
        procs['killed_resumed'] = start(folder, 'killed_resumed', TINY_RUN + [
            '--save_every_steps', '1', '--resume', str(dirs['killed'] / 'last.pth'), '--out_dir', str(dirs['killed'])])
    result['max_steps'] = finish(folder, 'max_steps', procs.pop('max_steps'))
    procs['max_steps_resumed'] = start(folder, 'max_steps_resumed', TINY_RUN + [
        '--resume', str(dirs['max_steps'] / 'last.pth'), '--out_dir', str(dirs['max_steps'])])
    result.update({name: finish(folder, name, proc) for name, proc in procs.items()})
    return result


def succeeded(runs, name):
    """Assert that a run exited 0 and return its stdout."""
    returncode, stdout, stderr = runs[name]
    assert returncode == 0, f'{name} exited with {returncode}:\n{stderr}'
    return stdout


def assert_same_training_state(path, reference_path):
    """Model weights and buffers, Adam moments, step and epoch of two checkpoints are bitwise equal."""
    state, reference = load_checkpoint(path), load_checkpoint(reference_path)
    assert (state['step'], state['epoch'], state['batch_in_epoch']) == (TOTAL_STEPS, 2, 0)
    assert (reference['step'], reference['epoch']) == (TOTAL_STEPS, 2)
    assert state['model'].keys() == reference['model'].keys()
    for key, tensor in reference['model'].items():
        assert torch.equal(state['model'][key], tensor), f'{key} differs from the straight run'
    for index, moments in reference['optimizer']['state'].items():
        for key, tensor in moments.items():
            assert torch.equal(state['optimizer']['state'][index][key], tensor), f'Adam {key} of parameter {index}'


def test_a_run_killed_inside_epoch_2_and_resumed_ends_bitwise_equal_to_a_straight_run(runs):
    succeeded(runs, 'straight')
    assert runs['kill_problem'] is None, runs['kill_problem']
    succeeded(runs, 'killed_resumed')
    assert_same_training_state(runs['dirs']['killed'] / 'last.pth', runs['dirs']['straight'] / 'last.pth')


def test_a_run_stopped_by_max_steps_inside_an_epoch_and_resumed_ends_bitwise_equal_to_a_straight_run(runs):
    succeeded(runs, 'straight')
    # The first run stopped at step 6, two batches into the second epoch, where the resume took over.
    assert 'epoch 1.5:' in succeeded(runs, 'max_steps')
    succeeded(runs, 'max_steps_resumed')
    assert_same_training_state(runs['dirs']['max_steps'] / 'last.pth', runs['dirs']['straight'] / 'last.pth')


WRITER = '''
import os, sys
import torch
from models import save_checkpoint

path = sys.argv[1]


def write_forever(iteration):
    """Save ~10 MB checkpoints to the same path, each holding its iteration number in every tensor."""
    while True:
        iteration += 1
        weights = {f'w{k}': torch.full((262144,), float(iteration)) for k in range(10)}
        save_checkpoint({'kind': 'vq_vae', 'config': {}, 'model': weights, 'step': iteration}, path)


# torch is imported once; each round forks a fresh writer for the test to SIGKILL.
for command in sys.stdin:
    if command.startswith('start'):
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(int(command.split()[1]))
            finally:
                os._exit(1)
        print(pid, flush=True)
    else:
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''


def test_a_checkpoint_written_in_a_loop_survives_sigkill_at_random_moments(tmp_path):
    script, path = tmp_path / 'writer.py', tmp_path / 'last.pth'
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(path)], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    rng, last_step, leftovers, rounds_that_saved = random.Random(0), 0, [], 0
    try:
        for round_ in range(10):
            # Round r numbers its saves from r * 10**6, so the step on disk tells which round wrote it.
            writer.stdin.write(f'start {round_ * 10**6}\n')
            writer.stdin.flush()
            pid = int(writer.stdout.readline())
            deadline = time.time() + TIMEOUT_S
            while not path.exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            os.kill(pid, signal.SIGKILL)
            writer.stdin.write('reap\n')
            writer.stdin.flush()
            assert int(writer.stdout.readline()) == -signal.SIGKILL, f'round {round_}: the writer was not killed'

            state = load_checkpoint(str(path))
            assert sorted(state['model']) == [f'w{k}' for k in range(10)]
            for key, tensor in state['model'].items():
                assert tensor.shape == (262144,) and torch.all(tensor == state['step']), f'{key} is from another save'
            assert state['step'] >= last_step
            rounds_that_saved += state['step'] > round_ * 10**6
            last_step = state['step']
            leftovers.append(len([name for name in os.listdir(tmp_path) if name.startswith('.tmp_')]))
    finally:
        writer.stdin.close()
        writer.kill()
        writer.wait()
    assert rounds_that_saved > 0, 'no writer lived long enough to replace the file: the kills tested nothing'
    # A SIGKILL during torch.save leaves its temporary file behind (nothing can clean up); loading never sees it.
    print(f'\n{rounds_that_saved} of 10 killed writers had replaced last.pth; .tmp_ files after each kill: '
          f'{leftovers}')


def test_a_checkpoint_that_would_run_code_is_refused_by_main_and_load_model(runs):
    marker, unsafe = runs['folder'] / 'MARKER', runs['unsafe']
    returncode, _, stderr = runs['unsafe_resume']
    lines = error_lines(stderr)
    assert returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith('error: ') and 'refused' in lines[0] and 'weights_only' in lines[0]
    with pytest.raises(CheckpointError, match=r'refused.*weights_only'):
        load_model(str(unsafe))
    assert not marker.exists()
    # The file really is dangerous: an unsafe load runs its payload.
    torch.load(unsafe, weights_only=False)
    assert marker.exists()


def test_a_nan_loss_stops_in_one_line_naming_the_step_and_keeps_the_finite_state_before_it(runs):
    returncode, _, stderr = runs['nan']
    lines = error_lines(stderr)
    assert returncode == 2 and len(lines) == 1, stderr
    assert 'NaN/inf at step 2' in lines[0] and '--skip_nonfinite' in lines[0]
    state = load_checkpoint(str(runs['dirs']['nan'] / 'last.pth'))
    assert (state['step'], state['batch_in_epoch']) == (1, 1)
    for key, tensor in state['model'].items():
        assert torch.isfinite(tensor).all(), f'{key} holds NaN/inf; the EMA codebook took the bad batch'


def test_debug_shows_the_traceback_and_still_exits_2(runs):
    returncode, _, stderr = runs['debug']
    assert returncode == 2, stderr
    assert 'Traceback (most recent call last)' in stderr and 'CheckpointError' in stderr
    assert stderr.strip().splitlines()[-1].startswith('error: checkpoint not found')


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
    data = {'name': 'random', 'image_size': 8}
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
