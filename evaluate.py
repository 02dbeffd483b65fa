"""Evaluate a VQ model and its prior, or score samples, against a dataset's real test split.

Examples:
    python evaluate.py --vq_checkpoint runs/vq_vae2/best.pth --prior_checkpoint runs/prior_vqvae2/best.pth
    python evaluate.py --samples samples/pixelcnn_vqvae/codes.pt --vq_checkpoint runs/vq_vae/best.pth
    python evaluate.py --samples my_samples/ --dataset fashion_mnist --num_real 5000

Models (--vq_checkpoint, a VQ-VAE or VQ-VAE-2, optionally with --prior_checkpoint): every setting comes from the
checkpoints, and the test split of the VQ model's data is evaluated: reconstruction MSE and PSNR, code usage and
perplexity per level; with a prior, its held-out bits per code per level; and bits per dimension. The encoder is
deterministic, so -log2 p(x) <= -log2 p(z) - log2 p(x|z): bits_per_dim is the sum of latent_bits_per_dim (the
prior's) and decoder_bits_per_dim (a discretised Gaussian over the 256 pixel values centred on the reconstruction,
one scale per channel fitted on --num_fit training images). Without a prior only the decoder part is reported. With
a prior and no --samples, --num_samples samples are drawn (class-balanced for a class-conditional prior) and scored;
--num_samples 0 draws none: the models' numbers only (bits per code in a minute or two on a CPU once the dataset
classifier below is cached).

Samples (--samples): a folder of PNG/JPEG files (directly inside it, or in one subfolder per class named by the class
index or name: class-conditional samples), or a stage-3 codes.pt, decoded by --vq_checkpoint (which is then also
evaluated as a model). Scores: FID, KID, precision/recall, the fraction of samples the dataset classifier assigns to
a class with probability >= --confidence, and for class-conditional samples the classification accuracy score (CAS),
each beside a real-data reference.

Features come from a small CNN that this script trains on the dataset's training split on the first run (with
outlier exposure, so that noise gets no confident class) and caches under <data_dir>/eval_classifier/ (--features
classifier, the offline default), or from the standard FID Inception-v3 of pytorch-fid (--features inception; its
weights file must be on disk). The real data is seeded by the VQ checkpoint's data seed, else --seed; --seed also
seeds every random subset and the samples. Writes <out_dir>/eval.json (or --json) and prints a table.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.cli import (ArgumentParser, OutputDir, add_common_flags, nonnegative_int, positive_float, positive_int,
                        resolve_device, run_main)
from common.data import DATASETS, DEFAULT_IMAGE_SIZE, build_dataset, to_uint8
from common.errors import UserError
from common.features import (ClassifierSettings, accuracy, dataset_classifier, load_fid_inception, load_images,
                             random_subset, to_float, train_classifier)
from common.metrics import (FIT_VALUES, bits_per_dim, discretized_gaussian_bits_per_dim, fid_from_features,
                            fit_log_scales, kid, precision_recall)
from common.sampling import class_labels, generate, load_pair, probability
from common.tracking import Tracker, add_wandb_flags, wandb_settings
from models import VQ_KINDS, code_statistics, load_checkpoint, model_from_checkpoint

PR_K = 3  # neighbours for the precision/recall manifolds, as in Kynkaanniemi et al. 2019
MIN_IMAGES = PR_K + 1  # a k-NN radius needs k other points; FID's covariance and KID need 2
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
    return vq, {**(state.get('data') or {}), 'image_size': vq.image_size}  # main.py keeps the size in 'config'


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
# Models: reconstruction, bits per dimension and samples of a VQ model and its prior

def load_models(args):
    """(VQ model, prior or None, the VQ checkpoint's data settings) from --vq_checkpoint and --prior_checkpoint, in
    eval mode; a prior that does not fit the VQ model is a UserError."""
    state = load_checkpoint(args.vq_checkpoint, kinds=VQ_KINDS)
    data = state.get('data')
    if not isinstance(data, dict) or data.get('name') not in DATASETS or not isinstance(data.get('seed'), int):
        raise UserError(f'{args.vq_checkpoint} has no usable data settings; give a checkpoint written by main.py '
                        f'(best.pth or last.pth), not a bare model export')
    if args.prior_checkpoint is None:
        vq, prior = model_from_checkpoint(state, args.device, args.vq_checkpoint), None
    else:
        vq, prior = load_pair(args.vq_checkpoint, args.prior_checkpoint, state['kind'], args.device)
    return vq, prior, {**data, 'image_size': vq.image_size}


def check_model_data(args, data):
    """A model is evaluated on the data it was trained on: --dataset and --image_size may only repeat it."""
    for flag, value, stored in (('dataset', args.dataset, data['name']), ('image_size', args.image_size,
                                                                          data['image_size'])):
        if value is not None and value != stored:
            raise UserError(f'--{flag} {value} differs from {args.vq_checkpoint}, trained on {stored}; a model is '
                            f'evaluated on its own data: drop --{flag}')


@torch.no_grad()
def model_batches(vq, images, batch_size, device, desc):
    """Run the VQ model over uint8 images [N, C, S, S] batch by batch. Yields (index of the batch's first image,
    x [B, C, S, S] in [-1, 1] on the CPU, codes {level: [B, h, w]} on device, reconstruction [B, C, S, S] on the
    CPU)."""
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit='batch', dynamic_ncols=True, leave=False):
        x = to_float(images[start:start + batch_size])
        codes = vq.level_codes(x.to(device))
        yield start, x, codes, vq.decode_level_codes(codes).float().cpu()


def fit_decoder_scales(vq, data, args):
    """(log scale per channel [C] of the discretised Gaussian decoder, images used): fitted on --num_fit random
    images of the training split the VQ model was trained on, a few random pixels of each (see fit_log_scales)."""
    train_set, _ = build_dataset(args.dataset, 'train', args.image_size, args.data_dir, args.data_seed,
                                 args.download, num_samples=(data.get('num_samples') or {}).get('train'))
    images, _ = load_images(train_set, random_subset(len(train_set), args.num_fit, args.seed),
                            desc='train images for the decoder scales')
    per_image = math.ceil(FIT_VALUES / len(images))
    generator = torch.Generator().manual_seed(args.seed)
    pixels, means = [], []
    for _, x, _, recon in model_batches(vq, images, args.batch_size, args.device, 'decoder scales'):
        chosen = torch.randint(0, x[0, 0].numel(), (len(x), 1, per_image), generator=generator)
        chosen = chosen.expand(-1, x.shape[1], -1)  # the same pixels in every channel: [B, C, per_image]
        pixels.append(x.flatten(2).gather(2, chosen))
        means.append(recon.flatten(2).gather(2, chosen))
    return fit_log_scales(torch.cat(pixels), torch.cat(means), seed=args.seed), len(images)


@torch.no_grad()
def evaluate_model(vq, prior, test, log_scales, args, classifier=None):
    """Reconstruction, code statistics, the prior's bits per code and bits per dimension on the test split `test`
    (uint8 images [N, C, S, S], labels [N]). Without a prior, the prior's numbers and the total are None. With the
    dataset `classifier`, also how it sees the 8-bit reconstructions: the share it gives a class with probability
    >= --confidence (the most a prior's samples can reach, as they are decoded by the same model) and its accuracy."""
    images, labels = test
    squared_error, decoder_bits, confident, correct = 0.0, 0.0, 0, 0
    counts = {level: torch.zeros(vq.num_embeddings, dtype=torch.long) for level in vq.levels}
    nats = {level: 0.0 for level in vq.levels}  # -ln p(codes of the level), summed over the test split
    for start, x, codes, recon in model_batches(vq, images, args.batch_size, args.device, 'test split'):
        squared_error += float((recon.double() - x.double()).pow(2).sum())
        decoder_bits += float(discretized_gaussian_bits_per_dim(x, recon, log_scales).sum())
        for level, grid in codes.items():
            counts[level] += torch.bincount(grid.flatten().cpu(), minlength=vq.num_embeddings)
        if classifier is not None:
            probs = classifier(to_float(to_uint8(recon)).to(args.device))[1].softmax(1).cpu()
            confident += int((probs.max(1).values >= args.confidence).sum())
            correct += int((probs.argmax(1) == labels[start:start + len(x)]).sum())
        if prior is not None:
            batch_labels = None if prior.num_classes is None else labels[start:start + len(x)].to(args.device)
            for level, value in prior.level_losses(codes, batch_labels, reduction='sum').items():
                nats[level] += float(value)

    num_images, num_dims = len(images), images[0].numel()
    mse = squared_error / images.numel()
    # Images live in [-1, 1], a range of 2, so the peak signal power is 4 (as in main.py's validation).
    reconstruction = {'mse': mse, 'psnr': 10 * math.log10(4 / max(mse, 1e-12))}
    for level in vq.levels:
        perplexity, usage = code_statistics(counts[level])
        reconstruction[f'perplexity/{level}'], reconstruction[f'code_usage/{level}'] = float(perplexity), float(usage)
    if classifier is not None:
        reconstruction['confident_fraction'] = confident / num_images
        reconstruction['classifier_accuracy'] = correct / num_images
    result = {'reconstruction': reconstruction, 'decoder_log_scales': log_scales.tolist()}
    if prior is None:
        return {**result, 'prior': None, 'bits_per_dim': None, 'latent_bits_per_dim': None,
                'decoder_bits_per_dim': decoder_bits / num_images}
    codes_per_image = {level: h * w for level, (h, w) in vq.level_shapes().items()}
    bits_per_code = {f'bits_per_code/{level}': nats[level] / math.log(2) / (num_images * codes_per_image[level])
                     for level in vq.levels}
    bits_per_code['bits_per_code'] = sum(nats.values()) / math.log(2) / (num_images * sum(codes_per_image.values()))
    return {**result, 'prior': bits_per_code,
            **bits_per_dim(sum(nats.values()) / num_images, decoder_bits / num_images, num_dims)}


def draw_samples(vq, prior, args):
    """--num_samples samples of the prior, decoded and rounded to 8 bits: (uint8 images [N, C, S, S], class labels [N]
    or None). A class-conditional prior draws every class in turn, so the classes are balanced; each sample has its
    own generator seeded by --seed and its index, as in stage 3."""
    labels = class_labels(prior, None, args.num_samples)
    settings = argparse.Namespace(num_samples=args.num_samples, batch_size=args.sample_batch_size,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                  naive=False)
    images, _ = generate(vq, prior, settings, labels, args.device, range(args.num_samples))
    return to_uint8(images), labels


def save_sample_folder(folder, images, labels):
    """Write uint8 samples as PNGs that --samples reads back: <folder>/<class index>/<index>.png for class-conditional
    samples, else <folder>/<index>.png."""
    try:
        for index, image in enumerate(images.numpy()):
            where = folder if labels is None else os.path.join(folder, str(int(labels[index])))
            os.makedirs(where, exist_ok=True)
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
                os.path.join(where, f'{index:05d}.png'))
    except OSError as e:
        raise UserError(f'cannot write samples to {folder}: {e.strerror or e}; choose another --save_samples') from e


# -----------------------------------------------------------------------------
# Scores

def load_test_split(args):
    """The real test split (the VQ checkpoint's count of it, else all of it) as (uint8 images [N, C, S, S], labels)."""
    test_set, _ = build_dataset(args.dataset, 'test', args.image_size, args.data_dir, args.data_seed, args.download,
                                num_samples=args.num_test)
    return load_images(test_set, desc='real test images')


def real_reference(args, network, num_samples, test):
    """The real images the samples are compared with, and their features: a random --num_real subset of the test
    split `test` (uint8 images, labels), and an equal-count train subset (capped at the test count) whose FID to it
    is the floor."""
    train_set, _ = build_dataset(args.dataset, 'train', args.image_size, args.data_dir, args.data_seed,
                                 args.download)
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


def load_classifier(args, test):
    """The dataset classifier (trained on the training split, or read from the cache) and its test accuracy."""
    return dataset_classifier(args.dataset, args.image_size, args.data_dir, args.data_seed, args.classifier_dir,
                              classifier_settings(args), args.classifier_num_train, test, args.device, args.download)


def classification_accuracy_score(images, labels, reference, args):
    """CAS: test accuracy of the classifier trained on the samples, and of one trained on as many real images."""
    settings = classifier_settings(args)
    on_samples = train_classifier(images, labels, args.num_classes, settings, args.seed, args.device,
                                  desc='CAS: training on the samples')
    on_real, _ = dataset_classifier(args.dataset, args.image_size, args.data_dir, args.data_seed, args.classifier_dir,
                                    settings, num_train=len(images), test=reference['whole_test'], device=args.device,
                                    download=args.download)
    test = (reference['test_images'], reference['test_labels'])
    return {'cas': accuracy(on_samples, *test, args.batch_size, args.device),
            'cas_real_baseline': accuracy(on_real, *test, args.batch_size, args.device)}


def score_samples(images, labels, reference, network, args, classifier=None):
    """Scores of uint8 sample images [N, C, S, S] (class labels [N] or None) against the real test reference.

    confident_fraction, the share of samples assigned to some class with probability >= --confidence, comes from the
    dataset classifier whatever the feature space: `network` itself in classifier space, else `classifier` (None for
    a single-class dataset: no confident_fraction).
    """
    outputs = network.extract(images, args.batch_size, args.device, desc='sample features')
    features, test_features = outputs['features'], reference['test_features']
    kid_mean, kid_std = kid(features, test_features, seed=args.seed)
    precision, recall = precision_recall(test_features, features, k=PR_K)
    scores = {'fid': fid_from_features(features, test_features), 'kid_mean': kid_mean, 'kid_std': kid_std,
              'precision': precision, 'recall': recall, 'fid_train_vs_test': reference['fid_train_vs_test']}
    probs = outputs.get('probs')
    if probs is None and classifier is not None:
        probs = classifier.predict_proba(images, args.batch_size, args.device)
    if probs is not None:
        scores['confident_fraction'] = float((probs.max(1).values >= args.confidence).float().mean())
    if labels is not None:
        scores.update(classification_accuracy_score(images, labels, reference, args))
    return scores


def classifier_settings(args):
    """The training recipe of every classifier this script trains (feature space, CAS and its baseline)."""
    return ClassifierSettings(epochs=args.classifier_epochs, min_steps=args.classifier_min_steps)


# -----------------------------------------------------------------------------
# Tables

def print_model_table(result):
    """The model's numbers: reconstruction, code statistics, the prior's bits per code and bits per dimension."""
    image_size, channels = result['image_size'], len(result['decoder_log_scales'])
    print(f'{result["vq_checkpoint"]} on {result["num_test"]} {result["dataset"]} test images '
          f'({channels}x{image_size}x{image_size} = {channels * image_size ** 2} dimensions)')
    print(f'{"metric":<26}{"value":>10}  note')
    notes = {'psnr': 'dB', 'decoder_bits_per_dim': f'discretised Gaussian, scales fitted on {result["num_fit"]} '
                                                   f'train images',
             'bits_per_dim': 'an upper bound on -log2 p(x); uniform pixels: 8',
             'confident_fraction': 'of reconstructions, dataset classifier: the ceiling for samples',
             'classifier_accuracy': 'of reconstructions, dataset classifier'}
    prior = result['prior']
    if prior is None:
        notes['latent_bits_per_dim'] = notes['bits_per_dim'] = 'needs a prior: give --prior_checkpoint'
    else:
        notes['latent_bits_per_dim'] = 'the prior, -log2 p(codes) per dimension'
        notes['bits_per_code'] = 'the prior on the test codes, all levels'
    rows = {**result['reconstruction'], **(prior or {})}
    rows.update({name: result[name] for name in ('latent_bits_per_dim', 'decoder_bits_per_dim', 'bits_per_dim')})
    for name, value in rows.items():
        shown = 'n/a' if value is None else f'{value:.4g}'
        print(f'{name:<26}{shown:>10}  {notes.get(name, "")}')


def print_table(scores, result, source):
    """A short table of the samples' scores, each beside its real-data reference."""
    notes = {'fid': f'train vs test: {scores["fid_train_vs_test"]:.4g}',
             'kid_mean': f'+- {scores["kid_std"]:.2g}',
             'cas': f'real-data baseline: {scores.get("cas_real_baseline", float("nan")):.4g}',
             'confident_fraction': f'top class probability >= {result["confidence_threshold"]} (dataset classifier)',
             'classifier_test_accuracy': 'the dataset classifier on the real test split'}
    print(f'{result["num_samples"]} samples from {source} vs {result["num_real"]} real {result["dataset"]} '
          f'test images, {result["features"]} features')
    print(f'{"metric":<26}{"value":>10}  reference')
    for name in ('fid', 'kid_mean', 'precision', 'recall', 'cas', 'confident_fraction', 'classifier_test_accuracy'):
        if name in scores:
            print(f'{name:<26}{scores[name]:>10.4g}  {notes.get(name, "")}')


# -----------------------------------------------------------------------------
# Main

def check_flags(args):
    """What to evaluate: --samples, --vq_checkpoint, or both; flags that need another flag."""
    if args.vq_checkpoint is None and args.prior_checkpoint is not None:
        raise UserError('--prior_checkpoint needs --vq_checkpoint, the VQ-VAE or VQ-VAE-2 the prior was trained on')
    if args.samples is None and args.vq_checkpoint is None:
        raise UserError('nothing to evaluate: give --vq_checkpoint (a VQ model, and --prior_checkpoint for its '
                        'prior) or --samples (a folder of samples or a stage-3 codes.pt)')
    if args.save_samples is not None:
        if args.prior_checkpoint is None or args.samples is not None or args.num_samples == 0:
            raise UserError('--save_samples keeps the samples drawn from --prior_checkpoint, which are drawn only '
                            'without --samples and with --num_samples above 0; drop --save_samples')
        if os.path.isdir(args.save_samples) and os.listdir(args.save_samples):
            raise UserError(f'--save_samples {args.save_samples} is not empty; choose a new folder, so that it '
                            f'holds these samples only')


def main(args):
    # Setup: every check that reads only small files runs before any images are loaded or networks trained
    args.device = resolve_device(args.device)
    check_flags(args)
    codes = vq = prior = None
    data = {}
    if args.samples is not None and os.path.isfile(args.samples):
        codes = read_codes_file(args.samples)
        codes_vq, data = load_vq_for_codes(codes, args.samples, args.vq_checkpoint, args.device)
    if args.vq_checkpoint is not None:
        vq, prior, data = load_models(args)
        check_model_data(args, data)
    apply_data_settings(args, data)
    json_path = args.json or os.path.join(args.out_dir, 'eval.json')
    _, info = build_dataset(args.dataset, 'test', args.image_size, args.data_dir, args.data_seed, args.download)
    args.num_classes = info['num_classes']
    # The prior's samples are scored unless --samples are, or --num_samples 0 asks for the models' scores only.
    drawing = prior is not None and args.samples is None and args.num_samples > 0
    network = check_scoring(args, info, prior, drawing)
    if codes is not None:
        images, labels = decode_codes_file(codes, codes_vq, args.batch_size, args.device)
    elif args.samples is not None:
        images, labels = read_sample_folder(args.samples, info)
    if args.samples is not None:
        check_samples(images, labels, info, args.samples)
    json_folder = os.path.dirname(os.path.abspath(json_path))
    if os.path.isdir(json_folder) and not os.access(json_folder, os.W_OK):
        raise UserError(f'cannot write {json_path}: its folder is not writable; choose another --json')

    # The output folder is held (locked) only when something goes into it: eval.json by default, or W&B's files.
    with OutputDir(args.out_dir, enabled=args.json is None or args.wandb):
        result = {'dataset': args.dataset, 'image_size': args.image_size}
        test = load_test_split(args)  # (uint8 images [N, C, S, S], labels [N])
        # The dataset classifier (trained once, then read from its cache) serves both the model and the samples.
        classifier, record = load_classifier(args, test) if args.num_classes >= 2 else (None, None)

        # Model
        if vq is not None:
            log_scales, num_fit = fit_decoder_scales(vq, data, args)
            result.update({'vq_checkpoint': args.vq_checkpoint, 'prior_checkpoint': args.prior_checkpoint,
                           'num_test': len(test[0]), 'num_fit': num_fit})
            result.update(evaluate_model(vq, prior, test, log_scales, args, classifier))

        # Samples
        if drawing:
            images, labels = draw_samples(vq, prior, args)
            if args.save_samples is not None:
                save_sample_folder(args.save_samples, images, labels)
        if args.samples is not None or drawing:
            result.update(score(images, labels, test, classifier, record, network, args))

        report(result, json_path, vq is not None, args)


def check_scoring(args, info, prior, drawing):
    """Refuse, before anything heavy runs, what the scores cannot take; returns the Inception network, if used
    (the classifier feature space is the dataset classifier, loaded later)."""
    if prior is not None and prior.num_classes not in (None, info['num_classes']):
        raise UserError(f'{args.prior_checkpoint} is conditioned on {prior.num_classes} classes but '
                        f'{args.dataset} has {info["num_classes"]}; give the prior trained on this data')
    if drawing and args.num_samples < MIN_IMAGES:
        raise UserError(f'--num_samples must be 0 (the models only) or at least {MIN_IMAGES} (precision and recall '
                        f'with k={PR_K} need k + 1)')
    if args.samples is None and not drawing:
        return None
    if args.num_real is not None and args.num_real < MIN_IMAGES:
        raise UserError(f'--num_real must be at least {MIN_IMAGES} (precision and recall with k={PR_K} need '
                        f'k + 1)')
    if args.features == 'inception':
        return load_fid_inception(args.inception_weights, args.device)
    if info['num_classes'] < 2:
        raise UserError(f'{args.dataset} has {info["num_classes"]} class; the classifier feature space needs 2 '
                        f'or more: use --features inception')
    return None


def report(result, json_path, with_model, args):
    """Write the JSON, print the tables, and log to W&B with --wandb."""
    result['settings'] = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}
    write_json(result, json_path)
    if with_model:
        print_model_table(result)
    if 'scores' in result:
        print_table(result['scores'], result, args.samples or f'the prior {args.prior_checkpoint}')
    print(f'results written to {json_path}')
    if args.wandb:
        tracker = Tracker(args.out_dir, result['settings'], wandb=wandb_settings(args))
        tracker.log(logged_numbers(result), step=0)
        tracker.finish()


def apply_data_settings(args, data):
    """Set the real data's settings on args: flags win; then the VQ checkpoint's data settings; then the defaults."""
    args.dataset = args.dataset or data.get('name', 'shapes')
    args.data_dir = args.data_dir or data.get('data_dir', 'data')
    args.image_size = args.image_size or data.get('image_size') or DEFAULT_IMAGE_SIZE[args.dataset]
    args.data_seed = data.get('seed', args.seed)
    args.num_test = (data.get('num_samples') or {}).get('test')
    args.classifier_dir = args.classifier_dir or os.path.join(args.data_dir, 'eval_classifier')


def score(images, labels, test, classifier, record, network, args):
    """The result entries about uint8 samples [N, C, S, S] (class labels [N] or None) scored against the real test
    split `test`: their counts and 'scores'. `classifier` and `record` are the dataset classifier and its training
    record (None for a single-class dataset); `network` is the Inception network with --features inception."""
    scores = {}
    if classifier is not None:
        scores['classifier_test_accuracy'] = record['test_accuracy']
    if args.features == 'classifier':
        network = classifier
    reference = real_reference(args, network, len(images), test)
    scores.update(score_samples(images, labels, reference, network, args, classifier))
    return {'samples': args.samples or args.save_samples, 'features': args.features,
            'class_conditional': labels is not None, 'num_samples': len(images),
            'num_real': len(reference['test_images']), 'num_floor': reference['num_floor'],
            'confidence_threshold': args.confidence, 'scores': scores}


def logged_numbers(result):
    """Every number of the result in one flat dict, for W&B."""
    numbers = {**result.get('reconstruction', {}), **(result.get('prior') or {}), **result.get('scores', {})}
    numbers.update({name: result[name] for name in ('bits_per_dim', 'latent_bits_per_dim', 'decoder_bits_per_dim')
                    if result.get(name) is not None})
    return numbers


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


def add_model_flags(parser):
    """Flags of the models mode: the checkpoints, and how the prior's samples are drawn."""
    models = parser.add_argument_group('models')
    models.add_argument('--vq_checkpoint', default=None,
                        help='VQ-VAE or VQ-VAE-2 checkpoint to evaluate, and to decode a codes.pt given as --samples '
                             '(default: none)')
    models.add_argument('--prior_checkpoint', default=None,
                        help="stage-2 prior of the VQ model: bits per code and dimension, and samples to score "
                             "(default: none)")
    models.add_argument('--num_fit', type=positive_int, default=5000,
                        help='training images that the decoder scales are fitted on, a random subset (default: 5000)')
    models.add_argument('--num_samples', type=nonnegative_int, default=10000,
                        help='samples to draw from the prior and score, unless --samples is given; 0 draws none: the '
                             'models\' numbers only (and --samples, if given) (default: 10000)')
    models.add_argument('--sample_batch_size', type=positive_int, default=100,
                        help='samples drawn at once; the samples do not depend on it (default: 100)')
    models.add_argument('--temperature', type=positive_float, default=1.0,
                        help='divides the prior\'s logits when sampling (default: 1.0)')
    models.add_argument('--top_k', type=positive_int, default=None,
                        help='sample each code from the k most likely ones only (default: all codes)')
    models.add_argument('--top_p', type=probability, default=None,
                        help='nucleus sampling with p in (0, 1] (default: all codes)')
    models.add_argument('--save_samples', default=None,
                        help='also write the drawn samples as PNGs into this new folder, one subfolder per class for '
                             'a class-conditional prior, which --samples can score again (default: none)')


def add_sample_flags(parser):
    """Flags of the samples mode: the samples, the real data they are compared with, and the feature space."""
    samples = parser.add_argument_group('samples')
    samples.add_argument('--samples', default=None,
                         help='folder of PNG/JPEG samples (class subfolders for class-conditional ones) or a stage-3 '
                              'codes.pt (default: none)')
    samples.add_argument('--dataset', default=None, choices=DATASETS,
                         help="real data to compare with (default: the VQ checkpoint's, else shapes)")
    samples.add_argument('--data_dir', default=None, help="where the real data lives (default: the VQ checkpoint's, "
                                                          "else data)")
    samples.add_argument('--image_size', type=positive_int, default=None,
                         help="image size (default: the VQ checkpoint's, else the dataset's default, e.g. 32)")
    samples.add_argument('--no_download', dest='download', action='store_false',
                         help='never try to download the real data (default: download when missing)')
    samples.add_argument('--features', default='classifier', choices=['classifier', 'inception'],
                         help='feature space: a small CNN trained on the training split, or the FID Inception-v3 '
                              '(default: classifier)')
    samples.add_argument('--inception_weights', default=None,
                         help='FID Inception weights file (default: <torch hub dir>/checkpoints/'
                              'pt_inception-2015-12-05-6726825d.pth)')
    samples.add_argument('--num_real', type=positive_int, default=None,
                         help='real test images to compare with, a random subset (default: the whole test split)')
    samples.add_argument('--confidence', type=probability, default=0.9,
                         help='confident_fraction counts the samples that the dataset classifier gives a class with '
                              'at least this probability (default: 0.9)')
    samples.add_argument('--classifier_dir', default=None,
                         help='cache of trained evaluation classifiers (default: <data_dir>/eval_classifier)')
    samples.add_argument('--classifier_epochs', type=positive_int, default=ClassifierSettings.epochs,
                         help=f'epochs to train each evaluation classifier (default: {ClassifierSettings.epochs})')
    samples.add_argument('--classifier_min_steps', type=positive_int, default=ClassifierSettings.min_steps,
                         help='at least this many training steps, so that a classifier of a few hundred samples '
                              f'(CAS) is trained too (default: {ClassifierSettings.min_steps})')
    samples.add_argument('--classifier_num_train', type=positive_int, default=None,
                         help='training images for the dataset classifier, a random subset (default: all)')


def build_parser():
    """The evaluation command line."""
    parser = ArgumentParser(description='Evaluate a VQ model and its prior (reconstruction, bits per dimension, '
                                        'samples), or score samples against the real test split: FID, KID, '
                                        'precision/recall, CAS.')
    add_model_flags(parser)
    add_sample_flags(parser)
    parser.add_argument('--batch_size', type=positive_int, default=250,
                        help='images per forward pass of the VQ model, the prior and the feature networks '
                             '(default: 250)')
    parser.add_argument('--json', default=None, help='where to write the results (default: <out_dir>/eval.json)')
    add_common_flags(parser, out_dir='runs/eval', out_dir_help='folder for eval.json and W&B files')
    add_wandb_flags(parser, project='vqvae-eval')
    return parser


if __name__ == '__main__':
    args = build_parser().parse_args()
    run_main(main, args)
