"""Training with two processes on the CPU (gloo): the real scripts under torchrun finish and only rank 0 writes files;
every replica ends with the same weights and codebooks; and two processes with global batch B train exactly as one
process with batch B does.

Every script run spends seconds importing torch, so the `runs` fixture starts them all at once (the prior run as soon
as the stage-1 checkpoint it needs exists) and the tests check the finished results.
"""
import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from common.errors import UserError
from common.trainer import Task, train
from models import VQVAE2, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'WANDB_MODE': 'disabled', 'OMP_NUM_THREADS': '1'}
TIMEOUT_S = 300  # per run; a DDP hang ends as a failure with the run's log instead of a stuck test session
TINY_VQ = ['--hidden_channels', '16', '--res_channels', '8', '--num_embeddings', '32', '--embedding_dim', '8',
           '--batch_size', '16', '--epochs', '1', '--device', 'cpu']
# 11 validation images give the two ranks shards of 6 and 5, so the sums over ranks must weigh them correctly.
# Dead-code restarts pick random vectors of rank 0's half batch, which one process cannot reproduce: off here, and
# tested across ranks by test_replicas_hold_identical_weights_and_codebooks.
STAGE1 = ['main.py', '--arch', 'vq_vae2', *TINY_VQ, '--num_train', '96', '--num_val', '11', '--max_steps', '3',
          '--dead_code_threshold', '0', '--lr_schedule', 'constant']
# On the one-process stage-1 checkpoint: 96 training images at batch 32, so --max_steps 3 is one epoch, one validation.
PRIOR = ['train_pixelcnn_vqvae2.py', '--hidden_channels', '16', '--num_layers', '2', '--embedding_dim', '8',
         '--batch_size', '32', '--max_steps', '3', '--num_epoch_samples', '0', '--device', 'cpu']

_ports_lock, _ports_taken = threading.Lock(), set()


def free_port():
    """A TCP port nobody listens on now and that no other run of this module was given."""
    with _ports_lock:
        while True:
            with socket.socket() as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            if port not in _ports_taken:
                _ports_taken.add(port)
                return port


class Run(threading.Thread):
    """A script running in the background, under torchrun when nproc > 1, optionally once another run succeeded."""

    def __init__(self, args, out_dir, nproc=1, after=None):
        super().__init__(daemon=True)
        self.args, self.out_dir, self.nproc, self.after = args, out_dir, nproc, after
        self.log = out_dir.parent / f'{out_dir.name}.log'
        self.rank_logs = out_dir.parent / f'{out_dir.name}_ranks'  # torchrun's copy of each worker's output
        self.failure = None
        self.start()

    def run(self):
        if self.after is not None:
            self.after.join()
            if self.after.failure:
                self.failure = f'not started: the run it needs failed ({self.after.failure})'
                return
        launcher = ['-m', 'torch.distributed.run', f'--nproc_per_node={self.nproc}', '--master_port',
                    str(free_port()), '--log-dir', str(self.rank_logs), '--tee', '3'] if self.nproc > 1 else []
        with open(self.log, 'w') as log:
            process = subprocess.Popen([sys.executable, *launcher, *self.args, '--out_dir', str(self.out_dir)],
                                       cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                returncode = process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and both of its workers
                process.wait()
                returncode = f'killed after {TIMEOUT_S} s, a hang?'
        if returncode != 0:
            self.failure = f'exit status {returncode}'

    def finished(self):
        """Wait for the run; fail the test with the end of its log unless it exited with status 0."""
        self.join()
        if self.failure:
            log = self.log.read_text()[-3000:] if self.log.exists() else ''
            pytest.fail(f'{" ".join(self.args)}: {self.failure}\n{log}')
        return self.out_dir

    def rank_output(self, rank):
        """What worker `rank` of a finished torchrun run wrote to stdout."""
        (path,) = self.rank_logs.glob(f'*/attempt_0/{rank}/stdout.log')
        return path.read_text()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Start every script run at once."""
    tmp = tmp_path_factory.mktemp('distributed')
    started = {'stage1_ddp': Run(STAGE1, tmp / 'stage1_ddp', nproc=2), 'stage1_one': Run(STAGE1, tmp / 'stage1_one')}
    started['prior_ddp'] = Run(PRIOR + ['--vqvae2_checkpoint', str(tmp / 'stage1_one' / 'last.pth')],
                               tmp / 'prior_ddp', nproc=2, after=started['stage1_one'])
    yield started
    for run in started.values():
        run.join()


# ----------------------------------------------------------------------------------------------------------------
# Replicas stay identical

TINY_VQVAE2 = dict(image_size=16, hidden_channels=16, res_channels=8, num_res_blocks=1, num_embeddings=32,
                   embedding_dim=8)


def gather(tensor, world_size):
    """This tensor from every rank, as a list indexed by rank."""
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def replica_worker(rank, world_size, port, steps):
    """Train a tiny VQ-VAE-2 under DDP on rank-own random images, then check every rank holds the same state."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)  # the same initial weights on every rank, as the scripts do
        model = VQVAE2(**TINY_VQVAE2)  # default dead_code_threshold: codes that get no vectors are restarted
        initial = {name: value.clone() for name, value in model.state_dict().items()}
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        # Each rank its own images and its own RNG, so anything not synchronised drifts apart.
        torch.manual_seed(1 + rank)
        for _ in range(steps):
            images = torch.rand(4, 3, 16, 16) * 2 - 1
            _, stats = ddp(images)
            optimizer.zero_grad()
            stats['loss'].backward()
            optimizer.step()
        losses = gather(stats['loss'].detach().reshape(1), world_size)
        assert not torch.equal(losses[0], losses[1]), 'the ranks saw the same data; the test would prove nothing'
        for name, value in model.state_dict().items():
            replicas = gather(value, world_size)
            assert all(torch.equal(replicas[0], other) for other in replicas[1:]), f'{name} differs between ranks'
        for name in ('quantizer_top.embedding', 'quantizer_bottom.embedding', 'quantizer_bottom.cluster_size',
                     'quantizer_bottom.embed_avg', 'decoder.net.0.weight'):
            assert not torch.equal(initial[name], model.state_dict()[name]), f'{name} never changed'
    finally:
        dist.destroy_process_group()


def test_replicas_hold_identical_weights_and_codebooks(runs):
    """`runs` is requested only so that the script runs start first and overlap with this test."""
    context = mp.start_processes(replica_worker, args=(2, free_port(), 3), nprocs=2, join=False,
                                 start_method='spawn')
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):  # raises ProcessRaisedException with the worker's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f'the DDP workers did not finish within {TIMEOUT_S} s, a hang?')


# ----------------------------------------------------------------------------------------------------------------
# The scripts under torchrun

def test_ddp_vqvae2_run_writes_one_checkpoint_from_rank_0(runs):
    out = runs['stage1_ddp'].finished()
    assert sorted(os.listdir(out)) == ['best.pth', 'last.pth', 'metrics.jsonl', 'reconstructions.png']
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1  # one validation, logged by rank 0 alone
    # Two workers ran, and only rank 0 printed the model summary.
    assert 'vq_vae2: ' in runs['stage1_ddp'].rank_output(0) and 'vq_vae2: ' not in runs['stage1_ddp'].rank_output(1)
    for name in ('last.pth', 'best.pth'):
        state = load_checkpoint(out / name, kinds=('vq_vae2',))
        assert state['step'] == 3


def test_ddp_prior_run_writes_one_checkpoint(runs):
    out = runs['prior_ddp'].finished()
    assert sorted(os.listdir(out)) == ['best.pth', 'last.pth', 'metrics.jsonl']  # no samples.png: turned off
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1
    summary = 'hierarchical_pixelcnn: '
    assert summary in runs['prior_ddp'].rank_output(0) and summary not in runs['prior_ddp'].rank_output(1)
    state = load_checkpoint(out / 'last.pth', kinds=('hierarchical_pixelcnn',))
    assert state['step'] == 3 and state['code_shape'] == {'top': [4, 4], 'bottom': [8, 8]}
    # Rank 0 encoded each split once; rank 1 read the same cache files.
    assert len(os.listdir(out.parent / 'stage1_one' / 'codes_cache')) == 2


def test_two_processes_train_as_one_with_the_same_global_batch(runs):
    # Three steps rather than one, so that the EMA codebook sums and Adam's moments also carry over between steps.
    one = load_checkpoint(runs['stage1_one'].finished() / 'last.pth')
    two = load_checkpoint(runs['stage1_ddp'].finished() / 'last.pth')
    assert one['step'] == two['step'] == 3
    runs['stage1_ddp'].rank_output(1)  # a second worker did run
    # Weights and every quantizer buffer (embedding, cluster sizes, EMA sums).
    assert one['model'].keys() == two['model'].keys()
    for name in one['model']:
        torch.testing.assert_close(two['model'][name], one['model'][name], rtol=1e-4, atol=1e-5, msg=name)
    # Adam's first moment is a running mean of the gradients; the weights alone would hide a wrongly scaled
    # gradient, since Adam's first steps are nearly independent of the gradient's scale.
    for index, state in one['optimizer']['state'].items():
        torch.testing.assert_close(two['optimizer']['state'][index]['exp_avg'], state['exp_avg'], rtol=1e-3,
                                   atol=1e-8, msg=f'exp_avg of parameter {index}')
    # Validation metrics summed over ranks equal those of one process over the whole split.
    for name, value in one['metrics'].items():
        if name.startswith('val_'):
            assert two['metrics'][name] == pytest.approx(value, rel=1e-5), name


def test_a_validation_set_smaller_than_the_number_of_processes_is_refused_before_training():
    # Each rank validates its own shard of the split; an empty shard crashed the prior's metric sum after an epoch.
    task = Task(kind='vq_vae', model=torch.nn.Linear(1, 1), train_set=list(range(4)), val_set=[0],
                training_step=None, evaluate=None, score_key='mse')
    with pytest.raises(UserError, match='validation set has 1 items, fewer than the 2 processes'):
        train(argparse.Namespace(batch_size=2), task, rank=0, world_size=2, device=torch.device('cpu'))
