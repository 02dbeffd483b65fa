"""Training and sampling with two processes on the CPU (gloo), under the real torchrun: the scripts finish and only
rank 0 writes files; every replica ends with the same weights and codebooks; two processes with global batch B train
exactly as one process with batch B does; and stage 3 split over two processes draws the samples one process draws.

One torchrun launch (tests/ddp_driver.py) runs every phase in the same two workers: stage 1, the prior on its
checkpoint, stage 3 on both, then the replica check. It starts in the background as the session starts (see
tests/background.py); the one-process references run in this process.
"""
import argparse
import os

import pytest
import torch

from background import DDP_SAMPLES, DDP_STAGE1
from common.errors import UserError
from common.trainer import Task, train
from helpers import assert_succeeded, load_state, run_in_process
from models import load_checkpoint


@pytest.fixture(scope='module')
def ddp(ddp_job):
    """The finished torchrun run; fails every test of this file with the run's log if it did not exit 0."""
    result = ddp_job.result()
    if result.returncode != 0:
        pytest.fail(f'torchrun exited with status {result.returncode}:\n{result.stderr[-3000:]}\n'
                    f'{result.stdout[-3000:]}')
    return ddp_job


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, ddp):
    """The same stage-1 and stage-3 runs in one process, on the same data and checkpoints."""
    folder = tmp_path_factory.mktemp('one_process')
    runs = {'stage1': run_in_process(DDP_STAGE1 + ['--out_dir', folder / 'stage1']),
            'samples': run_in_process(DDP_SAMPLES + ['--vqvae2_checkpoint', ddp.stage1_dir / 'last.pth',
                                                     '--prior_checkpoint', ddp.prior_dir / 'last.pth',
                                                     '--out_dir', folder / 'samples'])}
    for result in runs.values():
        assert_succeeded(result)
    return folder


def test_replicas_hold_identical_weights_and_codebooks(ddp):
    # ddp_driver.check_replicas asserts it on both ranks (a failure is a non-zero exit); here: that it did run.
    for rank in (0, 1):
        output = ddp.rank_output(rank)
        assert f'rank {rank}: ' in output and 'tensors identical on all 2 replicas' in output


def test_ddp_vqvae2_run_writes_one_checkpoint_from_rank_0(ddp):
    out = ddp.stage1_dir
    assert sorted(os.listdir(out)) == ['.lock', 'best.pth', 'codes_cache', 'last.pth', 'metrics.jsonl',
                                       'reconstructions.png']
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1  # one validation, logged by rank 0 alone
    # Two workers ran, and only rank 0 printed the model summary.
    assert 'vq_vae2: ' in ddp.rank_output(0) and 'vq_vae2: ' not in ddp.rank_output(1)
    for name in ('last.pth', 'best.pth'):
        state = load_checkpoint(out / name, kinds=('vq_vae2',))
        assert state['step'] == 3 and state['args']['batch_size'] == 16


def test_ddp_prior_run_writes_one_checkpoint(ddp):
    out = ddp.prior_dir
    assert sorted(os.listdir(out)) == ['.lock', 'best.pth', 'last.pth', 'metrics.jsonl']  # samples.png: turned off
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1
    summary = 'hierarchical_pixelcnn: '
    assert summary in ddp.rank_output(0) and summary not in ddp.rank_output(1)
    state = load_checkpoint(out / 'last.pth', kinds=('hierarchical_pixelcnn',))
    assert state['step'] == 3 and state['code_shapes'] == {'top': [4, 4], 'bottom': [8, 8]}
    assert state['levels'] == ['top', 'bottom']
    # Rank 0 encoded each split once; rank 1 read the same cache files.
    assert len(os.listdir(ddp.stage1_dir / 'codes_cache')) == 2
    assert 'train codes: extracted and cached (96 items)' in ddp.rank_output(0)


def test_two_processes_train_as_one_with_the_same_global_batch(ddp, one_process):
    # Three steps rather than one, so that the EMA codebook sums and Adam's moments also carry over between steps.
    one = load_checkpoint(one_process / 'stage1' / 'last.pth')
    two = load_checkpoint(ddp.stage1_dir / 'last.pth')
    assert one['step'] == two['step'] == 3
    # Weights and every quantizer buffer (embedding, cluster sizes, EMA sums).
    assert one['model'].keys() == two['model'].keys()
    for name in one['model']:
        torch.testing.assert_close(two['model'][name], one['model'][name], rtol=1e-4, atol=1e-5, msg=name)
    # Adam's first moment is a running mean of the gradients; the weights alone would hide a wrongly scaled
    # gradient, since Adam's first steps are nearly independent of the gradient's scale.
    for index, state in one['optimizer']['state'].items():
        torch.testing.assert_close(two['optimizer']['state'][index]['exp_avg'], state['exp_avg'], rtol=1e-3,
                                   atol=1e-8, msg=f'exp_avg of parameter {index}')
    # Validation metrics summed over ranks (shards of 6 and 5 images) equal those of one process over the split.
    val = [name for name in one['metrics'] if name.startswith('val/')]
    assert 'val/mse' in val and 'val/perplexity/bottom' in val
    for name in val:
        assert two['metrics'][name] == pytest.approx(one['metrics'][name], rel=1e-5), name


def test_two_processes_draw_the_samples_one_process_draws(ddp, one_process):
    two, one = load_state(ddp.folder / 'samples_ddp' / 'codes.pt'), load_state(one_process / 'samples' / 'codes.pt')
    assert two['codes_top'].shape == (5, 4, 4) and two['codes_bottom'].shape == (5, 8, 8)
    for name in ('codes_top', 'codes_bottom'):
        assert torch.equal(two[name], one[name]), name
    assert sorted(os.listdir(ddp.folder / 'samples_ddp')) == ['.lock', 'codes.pt', 'samples.png']  # shards removed
    assert '5 samples' in ddp.rank_output(0) and '5 samples' not in ddp.rank_output(1)


def test_a_validation_set_smaller_than_the_number_of_processes_is_refused_before_training():
    # Each rank validates its own shard of the split; an empty shard crashed the prior's metric sum after an epoch.
    task = Task(model=torch.nn.Linear(1, 1), train_set=list(range(4)), val_set=[0], training_step=None,
                evaluate=None, score_key='mse')
    with pytest.raises(UserError, match='validation set has 1 items, fewer than the 2 processes'):
        train(argparse.Namespace(batch_size=2), task, rank=0, world_size=2, device=torch.device('cpu'))
