"""Script runs in real processes that start in the background as the session starts (see conftest.py).

A new process spends seconds importing torch. The runs that must be real processes (torchrun, or the exit status and
stderr of a process) start together before the first test, so those seconds overlap the tests that run in-process.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

from helpers import REPO, TIMEOUT_S, script_env, write_random_bytes

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
                                            stdout=out, stderr=err, start_new_session=True)
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
