"""Time evaluate.py's scoring of 10,000 Fashion-MNIST-sized samples against the test split, in classifier space.

Example:
    python bench/bench_evaluate.py --threads 2
    python bench/bench_evaluate.py --dataset shapes --num_samples 2000   # smaller, for a quick look

The samples are real training images (held in memory, with their labels, so CAS runs too), which also makes the
scores a sanity check: FID should sit near the train-vs-test floor. The feature classifier is trained and cached
first if it is not cached yet (timed apart, as a one-off). Each stage of evaluate.py's work is then timed: reading
the samples as a PNG folder, loading the test split, the features and FID/KID/precision/recall, and CAS (two small
classifiers: one on the samples, one on as many real images; the second is cached after its first run). The
target: at most 2 minutes for everything after the classifier is cached, on 2 CPU cores.
"""

import os
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import evaluate  # noqa: E402
from bench_sampling import cpu_model  # noqa: E402
from common.cli import ArgumentParser, positive_int  # noqa: E402
from common.data import DATASETS, build_dataset  # noqa: E402
from common.features import dataset_classifier, load_images, random_subset  # noqa: E402

TARGET_S = 120  # scoring 10,000 samples once the classifier is cached, on 2 CPU cores


def timed(times, name, fn, *args, **kwargs):
    """Call fn(*args, **kwargs), record (wall seconds, CPU seconds of this process) under `name`, return its result.

    On a shared machine the wall time also counts other processes' turns; CPU seconds / threads is what an idle
    machine would take (about).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    times[name] = (time.perf_counter() - start, time.process_time() - cpu_start)
    return result


def write_png_folder(images, labels, folder):
    """Samples as evaluate.py reads them: one subfolder per class index, one PNG per image."""
    for index, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        path = os.path.join(folder, str(label))
        os.makedirs(path, exist_ok=True)
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
            os.path.join(path, f'{index:05d}.png'))


def main(args):
    torch.set_num_threads(args.threads)
    print(f'CPU: {cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, '
          f'torch {torch.__version__}')
    eval_args = evaluate.build_parser().parse_args([
        '--samples', 'in-memory', '--dataset', args.dataset, '--data_dir', args.data_dir, '--device', 'cpu',
        *(['--classifier_dir', args.classifier_dir] if args.classifier_dir else [])])
    evaluate.apply_data_settings(eval_args, {})
    train_set, info = build_dataset(args.dataset, 'train', eval_args.image_size, args.data_dir)
    eval_args.num_classes = info['num_classes']

    # Samples: real training images, a different random subset from the floor's
    images, labels = load_images(train_set, random_subset(len(train_set), args.num_samples, seed=12345),
                                 desc='samples')
    one_off, times = {}, {}
    test = timed(times, 'load the test split', evaluate.load_test_split, eval_args)
    network, record = timed(one_off, 'feature classifier (trained, or read from the cache)', dataset_classifier,
                            args.dataset, eval_args.image_size, args.data_dir, eval_args.seed,
                            eval_args.classifier_dir, evaluate.classifier_settings(eval_args), None, test)
    timed(times, 'feature classifier from the cache', dataset_classifier, args.dataset, eval_args.image_size,
          args.data_dir, eval_args.seed, eval_args.classifier_dir, evaluate.classifier_settings(eval_args), None, test)

    with tempfile.TemporaryDirectory() as folder:
        write_png_folder(images, labels, folder)
        timed(times, f'read {len(images)} sample PNGs', evaluate.read_sample_folder, folder,
              {**info, 'image_size': eval_args.image_size})
    reference = timed(times, 'real reference (train floor, test features)', evaluate.real_reference, eval_args,
                      network, len(images), test)
    scores = timed(times, 'sample features, FID, KID, precision/recall', evaluate.score_samples, images, None,
                   reference, network, eval_args)
    scores.update(timed(times, 'CAS (2 classifiers; the baseline cached after its first run)',
                        evaluate.classification_accuracy_score, images, labels, reference, eval_args))
    scores['classifier_test_accuracy'] = record['test_accuracy']

    total, total_cpu = (sum(column) for column in zip(*times.values()))
    print(f'\n{args.num_samples} {args.dataset} samples vs {len(reference["test_images"])} test images; '
          f'load average {os.getloadavg()[0]:.1f} at the end\n')
    print('| stage | wall s | CPU s |\n| --- | ---: | ---: |')
    for name, (seconds, cpu) in {**one_off, **times}.items():
        print(f'| {name}{" (one-off)" if name in one_off else ""} | {seconds:.1f} | {cpu:.1f} |')
    print(f'| **total after the classifier is cached** | **{total:.1f}** | **{total_cpu:.1f}** |')
    print('\nscores: ' + ', '.join(f'{name} {value:.4g}' for name, value in scores.items()))
    verdict = 'meets' if total <= TARGET_S else 'misses'
    print(f'\n{verdict} the target: {total:.0f} s for {args.num_samples} samples (target <= {TARGET_S} s for 10,000 '
          f'on 2 CPU cores)')


def build_parser():
    """The benchmark's command line."""
    parser = ArgumentParser(description='Time evaluate.py scoring 10,000 samples in classifier space.')
    parser.add_argument('--dataset', default='fashion_mnist', choices=DATASETS, help='default: fashion_mnist')
    parser.add_argument('--data_dir', default='data', help='where the real data lives (default: data)')
    parser.add_argument('--classifier_dir', default=None,
                        help='cache of evaluation classifiers (default: <data_dir>/eval_classifier)')
    parser.add_argument('--num_samples', type=positive_int, default=10000, help='samples to score (default: 10000)')
    parser.add_argument('--threads', type=positive_int, default=2, help='torch CPU threads (default: 2)')
    return parser


if __name__ == '__main__':
    main(build_parser().parse_args())
