"""Running the real scripts in subprocesses for the end-to-end tests, with W&B offline and no network."""
import os
import subprocess
import sys

import torch

from models import PixelCNN, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # generous: the test machines are small and shared
# A stage-1 model and data small enough to train in a second: 480 training images are 30 steps of 16.
TINY_STAGE1 = ['--hidden_channels', '16', '--res_channels', '8', '--num_res_blocks', '1', '--num_embeddings', '32',
               '--embedding_dim', '8', '--batch_size', '16', '--num_train', '480', '--num_val', '128',
               '--epochs', '1', '--max_steps', '30', '--lr', '5e-3', '--device', 'cpu']


def script_env(**extra):
    """The environment for a script run: W&B offline, one thread per process, and every download failing at once.

    The proxies point at a closed local port, so a download attempt ends in 'connection refused' instead of
    reaching the network.
    """
    closed_port = 'http://127.0.0.1:9'
    return {**os.environ, 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'OMP_NUM_THREADS': '1',
            'http_proxy': closed_port, 'https_proxy': closed_port, 'HTTP_PROXY': closed_port,
            'HTTPS_PROXY': closed_port, 'no_proxy': '', 'NO_PROXY': '', **extra}


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
    """Run `python <args>` in the repo root and wait; returns a CompletedProcess."""
    return finish(start_script(args, cwd, env), timeout)


def run_scripts(commands):
    """Run {name: args} all at once (each run mostly imports torch, so they overlap well); {name: CompletedProcess}."""
    started = {name: start_script(args) for name, args in commands.items()}
    return {name: finish(process) for name, process in started.items()}


def assert_succeeded(result):
    """A run that exited 0 without a traceback."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]


def assert_one_line_error(result, out_dir):
    """Bad input: exit status 2, one non-empty line on stderr, no traceback, and no files written."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert len(lines) == 1, result.stderr
    assert not os.path.exists(out_dir) or not os.listdir(out_dir)
    return lines[0]


def save_tiny_prior(path, num_embeddings=32):
    """A checkpoint of a small untrained flat PixelCNN prior: a valid checkpoint of the wrong kind for stage 1."""
    torch.manual_seed(0)
    prior = PixelCNN(num_embeddings=num_embeddings, embedding_dim=8, hidden_channels=16, num_layers=2)
    save_checkpoint({'kind': prior.kind, 'config': prior.config, 'model': prior.state_dict()}, path)


def write_random_bytes(path, size=4096):
    """A corrupt checkpoint: seeded random bytes."""
    with open(path, 'wb') as f:
        f.write(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8).numpy().tobytes())
