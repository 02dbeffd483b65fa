"""Fixtures shared by the test files: tiny checkpoints trained once per session through the real scripts.

The session fixtures are one chained run of the pipeline on the built-in shapes data, every stage through its real
script (run in this process, see helpers.run_in_process), for the flat and the hierarchical models:

    stage1    main.py                                  {'vq_vae': ScriptRun, 'vq_vae2': ScriptRun}
    priors    train_pixelcnn_vqvae.py / ...vqvae2.py   {'flat': ScriptRun, 'hierarchical': ScriptRun (6 classes)}
    samples   generate_samples_pixelcnn_vqvae*.py      {'flat': ScriptRun, 'hierarchical': ScriptRun}

Treat their folders as read-only: copy a checkpoint before resuming from it or editing it (a resume writes next to
its checkpoint). Stage 2 caches codes next to the stage-1 checkpoints, in codes_cache/, as it always does.

Runs that must be real processes (torchrun, or a process's exit status and stderr), and long in-process runs that no
test needs early, start in the background before the first test when a collected test asks for them: `ddp_job`,
`process_checks`, `compile_job`, `wandb_job`, `fashion_job` (see background.py). Those tests run last.
"""
import os
import sys

import pytest
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: models/, main.py

from background import (DDPJob, ForkJob, compile_runs, fashion_mnist_with_a_small_test_split,  # noqa: E402
                        fashion_recipe, start_process_checks, wandb_runs)
from common.data import FASHION_MNIST_SYSTEM_DIR  # noqa: E402
from helpers import PRIOR_RUNS, SAMPLE_RUNS, TINY_PRIOR, TINY_STAGE1, VQ_FLAG, run_ok, sampling_args  # noqa: E402

# tqdm's monitor thread would be the only other thread of this process, which the fork-based tests would copy in the
# middle of whatever it holds.
tqdm.tqdm.monitor_interval = 0
torch.set_num_threads(1)  # see one_thread


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """The whole session runs torch with one thread: the models are tiny, so one thread is fastest and spared the
    OpenMP wake-ups that stall a busy 2-core box; in-process runs compute as the single-threaded script processes do;
    and forks of this process copy no OpenMP thread pool. (Set at import too, before any test module runs torch.)"""
    torch.set_num_threads(1)


@pytest.fixture(scope='module')
def single_thread():
    """Kept for test files that ask for it: the whole session already runs with one thread."""
    yield


# ----------------------------------------------------------------------------------------------------------------
# The chained pipeline: stage 1 -> 2 -> 3

@pytest.fixture(scope='session')
def stage1(tmp_path_factory):
    """main.py with TINY_STAGE1 (30 steps on 480 shapes): a VQ-VAE (8x8 codes) and a VQ-VAE-2 (4x4 + 8x8 codes)."""
    folder = tmp_path_factory.mktemp('stage1')
    return {arch: run_ok(['main.py', '--arch', arch, *TINY_STAGE1], folder / arch) for arch in ('vq_vae', 'vq_vae2')}


@pytest.fixture(scope='session')
def priors(stage1, tmp_path_factory):
    """The prior scripts with TINY_PRIOR on the stage-1 best.pth files: a flat unconditional prior and a
    class-conditional hierarchical one. Each of them extracted and cached the codes of its VQ model."""
    folder = tmp_path_factory.mktemp('stage2')
    return {name: run_ok([script, VQ_FLAG[script], stage1[vq].path(), *TINY_PRIOR, *flags], folder / name)
            for name, (script, vq, flags) in PRIOR_RUNS.items()}


@pytest.fixture(scope='session')
def samples(stage1, priors, tmp_path_factory):
    """The sampling scripts on the session's checkpoints: 5 flat samples (seed 1, one PNG each) and 4 hierarchical
    ones with every class in turn."""
    folder = tmp_path_factory.mktemp('stage3')
    return {name: run_ok(sampling_args(name, stage1, priors), folder / name) for name in SAMPLE_RUNS}


@pytest.fixture(scope='session')
def classifier_dir(tmp_path_factory):
    """One --classifier_dir for the session's evaluate.py runs: with the same tiny classifier settings everywhere,
    evaluate.py trains each image size's classifier once and reads it back from this cache afterwards."""
    return tmp_path_factory.mktemp('classifiers')


# ----------------------------------------------------------------------------------------------------------------
# Background runs: real processes, and long in-process runs in forks of this process (see background.py)

def start_fashion_recipe(folder):
    """The Fashion-MNIST recipe in a fork, or None where the data set is not installed."""
    if not os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, 'train-images-idx3-ubyte.gz')):
        return None
    data_dir = fashion_mnist_with_a_small_test_split(folder / 'data', FASHION_MNIST_SYSTEM_DIR)
    return ForkJob(lambda: fashion_recipe(folder, data_dir), folder, 'fashion_recipe')


BACKGROUND = {  # fixture name -> starter(folder); a job starts only if a collected test asks for its fixture
    'ddp_job': DDPJob,
    'process_checks': start_process_checks,
    'compile_job': lambda folder: ForkJob(lambda: compile_runs(folder), folder, 'compile'),
    'wandb_job': lambda folder: ForkJob(lambda: wandb_runs(folder), folder, 'wandb'),
    'fashion_job': start_fashion_recipe,
}


def pytest_collection_modifyitems(session, config, items):
    """Run the tests that wait for a background run last, so that the run has the whole session to finish."""
    items.sort(key=lambda item: any(name in BACKGROUND for name in getattr(item, 'fixturenames', ())))


@pytest.fixture(scope='session', autouse=True)
def background_jobs(request, tmp_path_factory, one_thread):
    """Start the background runs that some collected test asks for (by fixture name), before the first test.

    The forks go first, while this process has no thread but the main one.
    """
    wanted = {name for item in request.session.items for name in getattr(item, 'fixturenames', ())
              if name in BACKGROUND}
    jobs = {name: BACKGROUND[name](tmp_path_factory.mktemp(name))
            for name in sorted(wanted, key=lambda name: name not in ('compile_job', 'wandb_job', 'fashion_job'))}
    yield jobs
    for job in jobs.values():
        if isinstance(job, dict):  # process_checks: {name: (Job, out_dir, fragment)}
            for check in job.values():
                check[0].stop()
        elif job is not None:
            job.stop()


@pytest.fixture(scope='session')
def ddp_job(background_jobs):
    """The torchrun run of tests/ddp_driver.py (a background.DDPJob), started as the session started."""
    return background_jobs['ddp_job']


@pytest.fixture(scope='session')
def process_checks(background_jobs):
    """{name: (background.Job, out_dir, error fragment)}: one bad input per stage, in real processes."""
    return background_jobs['process_checks']


@pytest.fixture(scope='session')
def compile_job(background_jobs):
    """A ForkJob whose result is background.compile_runs's: a run with --compile (eager backend) and one without."""
    return background_jobs['compile_job']


@pytest.fixture(scope='session')
def wandb_job(background_jobs):
    """A ForkJob whose result is background.wandb_runs's: a run with --wandb offline and its resume."""
    return background_jobs['wandb_job']


@pytest.fixture(scope='session')
def fashion_job(background_jobs):
    """A ForkJob whose result is background.fashion_recipe's; skips the test without Fashion-MNIST."""
    if background_jobs['fashion_job'] is None:
        pytest.skip(f'Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR} '
                    f'(apt-get install dataset-fashion-mnist)')
    return background_jobs['fashion_job']


@pytest.fixture(scope='session')
def fashion_data_dir(tmp_path_factory):
    """A data folder for Fashion-MNIST, which the scripts fill from Debian's package; skips the test without it."""
    if not os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, 'train-images-idx3-ubyte.gz')):
        pytest.skip(f'Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR} '
                    f'(apt-get install dataset-fashion-mnist)')
    return tmp_path_factory.mktemp('fashion_data')
