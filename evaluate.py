"""Sample quality against a dataset's real test split: FID, KID, precision/recall, and for class-conditional samples
the classification accuracy score (CAS), each beside a real-data reference.

Examples:
    python evaluate.py --samples samples/pixelcnn_vqvae/codes.pt --vq_checkpoint runs/vq_vae/best.pth
    python evaluate.py --samples my_samples/ --dataset fashion_mnist --num_real 5000

--samples is a folder of PNG/JPEG files (directly inside it, or in one subfolder per class named by the class index
or name: class-conditional samples), or a stage-3 codes.pt, decoded by its VQ checkpoint (whose dataset settings
become the defaults). Features come from a small CNN that this script trains on the dataset's training split on the
first run and caches under <data_dir>/eval_classifier/ (--features classifier, the offline default), or from the
standard FID Inception-v3 of pytorch-fid (--features inception; its weights file must be on disk). --seed seeds the
real data (the shapes images, as in main.py) and every random subset. Writes <out_dir>/eval.json (or --json) and
prints a table.
"""

import json
import os

import numpy as np
import torch
from PIL import Image

from common.cli import ArgumentParser, OutputDir, add_common_flags, positive_int, resolve_device, run_main
from common.data import DATASETS, DEFAULT_IMAGE_SIZE, build_dataset, to_uint8
from common.errors import UserError
from common.features import (ClassifierSettings, accuracy, dataset_classifier, load_fid_inception, load_images,
                             random_subset, train_classifier)
from common.metrics import fid_from_features, kid, precision_recall
from common.tracking import Tracker, add_wandb_flags, wandb_settings
from models import load_checkpoint, model_from_checkpoint

PR_K = 3  # neighbours for the precision/recall manifolds, as in Kynkaanniemi et al. 2019
MIN_IMAGES = PR_K + 1  # a k-NN radius needs k other points; FID's covariance and KID need 2
CONFIDENCE = 0.9  # confident_fraction counts samples whose top class probability reaches this
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CODE_ENTRIES = {'vq_vae': ('codes',), 'vq_vae2': ('codes_top', 'codes_bottom')}


# -----------------------------------------------------------------------------
# Reading samples

def _read_image(path, channels):
    """One image file -> uint8 array [channels, H, W]; a UserError if it is unreadable or its channels do not fit."""
    try:
        with Image.open(path) as image:
            grey_file = image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F')
            rgb = np.asarray(image.convert('RGB'))  # [H, W, 3]
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are both OSErrors
        raise UserError(f'cannot read sample image {path}: {e}') from e
    if channels == 1:
        # torchvision's save_image writes grey images as RGB files with three equal channels: those count as grey.
        if not grey_file and not (rgb == rgb[..., :1]).all():
            raise UserError(f'{path} is a colour image but the dataset has greyscale images (1 channel)')
        return rgb[None, :, :, 0]
    if grey_file:
        raise UserError(f'{path} is a greyscale image but the dataset has colour images (3 channels)')
    return rgb.transpose(2, 0, 1)


def _image_files(folder):
    """Sorted image files directly inside folder, and its subfolders (hidden entries skipped)."""
    entries = sorted(name for name in os.listdir(folder) if not name.startswith('.'))
    files = [os.path.join(folder, n) for n in entries if n.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(folder, n))]
    subfolders = [n for n in entries if os.path.isdir(os.path.join(folder, n))]
    return files, subfolders


def _class_index(name, class_names, folder):
    """A class subfolder's name -> class index: an integer index or one of the dataset's class names."""
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    if name in class_names:
        return class_names.index(name)
    raise UserError(f'subfolder {os.path.join(folder, name)} names no class of the dataset: use an index in '
                    f'[0, {len(class_names)}) or one of {", ".join(class_names)}')


def read_sample_folder(folder, info):
    """A folder of sample images -> (uint8 images [N, C, S, S], class labels [N] or None); checked against info."""
    if not os.path.exists(folder):
        raise UserError(f'--samples {folder} not found')
    if not os.path.isdir(folder):
        raise UserError(f'--samples {folder} is neither a folder of images nor a codes.pt file')
    files, subfolders = _image_files(folder)
    if files and subfolders:
        raise UserError(f'{folder} holds both image files and subfolders; put the samples directly in it, or all '
                        f'in class subfolders')
    if subfolders:  # class-conditional: one subfolder per class
        labelled = []
        for name in subfolders:
            label = _class_index(name, info['class_names'], folder)
            labelled += [(path, label) for path in _image_files(os.path.join(folder, name))[0]]
    else:
        labelled = [(path, None) for path in files]
    if not labelled:
        raise UserError(f'no {"/".join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images in {folder}')
    size = info['image_size']
    images = []
    for path, _ in labelled:
        image = _read_image(path, info['in_channels'])
        if image.shape[1:] != (size, size):
            raise UserError(f'{path} is {image.shape[2]}x{image.shape[1]} but {info["name"]} images are {size}x{size} '
                            f'here; pass the --image_size the samples were made at')
        images.append(image)
    labels = None if not subfolders else torch.tensor([label for _, label in labelled])
    return torch.from_numpy(np.stack(images)), labels


def read_codes_file(path):
    """A stage-3 codes.pt -> its dict of LongTensors; a UserError if it is not one."""
    try:
        codes = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # damaged files raise many exception types
        raise UserError(f'{path} is not a readable codes.pt ({type(e).__name__})') from e
    if not isinstance(codes, dict) or not any(all(k in codes for k in keys) for keys in CODE_ENTRIES.values()):
        raise UserError(f'{path} holds no codes (expected "codes" or "codes_top" and "codes_bottom"); give a '
                        f'codes.pt written by generate_samples_pixelcnn_*.py')
    return codes


def load_vq_for_codes(codes, path, vq_checkpoint, device):
    """The VQ model that decodes `codes` (read from `path`), in eval mode, and its checkpoint's 'data' settings."""
    kind = 'vq_vae2' if 'codes_top' in codes else 'vq_vae'
    if vq_checkpoint is None:
        raise UserError(f'{path} holds codes; pass --vq_checkpoint, the {kind} checkpoint that decodes them')
    state = load_checkpoint(vq_checkpoint, kinds=(kind,))
    vq = model_from_checkpoint(state, device)
    expected = [vq.code_shape()] if kind == 'vq_vae' else list(vq.code_shape())  # [(h, w)] per level
    for name, shape in zip(CODE_ENTRIES[kind], expected):
        grid = codes[name]
        if grid.dim() != 3 or tuple(grid.shape[1:]) != tuple(shape):
            raise UserError(f'{path}: {name} has shape {list(grid.shape)} but {vq_checkpoint} decodes '
                            f'[N, {shape[0]}, {shape[1]}]; give the VQ checkpoint the samples were drawn with')
        if grid.numel() and not 0 <= int(grid.min()) <= int(grid.max()) < vq.num_embeddings:
            raise UserError(f'{path}: {name} has codes outside [0, {vq.num_embeddings}) of {vq_checkpoint}')
    return vq, state.get('data', {})


@torch.no_grad()
def decode_codes_file(codes, vq, batch_size, device):
    """Decode a codes.pt dict batch by batch -> (uint8 images [N, C, S, S], class labels [N] or None).

    Decoded images are rounded to 8 bits, exactly as if they had been saved as PNGs and read back.
    """
    names = CODE_ENTRIES[vq.kind]
    count = len(codes[names[0]])
    images = []
    for start in range(0, count, batch_size):
        batch = [codes[name][start:start + batch_size].to(device) for name in names]
        images.append(to_uint8(vq.decode_codes(*batch).float().cpu()))
    labels = codes.get('class_labels')
    images = torch.cat(images) if images else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)  # check_samples refuses it
    return images, None if labels is None else torch.as_tensor(labels).long()


def check_samples(images, labels, info, source):
    """Samples must fit the dataset's image shape and classes, and be enough for the statistics."""
    if len(images) < MIN_IMAGES:
        raise UserError(f'{source} holds {len(images)} samples; at least {MIN_IMAGES} are needed (precision and '
                        f'recall with k={PR_K} need k + 1)')
    expected = (info['in_channels'], info['image_size'], info['image_size'])
    if tuple(images.shape[1:]) != expected:
        raise UserError(f'{source} gives images of shape {list(images.shape[1:])} but {info["name"]} images are '
                        f'{list(expected)} [C, H, W] here; pass the --dataset and --image_size of the samples')
    if labels is not None and not 0 <= int(labels.min()) <= int(labels.max()) < info['num_classes']:
        raise UserError(f'{source} has class labels outside [0, {info["num_classes"]}) of {info["name"]}')


# -----------------------------------------------------------------------------
# Scores

def load_test_split(args):
    """The whole real test split as (uint8 images [N, C, S, S], labels [N])."""
    test_set, _ = build_dataset(args.dataset, 'test', args.image_size, args.data_dir, args.seed, args.download)
    return load_images(test_set, desc='real test images')


def real_reference(args, network, num_samples, test):
    """The real images the samples are compared with, and their features: a random --num_real subset of the test
    split `test` (uint8 images, labels), and an equal-count train subset (capped at the test count) whose FID to it
    is the floor."""
    train_set, _ = build_dataset(args.dataset, 'train', args.image_size, args.data_dir, args.seed, args.download)
    num_test = len(test[0]) if args.num_real is None else min(args.num_real, len(test[0]))
    chosen = random_subset(len(test[0]), num_test, args.seed)
    test_images, test_labels = test[0][chosen], test[1][chosen]
    num_floor = min(num_samples, num_test, len(train_set))
    floor_images, _ = load_images(train_set, random_subset(len(train_set), num_floor, args.seed),
                                  desc='real train images')
    device, batch_size = args.device, args.batch_size
    test_features = network.extract(test_images, batch_size, device, desc='test features')['features']
    floor_features = network.extract(floor_images, batch_size, device, desc='train features')['features']
    return {'test_images': test_images, 'test_labels': test_labels, 'test_features': test_features,
            'whole_test': test, 'fid_train_vs_test': fid_from_features(floor_features, test_features),
            'num_floor': num_floor}


def classification_accuracy_score(images, labels, reference, args):
    """CAS: test accuracy of the classifier trained on the samples, and of one trained on as many real images."""
    settings = classifier_settings(args)
    on_samples = train_classifier(images, labels, args.num_classes, settings, args.seed, args.device,
                                  desc='CAS: training on the samples')
    on_real, _ = dataset_classifier(args.dataset, args.image_size, args.data_dir, args.seed, args.classifier_dir,
                                    settings, num_train=len(images), test=reference['whole_test'], device=args.device,
                                    download=args.download)
    test = (reference['test_images'], reference['test_labels'])
    return {'cas': accuracy(on_samples, *test, args.batch_size, args.device),
            'cas_real_baseline': accuracy(on_real, *test, args.batch_size, args.device)}


def score_samples(images, labels, reference, network, args):
    """Scores of uint8 sample images [N, C, S, S] (class labels [N] or None) against the real test reference."""
    outputs = network.extract(images, args.batch_size, args.device, desc='sample features')
    features, test_features = outputs['features'], reference['test_features']
    kid_mean, kid_std = kid(features, test_features, seed=args.seed)
    precision, recall = precision_recall(test_features, features, k=PR_K)
    scores = {'fid': fid_from_features(features, test_features), 'kid_mean': kid_mean, 'kid_std': kid_std,
              'precision': precision, 'recall': recall, 'fid_train_vs_test': reference['fid_train_vs_test']}
    if 'probs' in outputs:
        scores['confident_fraction'] = float((outputs['probs'].max(1).values >= CONFIDENCE).float().mean())
    if labels is not None:
        scores.update(classification_accuracy_score(images, labels, reference, args))
    return scores


def classifier_settings(args):
    """The training recipe of every classifier this script trains (feature space, CAS and its baseline)."""
    return ClassifierSettings(epochs=args.classifier_epochs, min_steps=args.classifier_min_steps)


def print_table(scores, result):
    """A short table: each score beside its real-data reference."""
    notes = {'fid': f'train vs test: {scores["fid_train_vs_test"]:.4g}',
             'kid_mean': f'+- {scores["kid_std"]:.2g}',
             'cas': f'real-data baseline: {scores.get("cas_real_baseline", float("nan")):.4g}'}
    if 'classifier_test_accuracy' in scores:
        notes['confident_fraction'] = f'top class probability >= {CONFIDENCE}'
        notes['classifier_test_accuracy'] = 'the feature network on the real test split'
    print(f'{result["num_samples"]} samples from {result["samples"]} vs {result["num_real"]} real {result["dataset"]} '
          f'test images, {result["features"]} features')
    print(f'{"metric":<26}{"value":>10}  reference')
    for name in ('fid', 'kid_mean', 'precision', 'recall', 'cas', 'confident_fraction', 'classifier_test_accuracy'):
        if name in scores:
            print(f'{name:<26}{scores[name]:>10.4g}  {notes.get(name, "")}')


# -----------------------------------------------------------------------------
# Main

def main(args):
    # Setup: every check that reads only small files runs before any images are loaded or networks trained
    args.device = resolve_device(args.device)
    codes = vq = None
    if os.path.isfile(args.samples):
        codes = read_codes_file(args.samples)
        vq, data = load_vq_for_codes(codes, args.samples, args.vq_checkpoint, args.device)
    else:
        data = {}
    # Flags win; then the VQ checkpoint's data settings; then the defaults.
    args.dataset = args.dataset or data.get('name', 'shapes')
    args.data_dir = args.data_dir or data.get('data_dir', 'data')
    args.image_size = args.image_size or data.get('image_size') or DEFAULT_IMAGE_SIZE[args.dataset]
    args.classifier_dir = args.classifier_dir or os.path.join(args.data_dir, 'eval_classifier')
    json_path = args.json or os.path.join(args.out_dir, 'eval.json')
    _, info = build_dataset(args.dataset, 'test', args.image_size, args.data_dir, args.seed, args.download)
    args.num_classes = info['num_classes']
    if args.features == 'inception':
        network = load_fid_inception(args.inception_weights, args.device)
    elif info['num_classes'] < 2:
        raise UserError(f'{args.dataset} has {info["num_classes"]} class; the classifier feature space needs 2 or '
                        f'more: use --features inception')
    if args.num_real is not None and args.num_real < MIN_IMAGES:
        raise UserError(f'--num_real must be at least {MIN_IMAGES} (precision and recall with k={PR_K} need k + 1)')
    if codes is not None:
        images, labels = decode_codes_file(codes, vq, args.batch_size, args.device)
    else:
        images, labels = read_sample_folder(args.samples, info)
    check_samples(images, labels, info, args.samples)
    json_folder = os.path.dirname(os.path.abspath(json_path))
    if os.path.isdir(json_folder) and not os.access(json_folder, os.W_OK):
        raise UserError(f'cannot write {json_path}: its folder is not writable; choose another --json')

    # The output folder is held (locked) only when something goes into it: eval.json by default, or W&B's files.
    with OutputDir(args.out_dir, enabled=args.json is None or args.wandb):
        # Feature network
        scores = {}
        test = load_test_split(args)
        if args.features == 'classifier':
            network, record = dataset_classifier(args.dataset, args.image_size, args.data_dir, args.seed,
                                                 args.classifier_dir, classifier_settings(args),
                                                 args.classifier_num_train, test, args.device, args.download)
            scores['classifier_test_accuracy'] = record['test_accuracy']

        # Score
        reference = real_reference(args, network, len(images), test)
        scores.update(score_samples(images, labels, reference, network, args))
        result = {'samples': args.samples, 'dataset': args.dataset, 'image_size': args.image_size,
                  'features': args.features, 'class_conditional': labels is not None, 'num_samples': len(images),
                  'num_real': len(reference['test_images']), 'num_floor': reference['num_floor'], 'scores': scores,
                  'settings': {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}}
        write_json(result, json_path)
        print_table(scores, result)
        print(f'scores written to {json_path}')
        if args.wandb:
            tracker = Tracker(args.out_dir, result['settings'], wandb=wandb_settings(args))
            tracker.log(scores, step=0)
            tracker.finish()


def write_json(result, path):
    """Write the result atomically (a reader never sees half a file), creating the folder if needed."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = f'{path}.{os.getpid()}.partial'
        with open(partial, 'w') as f:
            json.dump(result, f, indent=2)
        os.replace(partial, path)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}; choose another --json') from e


def build_parser():
    """The evaluation command line."""
    parser = ArgumentParser(description='Score samples against the real test split: FID, KID, precision/recall, CAS.')
    parser.add_argument('--samples', required=True,
                        help='folder of PNG/JPEG samples (class subfolders for class-conditional ones) or a stage-3 '
                             'codes.pt (required)')
    parser.add_argument('--vq_checkpoint', default=None,
                        help='VQ-VAE or VQ-VAE-2 checkpoint that decodes a codes.pt (default: none)')
    parser.add_argument('--dataset', default=None, choices=DATASETS,
                        help="real data to compare with (default: the VQ checkpoint's, else shapes)")
    parser.add_argument('--data_dir', default=None, help="where the real data lives (default: the VQ checkpoint's, "
                                                         "else data)")
    parser.add_argument('--image_size', type=positive_int, default=None,
                        help="image size (default: the VQ checkpoint's, else the dataset's default, e.g. 32)")
    parser.add_argument('--no_download', dest='download', action='store_false',
                        help='never try to download the real data (default: download when missing)')
    parser.add_argument('--features', default='classifier', choices=['classifier', 'inception'],
                        help='feature space: a small CNN trained on the training split, or the FID Inception-v3 '
                             '(default: classifier)')
    parser.add_argument('--inception_weights', default=None,
                        help='FID Inception weights file (default: <torch hub dir>/checkpoints/'
                             'pt_inception-2015-12-05-6726825d.pth)')
    parser.add_argument('--num_real', type=positive_int, default=None,
                        help='real test images to compare with, a random subset (default: the whole test split)')
    parser.add_argument('--batch_size', type=positive_int, default=250,
                        help='images per forward pass when extracting features (default: 250)')
    parser.add_argument('--classifier_dir', default=None,
                        help='cache of trained evaluation classifiers (default: <data_dir>/eval_classifier)')
    parser.add_argument('--classifier_epochs', type=positive_int, default=ClassifierSettings.epochs,
                        help=f'epochs to train each evaluation classifier (default: {ClassifierSettings.epochs})')
    parser.add_argument('--classifier_min_steps', type=positive_int, default=ClassifierSettings.min_steps,
                        help='at least this many training steps, so that a classifier of a few hundred samples (CAS) '
                             f'is trained too (default: {ClassifierSettings.min_steps})')
    parser.add_argument('--classifier_num_train', type=positive_int, default=None,
                        help='training images for the feature classifier, a random subset (default: all)')
    parser.add_argument('--json', default=None, help='where to write the scores (default: <out_dir>/eval.json)')
    add_common_flags(parser, out_dir='runs/eval', out_dir_help='folder for eval.json and W&B files')
    add_wandb_flags(parser, project='vqvae-eval')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
