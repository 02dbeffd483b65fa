"""Running the real scripts from tests: in this process (fast) or in a subprocess (when the process is the point).

`run_in_process` executes a script's `if __name__ == '__main__':` block with runpy, so the real parser, `main` and
`run_main` (one-line errors, exit status 2) run exactly as on the command line, without the seconds a new process
spends importing torch. Both runners return a `subprocess.CompletedProcess` with returncode, stdout and stderr, so the
same assertions (`assert_succeeded`, `assert_one_line_error`) apply to either. Use `run_script` (a real process) only
where exit status, stderr or signals of a process are what is tested.
"""
import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
import runpy
import subprocess
import sys
import traceback
import urllib.error
import urllib.request
from unittest import mock

import torch

from common.data import ShapesDataset
from models import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # generous: the test machines are small and shared
# A stage-1 model and data small enough to train in a second: 480 training images are 30 steps of 16.
TINY_STAGE1 = ['--hidden_channels', '16', '--res_channels', '8', '--num_res_blocks', '1', '--num_embeddings', '32',
               '--embedding_dim', '8', '--batch_size', '16', '--num_train', '480', '--num_val', '128',
               '--epochs', '1', '--max_steps', '30', '--lr', '5e-3', '--device', 'cpu']
# A prior for TINY_STAGE1's codes: ten steps of 32 code grids.
TINY_PRIOR = ['--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8', '--batch_size', '32',
              '--max_steps', '10', '--num_epoch_samples', '4', '--lr', '1e-2', '--device', 'cpu']
# The flag that names the VQ checkpoint, per stage-2 and stage-3 script.
VQ_FLAG = {'train_pixelcnn_vqvae.py': '--vqvae_checkpoint', 'train_pixelcnn_vqvae2.py': '--vqvae2_checkpoint',
           'generate_samples_pixelcnn_vqvae.py': '--vqvae_checkpoint',
           'generate_samples_pixelcnn_vqvae2.py': '--vqvae2_checkpoint'}


def script_env(**extra):
    """The environment for a script run: W&B offline, one thread per process, and every download failing at once.

    The proxies point at a closed local port, so a download attempt ends in 'connection refused' instead of
    reaching the network.
    """
    closed_port = 'http://127.0.0.1:9'
    return {**os.environ, 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'OMP_NUM_THREADS': '1',
            'http_proxy': closed_port, 'https_proxy': closed_port, 'HTTP_PROXY': closed_port,
            'HTTPS_PROXY': closed_port, 'no_proxy': '', 'NO_PROXY': '', **extra}


# -----------------------------------------------------------------------------
# Subprocesses

def start_script(args, cwd=REPO, env=None):
    """Start `python <args>` in the repo root without waiting; returns the Popen."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env or script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=TIMEOUT_S):
    """Wait for a started script; returns a CompletedProcess with its stdout and stderr."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f'{process.args} ran past {timeout} s; stderr:\n{stderr[-2000:]}')
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_script(args, cwd=REPO, env=None, timeout=TIMEOUT_S):
    """Run `python <args>` in a new process and wait; returns a CompletedProcess."""
    return finish(start_script(args, cwd, env), timeout)


# -----------------------------------------------------------------------------
# In this process

def _refuse_download(*args, **kwargs):
    raise urllib.error.URLError('no network in the tests')


_SHAPES = {}  # (seed, image size, index) -> (image, label)
_draw_shape = ShapesDataset.__getitem__


def _remembered_shape(dataset, index):
    """ShapesDataset.__getitem__, remembered: an item depends only on (seed, size, index) (tests/test_data.py), and
    drawing one costs a millisecond that the in-process runs would otherwise spend thousands of times."""
    key = (dataset.seed, dataset.image_size, index)
    if key not in _SHAPES or not 0 <= index < len(dataset):
        _SHAPES[key] = _draw_shape(dataset, index)
    image, label = _SHAPES[key]
    return image.clone(), label


def run_in_process(args, cwd=REPO, env=None):
    """Run `python <args>` inside this process and return a CompletedProcess, as `run_script` would.

    The script runs as __main__ (runpy) with sys.argv set, stdout and stderr captured, W&B offline and downloads
    refused; images of the built-in shapes data set are drawn once per session, then remembered. SystemExit becomes
    the return code (2 for the one-line errors of run_main); an uncaught exception is printed to the captured stderr
    as a traceback with return code 1, as Python would. The working directory, grad mode, thread count and
    environment are restored afterwards.
    """
    args = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    env = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', **(env or {})}
    saved_env = {name: os.environ.get(name) for name in env}
    saved_argv, saved_cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    returncode = 0
    try:
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = list(args)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                mock.patch.object(urllib.request, 'urlopen', _refuse_download), torch.set_grad_enabled(True), \
                mock.patch.object(ShapesDataset, '__getitem__', _remembered_shape):
            try:
                runpy.run_path(os.path.join(cwd, args[0]), run_name='__main__')
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                returncode = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())


# -----------------------------------------------------------------------------
# Assertions

def assert_succeeded(result):
    """A run that exited 0 without a traceback."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]


def error_lines(stderr):
    """stderr without tqdm's progress bars (lines redrawn with carriage returns)."""
    return [line for line in stderr.splitlines() if line.strip() and '\r' not in line and '%|' not in line]


def assert_one_line_error(result, out_dir):
    """Bad input: exit status 2, one non-empty line on stderr, no traceback, and no files written."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert len(lines) == 1, result.stderr
    assert not os.path.exists(out_dir) or not os.listdir(out_dir)
    return lines[0]


@dataclass
class ScriptRun:
    """A finished script run: its --out_dir and its CompletedProcess (returncode, stdout, stderr)."""

    out_dir: Path
    result: object

    def path(self, name='best.pth'):
        """A file of the run's output folder."""
        return self.out_dir / name

    def state(self, name='best.pth'):
        """A checkpoint of the run, as stored."""
        return load_state(self.out_dir / name)


def run_ok(args, out_dir):
    """Run a script in this process with --out_dir; it must succeed. Returns a ScriptRun."""
    result = run_in_process([*args, '--out_dir', out_dir])
    assert_succeeded(result)
    return ScriptRun(Path(out_dir), result)


# The session's chained run (conftest.py): the prior and sampling runs on the stage-1 checkpoints.
PRIOR_RUNS = {  # name -> (script, stage-1 run, extra flags)
    'flat': ('train_pixelcnn_vqvae.py', 'vq_vae', []),
    'hierarchical': ('train_pixelcnn_vqvae2.py', 'vq_vae2', ['--class_conditional']),
}
SAMPLE_RUNS = {  # name -> (script, prior run, stage-1 run, extra flags)
    'flat': ('generate_samples_pixelcnn_vqvae.py', 'flat', 'vq_vae',
             ['--num_samples', '5', '--batch_size', '2', '--seed', '1', '--save_individual']),
    'hierarchical': ('generate_samples_pixelcnn_vqvae2.py', 'hierarchical', 'vq_vae2',
                     ['--num_samples', '4', '--batch_size', '3']),
}


def sampling_args(name, stage1, priors, *flags):
    """The stage-3 command line of SAMPLE_RUNS[name] on the session's checkpoints, `flags` appended (later win)."""
    script, prior, vq, extra = SAMPLE_RUNS[name]
    return [script, VQ_FLAG[script], stage1[vq].path(), '--prior_checkpoint', priors[prior].path(), *extra,
            '--device', 'cpu', *flags]


# -----------------------------------------------------------------------------
# Files

def load_state(path):
    """A checkpoint or codes file as stored (weights_only, like the scripts read it)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def derive_checkpoint(src, dst, edit):
    """Save the checkpoint `src` as `dst` after `edit(state)` changed it in place; returns `dst`."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    state = load_state(src)
    edit(state)
    save_checkpoint(state, dst)
    return dst


def write_random_bytes(path, size=4096):
    """A corrupt checkpoint: seeded random bytes."""
    with open(path, 'wb') as f:
        f.write(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8).numpy().tobytes())
