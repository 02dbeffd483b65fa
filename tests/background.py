"""Runs that start in the background as the session starts (see conftest.py), so that they use the second core while
the tests run one after another in the first.

- `Job`: a real process. A new process spends seconds importing torch, so only the runs that must be real processes
  (torchrun, or the exit status and stderr of a process) are jobs.
- `ForkJob`: a function run in a fork of the test process, which has imported everything already: long in-process
  runs that no test needs early (torch.compile, W&B, the Fashion-MNIST recipe). The torch.compile run itself starts a
  new interpreter from its fork (COMPILE_EAGERLY says why).
The tests that wait for a background run are ordered last (conftest.pytest_collection_modifyitems).
"""
import gzip
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import torch
from PIL import Image

from helpers import REPO, TIMEOUT_S, TINY_STAGE1, run_in_process, run_script, script_env, write_random_bytes

# Background runs yield the CPU to the tests that run meanwhile: those are the ones everything waits for.
NICENESS = 10

# ----------------------------------------------------------------------------------------------------------------
# torchrun: the training scripts and a replica check in 2 processes on the CPU (gloo)

TINY_VQ = ['--hidden_channels', '16', '--res_channels', '8', '--num_embeddings', '32', '--embedding_dim', '8',
           '--batch_size', '16', '--epochs', '1', '--device', 'cpu']
# 11 validation images give the two ranks shards of 6 and 5, so the sums over ranks must weigh them correctly.
# Dead-code restarts pick random vectors of rank 0's half batch, which one process cannot reproduce: off here, and
# tested across ranks by the replica check.
DDP_STAGE1 = ['main.py', '--arch', 'vq_vae2', *TINY_VQ, '--num_train', '96', '--num_val', '11', '--max_steps', '3',
              '--dead_code_threshold', '0', '--lr_schedule', 'constant']
# On the stage-1 checkpoint of the torchrun run: 96 training images at batch 32, so 3 steps are one epoch.
DDP_PRIOR = ['train_pixelcnn_vqvae2.py', '--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8',
             '--batch_size', '32', '--max_steps', '3', '--num_epoch_samples', '0', '--device', 'cpu']
# On both checkpoints: 5 samples, 3 on rank 0 and 2 on rank 1, in batches of 2.
DDP_SAMPLES = ['generate_samples_pixelcnn_vqvae2.py', '--num_samples', '5', '--batch_size', '2', '--device', 'cpu']


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Job:
    """A process started now, with its stdout and stderr in files (a full pipe would block it)."""

    def __init__(self, args, folder, name, env=None):
        self.stdout_path, self.stderr_path = folder / f'{name}.out', folder / f'{name}.err'
        with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
            self.process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env or script_env(),
                                            stdout=out, stderr=err, start_new_session=True,
                                            preexec_fn=lambda: os.nice(NICENESS))
        self.args = [str(arg) for arg in args]

    def result(self, timeout=TIMEOUT_S):
        """Wait for the process (killing it and its children after `timeout`); a CompletedProcess."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f'{self.args} ran past {timeout} s, a hang?\n{self.stderr_path.read_text()[-3000:]}')
        return subprocess.CompletedProcess(self.args, self.process.returncode, self.stdout_path.read_text(),
                                           self.stderr_path.read_text())

    def stop(self):
        """Kill the process and every process it started, if it still runs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class ForkJob:
    """fn() run in a fork of this process, its output in a log file; result() returns what fn returned.

    The fork shares everything this process imported, so it starts in milliseconds. The session runs with one torch
    thread (conftest.py), so no OpenMP thread pool is copied half-way. The child leaves with os._exit: nothing of the
    test session runs in it. It leads its own process group, so stop() also ends the processes it started (the
    compile run's interpreter).
    """

    def __init__(self, fn, folder, name):
        self.log_path, self.result_path = folder / f'{name}.log', folder / f'{name}.pickle'
        self.name, self.status = name, None
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                os.nice(NICENESS)
                log = open(self.log_path, 'w', buffering=1)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                sys.stdout = sys.stderr = log
                value = fn()
                with open(f'{self.result_path}.partial', 'wb') as f:
                    pickle.dump(value, f)
                os.replace(f'{self.result_path}.partial', self.result_path)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        try:  # also here, so that a stop() right after the fork finds the group (setpgid in both: no race)
            os.setpgid(self.pid, self.pid)
        except OSError:  # the child has set it already, or has already gone
            pass

    def result(self, timeout=TIMEOUT_S):
        """Wait for the child; what fn returned, or an AssertionError with the child's log if it failed."""
        deadline = time.time() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
            elif time.time() > deadline:
                self.stop()
                raise AssertionError(f'{self.name} ran past {timeout} s, a hang?\n{self.log_path.read_text()[-3000:]}')
            else:
                time.sleep(0.05)
        if os.waitstatus_to_exitcode(self.status) != 0:
            raise AssertionError(f'{self.name} failed:\n{self.log_path.read_text()[-3000:]}')
        with open(self.result_path, 'rb') as f:
            return pickle.load(f)

    def stop(self):
        """Kill the child and whatever it started, if it still runs."""
        if self.status is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # no such group: the child has exited; waitpid reaps it
                pass
            _, self.status = os.waitpid(self.pid, 0)


class DDPJob(Job):
    """One torchrun launch of tests/ddp_driver.py: stage 1 under DDP, the prior on its checkpoint, stage 3 on both,
    then the replica check.

    Phases run one after another in the same two workers, so the launcher and the workers import torch once.
    """

    def __init__(self, folder):
        self.folder = folder
        self.stage1_dir, self.prior_dir = folder / 'stage1_ddp', folder / 'prior_ddp'
        self.rank_logs = folder / 'ranks'  # torchrun's copy of each worker's output
        phases = [
            {'port': free_port(), 'argv': DDP_STAGE1 + ['--out_dir', str(self.stage1_dir)]},
            {'port': free_port(), 'argv': DDP_PRIOR + ['--vqvae2_checkpoint', str(self.stage1_dir / 'last.pth'),
                                                       '--out_dir', str(self.prior_dir)]},
            {'port': free_port(), 'argv': DDP_SAMPLES + ['--vqvae2_checkpoint', str(self.stage1_dir / 'last.pth'),
                                                         '--prior_checkpoint', str(self.prior_dir / 'last.pth'),
                                                         '--out_dir', str(folder / 'samples_ddp')]},
            {'port': free_port(), 'replicas': {'steps': 3}},
        ]
        spec = folder / 'phases.json'
        spec.write_text(json.dumps(phases))
        super().__init__(['-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port', free_port(),
                          '--log-dir', self.rank_logs, '--tee', '3', os.path.join('tests', 'ddp_driver.py'), spec],
                         folder, 'torchrun', env=script_env(WANDB_MODE='disabled'))

    def rank_output(self, rank):
        """What worker `rank` wrote to stdout."""
        (path,) = self.rank_logs.glob(f'*/attempt_0/{rank}/stdout.log')
        return path.read_text()


# ----------------------------------------------------------------------------------------------------------------
# Bad input in real processes: exit status 2 and exactly one line on stderr, with every import and warning of a
# real run (the in-process tests cover each error message; these cover the process around it)

def write_image_folder(root, unreadable='b/05.png'):
    """Two classes of 12 random 32x32 PNGs, one of them replaced by bytes that are not an image."""
    rng = np.random.default_rng(0)
    for label in ('a', 'b'):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f'{i:02d}.png')
    (root / unreadable).write_bytes(b'not a png at all')


def start_process_checks(folder):
    """{name: (Job, its --out_dir, a fragment of the expected error line)} for one bad input per stage."""
    write_image_folder(folder / 'images')
    write_random_bytes(folder / 'corrupt.pth')
    stage1_flags = ['--arch', 'vq_vae', '--hidden_channels', '16', '--res_channels', '8', '--num_res_blocks', '1',
                    '--num_embeddings', '32', '--embedding_dim', '8', '--epochs', '1', '--device', 'cpu']
    checks = {
        # The unreadable image is met mid-epoch: the progress bar is on stderr before the error line.
        'stage1_unreadable_image': (['main.py', *stage1_flags, '--batch_size', '4', '--dataset', 'imagefolder',
                                     '--data_dir', folder / 'images', '--image_size', '32'], 'cannot read image'),
        'stage2_corrupt_checkpoint': (['train_pixelcnn_vqvae2.py', '--vqvae2_checkpoint', folder / 'corrupt.pth'],
                                      'corrupt.pth is not a readable checkpoint'),
        'stage3_missing_checkpoint': (['generate_samples_pixelcnn_vqvae.py', '--vqvae_checkpoint',
                                       folder / 'missing.pth', '--prior_checkpoint', folder / 'missing.pth'],
                                      'checkpoint not found'),
    }
    return {name: (Job(args + ['--out_dir', folder / name], folder, name), folder / name, fragment)
            for name, (args, fragment) in checks.items()}


# ----------------------------------------------------------------------------------------------------------------
# Long in-process runs in forks

# 64 images in batches of 16: 4 steps, one epoch.
SHORT_STAGE1 = TINY_STAGE1 + ['--num_train', '64', '--num_val', '32', '--max_steps', '4']


def run_checked(args, run=run_in_process):
    """run_in_process (or `run`, e.g. run_script), raising with the run's stderr if it did not succeed."""
    result = run(args)
    if result.returncode != 0:
        raise RuntimeError(f'{args} exited with {result.returncode}:\n{result.stderr[-3000:]}')
    return result


# The compiled run's program: main.py with torch.compile on the 'eager' backend, each compiled model's class noted in
# the file named by argv[1]. It runs in a new interpreter, not in the fork: there the autograd engine's first worker
# thread at times died on torch's intra-op thread pool, which a fork leaves invalid ("Invalid thread pool!").
COMPILE_EAGERLY = """
import runpy, sys, torch
real_compile, names = torch.compile, sys.argv[1]

def compile_eagerly(model, **kwargs):
    with open(names, 'a') as f:
        f.write(type(model).__name__ + '\\n')
    return real_compile(model, backend='eager', **kwargs)

torch.compile = compile_eagerly
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def compile_runs(folder):
    """A short VQ-VAE-2 run with --compile and the same run without: {'plain': out_dir, 'compiled': out_dir, ...}.

    torch.compile's default backend (inductor) spends 10-75 s generating and compiling C++ for even this tiny model on
    a CPU, so the run compiles with the 'eager' backend: TorchDynamo still captures the graphs of the model, wrapped
    exactly as --compile wraps it (which is what breaks: graph breaks, state-dict key prefixes); only inductor's code
    generation, which is torch's own, is left out.
    """
    names = folder / 'compiled_models.txt'
    run_checked(['-c', COMPILE_EAGERLY, names, 'main.py', '--arch', 'vq_vae2', *SHORT_STAGE1, '--compile',
                 '--out_dir', folder / 'compiled'], run=run_script)
    run_checked(['main.py', '--arch', 'vq_vae2', *SHORT_STAGE1, '--out_dir', folder / 'plain'])
    return {'plain': folder / 'plain', 'compiled': folder / 'compiled',
            'compiled_models': names.read_text().split() if names.exists() else []}


def wandb_runs(folder):
    """A short run with --wandb (offline), then a resume of it: (first run's CompletedProcess, the resume's)."""
    first = run_checked(['main.py', '--arch', 'vq_vae', *SHORT_STAGE1, '--max_steps', '2', '--wandb',
                         '--out_dir', folder])
    resumed = run_checked(['main.py', '--resume', folder / 'last.pth', '--max_steps', '3', '--wandb',
                           '--out_dir', folder])
    return first, resumed


TINY_RECIPE_FLAGS = {  # appended to the recipe's training commands (later flags win): by script or prior family
    'main.py': ['--hidden_channels', '16', '--res_channels', '8', '--num_res_blocks', '1', '--num_embeddings', '32',
                '--embedding_dim', '8'],
    'pixelcnn': ['--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8'],
    'transformer': ['--embed_dim', '16', '--num_layers', '2', '--num_heads', '2', '--num_kv_heads', '1'],
}
# The recipe's own flags for a smoke run: 8 steps of stage 1 on 256 images, priors of 7 steps or 0.3 s each (the two
# compared ones with a second seed as well), and evaluations of 40 samples against 64 test images with a feature
# classifier that trains in seconds.
TINY_RECIPE = ['--scale', '0.005', '--prior_minutes', '1', '--num_train', '256', '--num_val', '32', '--num_test', '64',
               '--num_samples', '40', '--temperatures', '1.0,0.8', '--seeds', '2',
               '--vq_batch_size', '32', '--quiet',
               '--eval_flags', '--classifier_num_train', '1500', '--classifier_epochs', '1',
               '--classifier_min_steps', '30', '--num_fit', '200']


def tiny_recipe_flags(command):
    """The tiny model flags for one of the recipe's stage commands (`script flags...`), or none."""
    if command[0] == 'main.py':
        return TINY_RECIPE_FLAGS['main.py']
    if command[0].startswith('train_'):
        return TINY_RECIPE_FLAGS[command[command.index('--prior') + 1] if '--prior' in command else 'pixelcnn']
    return []


def fashion_mnist_with_a_small_test_split(data_dir, system_dir, num_test=1000):
    """Unpack Debian's Fashion-MNIST into data_dir as torchvision reads it, the test split cut to its first images.

    evaluate.py scores a VQ model on the whole test split (10000 images), eight times in the recipe; 1000 keep the
    smoke run to seconds. The training split, which stage 1 and the validation split come from, stays whole.
    """
    raw = os.path.join(data_dir, 'FashionMNIST', 'raw')
    os.makedirs(raw)
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
        with gzip.open(os.path.join(system_dir, f'{name}.gz')) as f:
            content = f.read()
        if name.startswith('t10k'):  # IDX: magic, count, then (images) rows and columns, all big-endian int32
            header = 16 if 'images' in name else 8
            item = len(content[header:]) // int.from_bytes(content[4:8], 'big')
            content = content[:4] + num_test.to_bytes(4, 'big') + content[8:header] + \
                content[header:header + num_test * item]
        with open(os.path.join(raw, name), 'wb') as f:
            f.write(content)
    return data_dir


def fashion_recipe(folder, data_dir):
    """bench/reproduce_fashion_mnist.py with TINY_RECIPE: (its results folder, the script commands it ran).

    The recipe runs every stage and evaluation as `python <script> ...` (subprocess.run, subprocess.Popen); here
    those commands run in this process, one after another, with the tiny model flags of TINY_RECIPE_FLAGS appended:
    the recipe's own logic and the real scripts run without a torch import per command and minutes of default-size
    models.
    """
    commands, real_run, real_popen = [], subprocess.run, subprocess.Popen

    def repo_script(command, cwd):
        """`script flags...` if the command runs a script of this repo with this Python, else None."""
        command = [str(arg) for arg in command]
        if command[0] == sys.executable and os.path.isfile(os.path.join(cwd or REPO, command[1])):
            return command[1:]
        return None

    def run_here(command, cwd):
        commands.append(command)
        return run_in_process([*command, *tiny_recipe_flags(command)], cwd=cwd or REPO)

    def run(command, cwd=None, check=False, **kwargs):
        script = repo_script(command, cwd)
        if script is None:
            return real_run(command, cwd=cwd, check=check, **kwargs)
        result = run_here(script, cwd)
        if check and result.returncode != 0:  # what CalledProcessError would hide: the run's stderr
            raise RuntimeError(f'{script} exited with {result.returncode}:\n{result.stderr[-3000:]}')
        return result

    class Popen:
        """A finished in-process run, as far as the recipe asks of a Popen (wait, returncode)."""

        def __new__(cls, command, cwd=None, **kwargs):
            script = repo_script(command, cwd)
            if script is None:
                return real_popen(command, cwd=cwd, **kwargs)
            process = super().__new__(cls)
            process.result = run_here(script, cwd)
            process.returncode = process.result.returncode
            return process

        def __init__(self, *args, **kwargs):
            pass  # the run happened in __new__

        def wait(self, timeout=None):
            if self.returncode != 0:
                print(self.result.stderr[-3000:], file=sys.stderr)
            return self.returncode

    subprocess.run, subprocess.Popen = run, Popen  # this is a forked child: nothing to restore
    out_dir = folder / 'results'
    run_checked(['bench/reproduce_fashion_mnist.py', '--out_dir', out_dir, '--data_dir', data_dir, *TINY_RECIPE])
    return out_dir, commands
