"""A torchrun worker that runs several phases one after another, each in a process group of its own.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_driver.py phases.json

phases.json is a list of {'port': P, 'argv': [script, flags...]} (a real script, run as __main__ with these flags, as
torchrun would run it) or {'port': P, 'replicas': {'steps': N}} (the replica check below). Starting the two workers
once for every phase saves the seconds each new process spends importing torch (see tests/test_distributed.py).

Each phase's process group rendezvouses on a store of its own at port P, hosted by rank 0: the launcher's store would
still hold the keys of the previous phase's group.
"""
import datetime
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models import VQVAE2  # noqa: E402

TINY_VQVAE2 = dict(image_size=16, hidden_channels=16, res_channels=8, num_res_blocks=1, num_embeddings=32,
                   embedding_dim=8)


def gather(tensor, world_size):
    """This tensor from every rank, as a list indexed by rank."""
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def check_replicas(steps):
    """Train a tiny VQ-VAE-2 under DDP on rank-own random images; every rank must end with the same state."""
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
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
        assert not torch.equal(losses[0], losses[1]), 'the ranks saw the same data; the check would prove nothing'
        for name, value in model.state_dict().items():
            replicas = gather(value, world_size)
            assert all(torch.equal(replicas[0], other) for other in replicas[1:]), f'{name} differs between ranks'
        for name in ('quantizer_top.embedding', 'quantizer_bottom.embedding', 'quantizer_bottom.cluster_size',
                     'quantizer_bottom.embed_avg', 'decoder.net.0.weight'):
            assert not torch.equal(initial[name], model.state_dict()[name]), f'{name} never changed'
        print(f'rank {rank}: {len(initial)} tensors identical on all {world_size} replicas', flush=True)
    finally:
        dist.destroy_process_group()


def run_script(argv):
    """Run a script's __main__ block with sys.argv = argv; a non-zero exit status ends this worker with it."""
    sys.argv = list(argv)
    try:
        runpy.run_path(os.path.join(REPO, argv[0]), run_name='__main__')
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def main(spec_path):
    with open(spec_path) as f:
        phases = json.load(f)
    os.chdir(REPO)
    for phase in phases:
        os.environ['MASTER_PORT'] = str(phase['port'])
        os.environ['TORCHELASTIC_USE_AGENT_STORE'] = 'False'  # rank 0 hosts the store at MASTER_PORT
        if 'replicas' in phase:
            check_replicas(**phase['replicas'])
        else:
            run_script(phase['argv'])


if __name__ == '__main__':
    main(sys.argv[1])
