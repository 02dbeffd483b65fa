"""Distributed set-up for torchrun: NCCL on CUDA, gloo on CPU; a single process needs no set-up at all."""

import contextlib
import os

import torch
import torch.distributed as dist


def setup_distributed(device):
    """Join the torchrun process group if there is one; returns (rank, world_size, device for this rank)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return 0, 1, device
    rank = int(os.environ['RANK'])
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def is_distributed():
    """True inside a torchrun group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor):
    """Sum a tensor over ranks (in place) and return it; a no-op in one process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def barrier():
    """Wait for every rank; a no-op in one process."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(rank):
    """Run the block on rank 0 first, then on the other ranks: rank 0 downloads or caches, the others read."""
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def cleanup_distributed():
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
