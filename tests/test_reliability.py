"""Hostile input, checked through the real scripts and API: one line on stderr and exit status 2 (or the correct
result), and no partial output.

Most runs call a script's `main` in this process through `run_main`, the same path as `python script.py`; the runs
whose point is a process (a second live run, SIGKILL, SIGINT, a slowed fsync) start real subprocesses.
"""
import contextlib
import importlib
import io
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import run_main
from helpers import TINY_STAGE1, assert_one_line_error, finish, script_env, start_script
from models import CheckpointError, load_checkpoint, load_model, sample_from_logits, save_checkpoint

TINY_PRIOR = ['--hidden_channels', '8', '--num_layers', '2', '--embedding_dim', '8', '--batch_size', '32',
              '--epochs', '1', '--max_steps', '3', '--num_epoch_samples', '0', '--device', 'cpu']


def run(script, argv):
    """Run a script's main(args) in this process, as its __main__ does; returns (exit status, stderr lines)."""
    module = importlib.import_module(script)
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_main(module.main, module.build_parser().parse_args([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
    return code, [line for line in stderr.getvalue().splitlines() if line.strip() and '\r' not in line
                  and not line.startswith(('epoch ', 'extracting', 'sampling'))]


def one_line_error(script, argv, out_dir=None):
    """Run and assert: exit 2, exactly one 'error:' line, and nothing left in out_dir; returns the line."""
    code, lines = run(script, argv)
    errors = [line for line in lines if 'error' in line]
    assert code == 2, lines
    assert len(errors) == 1 and 'Traceback' not in ''.join(lines), lines
    if out_dir is not None:
        assert not os.path.exists(out_dir) or not [n for n in os.listdir(out_dir) if n != '.lock'], os.listdir(out_dir)
    return errors[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, single_thread):
    """A tiny stage-1 VQ-VAE-2 and a stage-2 prior over its codes, made by the real scripts."""
    root = tmp_path_factory.mktemp('reliability')
    vq_dir, prior_dir = root / 'vq', root / 'prior'
    assert run('main', TINY_STAGE1 + ['--arch', 'vq_vae2', '--image_size', '16', '--out_dir', vq_dir])[0] == 0
    assert run('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', vq_dir / 'best.pth', '--out_dir', prior_dir]
               + TINY_PRIOR)[0] == 0
    return {'vq': str(vq_dir / 'best.pth'), 'prior': str(prior_dir / 'last.pth'), 'root': root}


def tampered(state, path, **changes):
    """Write a copy of a checkpoint dict with some entries replaced (or, for a value None, removed)."""
    state = dict(state)
    for name, value in changes.items():
        if value is None:
            state.pop(name, None)
        else:
            state[name] = value
    save_checkpoint(state, path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# 1. One run per output folder

def fork_stage1(argv, log_path, before=None):
    """Run main.py's main with `argv` in a fork of this process (torch is imported already, so it starts at once);
    its stdout and stderr go to `log_path`. Returns the child's pid; it exits with the script's exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, 'w', buffering=1, closefd=False)
            sys.stderr = open(2, 'w', buffering=1, closefd=False)
            if before is not None:
                before()
            module = importlib.import_module('main')
            run_main(module.main, module.build_parser().parse_args([str(a) for a in argv]))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_exit_status(pid, timeout=300):
    """The exit status of a forked child (waiting up to `timeout` seconds)."""
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.time() < deadline, 'the forked run hangs'
        time.sleep(0.1)


def wait_for(path, pid, timeout=120):
    """Wait until `path` exists, while the child `pid` still runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0, 'the run ended or hangs'
        time.sleep(0.05)


def slow_fsync():
    """In the child: every fsync sleeps a second first, so each save stays half-written for a while."""
    fsync = os.fsync
    os.fsync = lambda fd: (time.sleep(1.0), fsync(fd))[1]


def test_a_second_run_in_a_live_runs_folder_refuses_and_the_first_one_finishes(tmp_path):
    # The first run's saves are slowed down, so it is surely mid-save, with a .tmp_*.pth in the folder, when the
    # second run starts in the same folder.
    out_dir = tmp_path / 'run'
    first = fork_stage1([*TINY_STAGE1, '--save_every_steps', '10', '--out_dir', out_dir], tmp_path / 'first.log',
                        before=slow_fsync)
    deadline = time.time() + 120
    while not any(n.startswith('.tmp_') for n in (os.listdir(out_dir) if out_dir.exists() else [])):
        assert time.time() < deadline and os.waitpid(first, os.WNOHANG)[0] == 0
        time.sleep(0.05)
    line = one_line_error('main', [*TINY_STAGE1, '--out_dir', out_dir])
    assert 'in use by another run' in line and f'process {first}' in line
    assert any(n.startswith('.tmp_') for n in os.listdir(out_dir))  # the live run's save was left alone
    assert wait_exit_status(first) == 0, (tmp_path / 'first.log').read_text()[-2000:]
    assert load_checkpoint(str(out_dir / 'last.pth'))['step'] == 30


def test_resume_in_the_folder_of_a_killed_run_works(tmp_path):
    out_dir = tmp_path / 'run'
    pid = fork_stage1([*TINY_STAGE1, '--max_steps', '100000', '--epochs', '50', '--out_dir', out_dir],
                      tmp_path / 'run.log')
    wait_for(out_dir / 'last.pth', pid)
    os.kill(pid, signal.SIGKILL)
    wait_exit_status(pid)
    code, lines = run('main', ['--resume', out_dir / 'last.pth', '--epochs', '2', '--max_steps', '35'])
    assert code == 0, lines
    assert load_checkpoint(str(out_dir / 'last.pth'))['step'] == 35


def test_sigint_stops_with_one_line_naming_the_last_checkpoint(tmp_path):
    out_dir = tmp_path / 'run'
    # Ctrl-C as in a terminal: a test session started in the background (`cmd &` in a script) inherits SIGINT
    # ignored, and Python then leaves it ignored, so the child restores Python's own handler first.
    pid = fork_stage1([*TINY_STAGE1, '--max_steps', '100000', '--epochs', '50', '--out_dir', out_dir],
                      tmp_path / 'run.log', before=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    wait_for(out_dir / 'last.pth', pid)
    os.kill(pid, signal.SIGINT)
    assert wait_exit_status(pid, 60) == 130
    log = (tmp_path / 'run.log').read_text()
    lines = [line for line in log.replace('\r', '\n').splitlines() if line.strip() and not line.startswith('epoch')
             and not line.startswith(('vq_vae', 'final'))]
    assert 'Traceback' not in log, log[-2000:]
    assert len(lines) == 1 and str(out_dir / 'last.pth') in lines[0], lines


# ----------------------------------------------------------------------------------------------------------------
# 2. Checkpoint contents are checked before anything is built

@pytest.mark.parametrize('changes, field', [
    ({'hidden_channels': -4}, 'hidden_channels'),
    ({'num_embeddings': 10 ** 12}, 'num_embeddings'),
    ({'bogus': 1}, 'bogus'),
    ({'downsample': 3}, 'downsample'),
    ({'decay': 5.0}, 'decay'),
    ({'dead_code_threshold': float('nan')}, 'dead_code_threshold'),
])
def test_a_tampered_vq_config_is_a_checkpoint_error_naming_the_file_and_field(trained, tmp_path, changes, field):
    state = load_checkpoint(trained['vq'])
    path = tampered(state, tmp_path / 'bad.pth', config={**state['config'], **changes})
    with pytest.raises(CheckpointError, match=field) as error:
        load_model(path)
    assert path in str(error.value)
    line = one_line_error('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', path, '--out_dir', tmp_path / 'o']
                          + TINY_PRIOR, tmp_path / 'o')
    assert field in line and path in line


@pytest.mark.parametrize('changes, words', [
    ({'config': [1, 2]}, 'config must be a dict'),
    ({'model': torch.zeros(3)}, 'model must be a dict'),
    ({'kind': 7}, 'kind must be'),
])
def test_a_malformed_checkpoint_is_a_checkpoint_error(trained, tmp_path, changes, words):
    path = tampered(load_checkpoint(trained['vq']), tmp_path / 'bad.pth', **changes)
    with pytest.raises(CheckpointError, match=words):
        load_model(path)


def test_a_class_conditional_prior_with_zero_classes_is_refused(trained, tmp_path):
    state = load_checkpoint(trained['prior'])
    path = tampered(state, tmp_path / 'bad.pth', config={**state['config'], 'num_classes': 0})
    with pytest.raises(CheckpointError, match='num_classes'):
        load_model(path)


def test_weights_that_do_not_fit_name_the_first_mismatching_key(trained, tmp_path):
    state = load_checkpoint(trained['vq'])
    path = tampered(state, tmp_path / 'bad.pth', config={**state['config'], 'embedding_dim': 4})
    with pytest.raises(CheckpointError, match=r'size mismatch for \w'):
        load_model(path)


def test_kinds_given_as_a_string_is_matched_exactly(trained):
    with pytest.raises(CheckpointError, match='vq_vae checkpoint is needed'):
        load_model(trained['vq'], kinds='vq_vae')  # 'vq_vae' is a substring of 'vq_vae2'
    assert load_model(trained['vq'], kinds='vq_vae2').kind == 'vq_vae2'


@pytest.mark.parametrize('changes, words', [
    ({'code_shapes': 'garbage'}, 'code_shapes'),
    ({'vq_checkpoint': 'runs/x.pth'}, 'vq_checkpoint'),
])
def test_stage_3_refuses_a_prior_with_broken_entries(trained, tmp_path, changes, words):
    path = tampered(load_checkpoint(trained['prior']), tmp_path / 'bad.pth', **changes)
    line = one_line_error('generate_samples_pixelcnn_vqvae2', ['--vqvae2_checkpoint', trained['vq'],
                          '--prior_checkpoint', path, '--out_dir', tmp_path / 'o', '--device', 'cpu'], tmp_path / 'o')
    assert words in line


def test_a_bare_model_export_is_refused_as_stage_1_checkpoint_and_for_resume(trained, tmp_path):
    state = load_checkpoint(trained['vq'])
    export = tampered({k: state[k] for k in ('kind', 'config', 'model')}, tmp_path / 'export.pth')
    assert load_model(export).kind == 'vq_vae2'  # what the docs promise: enough to rebuild the model
    line = one_line_error('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', export, '--out_dir', tmp_path / 'o']
                          + TINY_PRIOR, tmp_path / 'o')
    assert 'no usable data settings' in line
    line = one_line_error('main', ['--resume', export])
    assert 'resume' in line


def test_a_directory_or_unreadable_path_is_named_for_what_it_is(trained, tmp_path):
    with pytest.raises(CheckpointError, match='is a directory'):
        load_model(str(tmp_path))
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / 'locked.pth'
        shutil.copy(trained['vq'], unreadable)
        unreadable.chmod(0)
        with pytest.raises(CheckpointError, match='permission denied'):
            load_model(str(unreadable))


def test_checkpoints_get_the_umask_mode_not_0600(trained):
    expected = 0o666 & ~_umask()
    assert os.stat(trained['vq']).st_mode & 0o777 == expected


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# 3. A damaged code cache is moved aside and extracted again

class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


@pytest.mark.parametrize('damage', ['truncated', 'pickle', 'list'])
def test_a_damaged_code_cache_is_reported_moved_aside_and_rebuilt(trained, tmp_path, damage):
    vq_dir = tmp_path / 'vq'
    vq_dir.mkdir()
    shutil.copy(trained['vq'], vq_dir / 'best.pth')
    shutil.copytree(os.path.join(os.path.dirname(trained['vq']), 'codes_cache'), vq_dir / 'codes_cache')
    victim = sorted((vq_dir / 'codes_cache').glob('*_train_*.pt'))[0]
    if damage == 'truncated':
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == 'pickle':
        victim.write_bytes(pickle.dumps(Evil()))
    else:
        torch.save([1, 2, 3], victim)
    code, lines = run('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', vq_dir / 'best.pth', '--out_dir',
                                                tmp_path / 'o'] + TINY_PRIOR)
    assert code == 0, lines
    warnings = [line for line in lines if line.startswith('WARNING')]
    assert len(warnings) == 1 and str(victim) in warnings[0], lines
    assert os.path.exists(f'{victim}.bad') and torch.load(victim, weights_only=True)['codes']['labels'].numel() > 0


# ----------------------------------------------------------------------------------------------------------------
# 4. A resume against a VQ model that does not fit

@pytest.mark.parametrize('vq_flags, words', [
    (['--num_embeddings', '64'], 'codes'),
    (['--image_size', '32'], 'code grids'),
])
def test_resuming_a_prior_with_another_vq_model_refuses_before_writing(trained, tmp_path, vq_flags, words):
    other = tmp_path / 'other_vq'
    assert run('main', TINY_STAGE1 + ['--arch', 'vq_vae2', '--image_size', '16', '--max_steps', '2',
                                      '--out_dir', other] + vq_flags)[0] == 0
    prior_dir = tmp_path / 'prior'
    shutil.copytree(os.path.dirname(trained['prior']), prior_dir)
    before = {name: os.path.getmtime(prior_dir / name) for name in os.listdir(prior_dir)}
    line = one_line_error('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', other / 'best.pth', '--resume',
                                                    prior_dir / 'last.pth', '--epochs', '5'])
    assert words in line
    assert {name: os.path.getmtime(prior_dir / name) for name in os.listdir(prior_dir)} == before


# ----------------------------------------------------------------------------------------------------------------
# 5. NaN recovery

def test_a_diverged_run_with_skip_nonfinite_stops_with_one_line(trained, tmp_path):
    for script, source, flag in (('main', trained['vq'], None), ('train_pixelcnn_vqvae2', trained['prior'],
                                                                 '--vqvae2_checkpoint')):
        state = load_checkpoint(os.path.join(os.path.dirname(source), 'last.pth'))
        run_dir = tmp_path / script
        run_dir.mkdir()
        path = tampered(state, run_dir / 'last.pth', model={k: v.float().fill_(float('nan'))
                                                              if v.is_floating_point() else v
                                                              for k, v in state['model'].items()})
        argv = ['--resume', path, '--epochs', '3', '--skip_nonfinite', '1000']
        if flag:
            argv += [flag, trained['vq']]
        line = one_line_error(script, argv)
        assert 'every batch' in line


def test_an_explicit_lr_overrides_the_checkpoint_lr_on_resume(trained, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(os.path.dirname(trained['prior']), run_dir)
    code, lines = run('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', trained['vq'], '--resume',
                                                run_dir / 'last.pth', '--epochs', '2', '--max_steps', '4',
                                                '--lr', '1e-5'])
    assert code == 0, lines
    state = load_checkpoint(str(run_dir / 'last.pth'))
    assert state['args']['lr'] == 1e-5
    assert all(group['lr'] == pytest.approx(1e-5) for group in state['optimizer']['param_groups'])


def test_resume_with_nothing_left_to_do_says_so(trained, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(os.path.dirname(trained['prior']), run_dir)
    line = one_line_error('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', trained['vq'], '--resume',
                                                    run_dir / 'last.pth', '--max_steps', '3'])
    assert 'nothing to do' in line  # the run stopped at --max_steps 3 already


# ----------------------------------------------------------------------------------------------------------------
# 6. Numbers checked where they are parsed, and memory estimated before allocating

@pytest.mark.parametrize('flags, words', [
    (['--seed', '99999999999999999999999'], '--seed'),
    (['--lr', '1e39'], '--lr'),
    (['--image_size', '100000'], '--image_size'),
    (['--hidden_channels', '1'], '--hidden_channels'),
    (['--hidden_channels', '100000000'], '--hidden_channels'),
    (['--num_embeddings', '1000000000000'], '--num_embeddings'),
    (['--decay', '5'], '--decay'),
    (['--dead_code_threshold', 'nan'], '--dead_code_threshold'),
])
def test_out_of_range_numbers_are_refused_at_parse_time(tmp_path, flags, words):
    line = one_line_error('main', flags + ['--out_dir', tmp_path / 'o'], tmp_path / 'o')
    assert words in line


def test_a_model_too_big_for_memory_is_refused_with_the_estimate(tmp_path):
    line = one_line_error('main', ['--image_size', '4096', '--device', 'cpu', '--out_dir', tmp_path / 'o'],
                          tmp_path / 'o')
    assert 'GiB' in line and 'needs about' in line


def test_a_huge_prior_is_refused_at_parse_time(trained, tmp_path):
    line = one_line_error('train_pixelcnn_vqvae2', ['--vqvae2_checkpoint', trained['vq'], '--hidden_channels',
                                                    '1000000', '--out_dir', tmp_path / 'o'], tmp_path / 'o')
    assert '--hidden_channels' in line


# ----------------------------------------------------------------------------------------------------------------
# 7. Results that used to be silently wrong

def test_a_tiny_temperature_picks_the_most_likely_code():
    logits = torch.randn(64, 32)
    codes = sample_from_logits(logits, temperature=1e-40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, logits.argmax(1))


def test_stage_3_with_a_tiny_temperature_draws_the_most_likely_codes(trained, tmp_path):
    argv = ['--vqvae2_checkpoint', trained['vq'], '--prior_checkpoint', trained['prior'], '--num_samples', '4',
            '--device', 'cpu']
    assert run('generate_samples_pixelcnn_vqvae2', argv + ['--temperature', '1e-40', '--out_dir', tmp_path / 'a'])[0] == 0
    assert run('generate_samples_pixelcnn_vqvae2', argv + ['--temperature', '1e-30', '--seed', '5',
                                                           '--out_dir', tmp_path / 'b'])[0] == 0
    a, b = (torch.load(tmp_path / name / 'codes.pt', weights_only=True) for name in 'ab')
    assert torch.equal(a['codes_bottom'], b['codes_bottom'])  # argmax: no randomness left, whatever the seed


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)


def test_image_folders_follow_no_directory_twice_and_scale_16_bit_images(tmp_path):
    from common.data import _read_rgb, build_dataset
    root = tmp_path / 'images'
    (root / 'cats').mkdir(parents=True)
    for i in range(10):
        _png(root / 'cats' / f'{i}.png', np.full((8, 8, 3), i * 20, np.uint8))
    os.symlink(root, root / 'cats' / 'loop')  # a symlink loop
    dataset, info = build_dataset('imagefolder', 'train', 8, str(root))
    assert len(dataset) + len(build_dataset('imagefolder', 'val', 8, str(root))[0]) == 10
    deep = tmp_path / 'deep.png'
    _png(deep, np.full((8, 8), 32768, np.uint16))
    assert abs(int(np.asarray(_read_rgb(str(deep))).mean()) - 128) <= 1


def test_a_flat_image_folder_is_one_unlabelled_class(tmp_path):
    from common.data import build_dataset
    for i in range(12):
        _png(tmp_path / f'{i}.jpg', np.full((8, 8, 3), i, np.uint8))
    dataset, info = build_dataset('imagefolder', 'train', 8, str(tmp_path))
    assert info['num_classes'] == 1 and len(dataset) == 10


def test_a_decompression_bomb_is_an_unreadable_image_naming_the_file(tmp_path):
    root = tmp_path / 'images'
    root.mkdir()
    for i in range(9):
        _png(root / f'{i}.png', np.zeros((8, 8, 3), np.uint8))
    Image.new('L', (14000, 14000)).save(root / 'bomb.png')  # 196M pixels in a small file
    line = one_line_error('main', ['--dataset', 'imagefolder', '--data_dir', root, '--image_size', '8',
                                   '--downsample', '2', '--batch_size', '2', '--out_dir', tmp_path / 'o'],
                          tmp_path / 'o')
    assert 'bomb.png' in line


# ----------------------------------------------------------------------------------------------------------------
# 8. Smaller things

def test_an_error_in_a_dataloader_worker_prints_the_same_line_as_in_the_main_process(tmp_path):
    root = tmp_path / 'images'
    root.mkdir()
    for i in range(20):
        _png(root / f'{i}.png', np.zeros((8, 8, 3), np.uint8))
    (root / '15.png').write_bytes(b'not a png')
    line = one_line_error('main', ['--dataset', 'imagefolder', '--data_dir', root, '--image_size', '8',
                                   '--downsample', '2', '--batch_size', '2', '--num_workers', '1',
                                   '--out_dir', tmp_path / 'o'], tmp_path / 'o')
    assert line.startswith('error: cannot read image') and '15.png' in line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('mount') is None, reason='needs root to mount a tmpfs')
def test_a_full_disk_during_generation_is_one_line_and_leaves_no_partial_samples(trained, tmp_path):
    full = tmp_path / 'full'
    full.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(full)]).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    try:
        line = one_line_error('generate_samples_pixelcnn_vqvae2', [
            '--vqvae2_checkpoint', trained['vq'], '--prior_checkpoint', trained['prior'], '--num_samples', '64',
            '--save_individual', '--device', 'cpu', '--out_dir', full / 'samples'])
        assert 'no space left on device' in line
        left = os.listdir(full / 'samples') if (full / 'samples').exists() else []
        assert not [name for name in left if name.endswith('.png') or name.endswith('.pt')], left
    finally:
        subprocess.run(['umount', str(full)])


@pytest.fixture(scope='module')
def wandb_offline_run(tmp_path_factory):
    """A run with W&B online and no network, started when the module starts: it mostly waits, so it overlaps the
    other tests. Yields (Popen, start time, out_dir)."""
    out_dir = tmp_path_factory.mktemp('wandb') / 'o'
    started = time.time()
    process = start_script(['main.py', *TINY_STAGE1, '--wandb', '--out_dir', out_dir],
                           env=script_env(WANDB_MODE='online', WANDB_API_KEY='x' * 40,
                                          WANDB_BASE_URL='http://127.0.0.1:9'))
    result = {}
    waiter = threading.Thread(target=lambda: result.update(run=finish(process), seconds=time.time() - started))
    waiter.start()
    yield waiter, result, out_dir
    process.kill()
    waiter.join()


@pytest.fixture(scope='module')
def torchrun_bad_argument(tmp_path_factory):
    """torchrun with 2 processes and a bad flag, started when the module starts (it mostly waits on imports)."""
    out_dir = tmp_path_factory.mktemp('torchrun') / 'o'
    process = start_script(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
                            'main.py', '--hidden_channels', '1', '--device', 'cpu', '--out_dir', out_dir])
    yield process, out_dir
    process.kill()


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module', autouse=True)
def start_slow_runs_first(wandb_offline_run, torchrun_bad_argument):
    """Start the W&B and torchrun runs before any other test of the module."""


def test_under_torchrun_a_bad_argument_is_reported_once_by_rank_0(torchrun_bad_argument):
    process, out_dir = torchrun_bad_argument
    result = finish(process)
    ours = [line for line in result.stderr.splitlines() if 'error: argument --hidden_channels' in line]
    # torchrun adds its own summary of the failed processes after our line; the other rank never repeats it.
    assert result.returncode != 0 and len(ours) == 1 and not ours[0].startswith('rank'), result.stderr[-3000:]
    assert not out_dir.exists()


def test_w_and_b_online_without_a_network_fails_quickly_and_leaves_nothing(wandb_offline_run):
    waiter, result, out_dir = wandb_offline_run
    waiter.join()
    line = assert_one_line_error(result['run'], out_dir)
    # W&B's own default waits minutes; ours gives up after 15 s (plus imports, on a busy machine).
    assert 'W&B' in line and result['seconds'] < 60, result['seconds']
    assert not out_dir.exists()


def test_perplexity_is_one_formula():
    from models import code_statistics
    counts = torch.tensor([4.0, 4.0, 0.0, 0.0])
    perplexity, usage = code_statistics(counts)
    assert math.isclose(float(perplexity), 2.0, rel_tol=1e-6) and float(usage) == 0.5
