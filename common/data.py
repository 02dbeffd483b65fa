"""Datasets for every stage: procedural shapes (the default, no download), MNIST, Fashion-MNIST, CIFAR, image folders.

Every item is (image, label): image is a float32 tensor [C, H, W] in [-1, 1], x = 2 * pixel/255 - 1, and label is
an int. build_dataset() also returns `info`, a dict of primitives that goes into checkpoints so later stages rebuild
the same data without flags. Splits: 'train' is the official training set minus its last 5000 images, which form
'val'; 'test' is the official test set. Image folders put every 10th file (sorted) in 'val', and 'test' is 'val'.
"""
import contextlib
import gzip
import os
import shutil
import socket

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from common.errors import UserError

DATASETS = ('shapes', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagefolder')
DEFAULT_IMAGE_SIZE = {'shapes': 32, 'mnist': 32, 'fashion_mnist': 32, 'cifar10': 32, 'cifar100': 32, 'imagefolder': 64}
FASHION_MNIST_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'  # Debian package dataset-fashion-mnist
SPLITS = ('train', 'val', 'test')
SHAPE_CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'diamond')
# Shape and background colours come from a small palette: discrete factors that a prior can learn in CPU minutes.
PALETTE = np.array([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.15, 0.3, 0.9], [0.95, 0.85, 0.1], [0.9, 0.45, 0.05],
                    [0.6, 0.15, 0.8], [0.1, 0.8, 0.85], [0.95, 0.95, 0.95], [0.1, 0.1, 0.1]])
SHAPES_NUM_SAMPLES = {'train': 20000, 'val': 2000, 'test': 2000}
VAL_SIZE = 5000  # held-out tail of each official training set
DOWNLOAD_TIMEOUT_S = 15  # per socket operation, so a blocked network fails in seconds rather than minutes

_IDX_GZ = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
           't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
# name -> (torchvision class, folder under data_dir that holds its files, archives to put there, other way to get them)
_TORCHVISION = {
    'mnist': (datasets.MNIST, 'MNIST/raw', _IDX_GZ, 'or the same files unzipped'),
    'fashion_mnist': (datasets.FashionMNIST, 'FashionMNIST/raw', _IDX_GZ,
                      'or run apt-get install dataset-fashion-mnist'),
    'cifar10': (datasets.CIFAR10, '', ('cifar-10-python.tar.gz',), 'or the extracted cifar-10-batches-py/'),
    'cifar100': (datasets.CIFAR100, '', ('cifar-100-python.tar.gz',), 'or the extracted cifar-100-python/'),
}


def denormalize(x):
    """Map model outputs from [-1, 1] back to [0, 1], clamped, as torchvision.utils.save_image expects."""
    return ((x + 1) / 2).clamp(0, 1)


def to_uint8(x):
    """Map model outputs from [-1, 1] back to uint8 pixels in [0, 255], clamped."""
    return (denormalize(x) * 255).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# Procedural shapes

class ShapesDataset(Dataset):
    """One anti-aliased coloured shape on a plain or gradient background; the label is the shape's class."""

    classes = list(SHAPE_CLASSES)
    supersample = 4  # the mask is drawn at 4x resolution and area-averaged, so edges are smooth

    def __init__(self, num_samples, image_size=32, seed=0):
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        fine = image_size * self.supersample
        self._fine = (np.arange(fine) + 0.5) / fine  # mask sample positions in [0, 1]
        self._pixels = (np.arange(image_size) + 0.5) / image_size  # pixel centres in [0, 1]

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for {self.num_samples} images')  # also ends `for x in ...`
        # Seeding by (seed, index) makes every item independent of access order and of DataLoader workers.
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(len(SHAPE_CLASSES)))
        background, start, end = self._background(rng)  # (H, W, 3)
        colour = self._colour(rng, start, end)
        alpha = self._coverage(SHAPE_CLASSES[label], rng)[..., None]  # (H, W, 1)
        image = background * (1 - alpha) + colour * alpha
        pixels = np.round(image * 255).astype(np.float32)  # quantised like real 8-bit data
        return torch.from_numpy(2 * pixels.transpose(2, 0, 1) / 255 - 1), label

    def _background(self, rng):
        """A palette colour, in half the images fading softly into a nearby colour along a random direction."""
        start = PALETTE[rng.integers(len(PALETTE))]
        end = np.clip(start + rng.uniform(-0.15, 0.15, size=3), 0, 1) if rng.random() < 0.5 else start
        angle = rng.uniform(0, 2 * np.pi)
        x, y = self._pixels[None, :] - 0.5, self._pixels[:, None] - 0.5
        t = 0.5 + (x * np.cos(angle) + y * np.sin(angle)) / np.sqrt(2)  # (H, W), within [0, 1]
        return start + (end - start) * t[..., None], start, end

    @staticmethod
    def _colour(rng, start, end):
        """A palette colour far from both ends of the background, so the shape is always clearly visible."""
        distance = np.minimum(np.linalg.norm(PALETTE - start, axis=1), np.linalg.norm(PALETTE - end, axis=1))
        far = np.flatnonzero(distance > 0.6)
        return PALETTE[rng.choice(far)] if len(far) else PALETTE[distance.argmax()]

    def _coverage(self, shape, rng):
        """Fraction of each pixel covered by the shape, (H, W), with a random size of 40-80% of the image."""
        size = rng.uniform(0.4, 0.8)
        cx, cy = rng.uniform(size / 2, 1 - size / 2, size=2)
        u = (self._fine[None, :] - cx) / (size / 2)  # (1, 4W): -1..1 across the shape's bounding box
        v = (self._fine[:, None] - cy) / (size / 2)  # (4H, 1): -1..1, pointing down
        r2 = u ** 2 + v ** 2
        if shape == 'circle':
            inside = r2 <= 1
        elif shape == 'square':
            inside = np.maximum(np.abs(u), np.abs(v)) <= 1
        elif shape == 'triangle':  # apex at the top
            inside = (np.abs(u) <= (v + 1) / 2) & (v <= 1)
        elif shape == 'cross':
            inside = ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
        elif shape == 'ring':
            inside = (r2 <= 1) & (r2 >= 0.3)
        else:  # diamond
            inside = np.abs(u) + np.abs(v) <= 1
        n, k = self.image_size, self.supersample
        return inside.reshape(n, k, n, k).mean(axis=(1, 3))


# -----------------------------------------------------------------------------
# Files on disk

def _transform(name, image_size):
    """PIL image -> float tensor [C, image_size, image_size] in [-1, 1]."""
    channels = 1 if name in ('mnist', 'fashion_mnist') else 3
    if name == 'imagefolder':
        resize = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    elif channels == 1 and image_size == 32:
        resize = [transforms.Pad(2, fill=0)]  # pad 28 -> 32 on the black background, as VQ-VAE repos do
    elif image_size != (28 if channels == 1 else 32):
        resize = [transforms.Resize(image_size)]
    else:
        resize = []
    normalize = transforms.Normalize((0.5,) * channels, (0.5,) * channels)
    return transforms.Compose(resize + [transforms.ToTensor(), normalize])


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def _read_rgb(path):
    """Read an image file as 8-bit RGB, scaling 16-bit and float images; an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
                # PIL's convert('RGB') clips these modes at 255 instead of scaling them; 'I' images come from
                # 16-bit PNGs, so their range is 0..65535 (as is 'F' from 16-bit TIFFs).
                values = np.asarray(image, dtype=np.float64)
                scale = 255.0 / 65535.0 if image.mode != 'F' or values.max() > 1.0 else 255.0
                image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), mode='L')
            return image.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        # UnidentifiedImageError and truncated files are OSErrors; a decompression bomb has a class of its own.
        raise UserError(f'cannot read image {path}: {str(error).splitlines()[0]}') from error


def _list_images(folder):
    """Image files under `folder`, sorted, following symlinks but never into a directory already seen."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or two links to one folder: each image is listed once
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS)
                  and not name.startswith('.')]
    return found


class ImageFolderDataset(Dataset):
    """Images in one subfolder per class (<root>/<class>/<image>), or directly in <root> as one unlabelled class."""

    def __init__(self, root, transform):
        self.transform = transform
        subfolders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith('.'))
        per_class = [(name, _list_images(os.path.join(root, name))) for name in subfolders]
        per_class = [(name, files) for name, files in per_class if files]
        if per_class:
            self.classes = [name for name, _ in per_class]
            self.items = [(path, label) for label, (_, files) in enumerate(per_class) for path in files]
        else:  # a flat folder (FFHQ-style): one class
            self.classes = [os.path.basename(os.path.normpath(root))]
            self.items = [(os.path.join(root, name), 0) for name in sorted(os.listdir(root))
                          if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')
                          and os.path.isfile(os.path.join(root, name))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        return self.transform(_read_rgb(path)), label


def _image_folder(data_dir, split, transform):
    """An image-folder split: every 10th file of the sorted list is 'val' (and 'test'), the rest 'train'."""
    layout = (f'expected {os.path.join(data_dir, "<class>", "<image>.png")} or images directly in {data_dir} '
              f'(extensions: {", ".join(IMAGE_EXTENSIONS)})')
    if not os.path.isdir(data_dir):
        raise UserError(f'imagefolder: directory {data_dir} not found; {layout}')
    folder = ImageFolderDataset(data_dir, transform)
    if not folder.items:
        raise UserError(f'imagefolder: no images in {data_dir}; {layout}')
    held_out = split in ('val', 'test')
    indices = [i for i in range(len(folder)) if (i % 10 == 0) == held_out]
    return Subset(folder, indices), folder.classes


def _gunzip_into(src_dir, dst_dir):
    """Decompress the four MNIST-format .gz files from src_dir into dst_dir, where torchvision reads them."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in _IDX_GZ:
        target = os.path.join(dst_dir, name[:-len('.gz')])
        if not os.path.exists(target):
            partial = f'{target}.{os.getpid()}.partial'
            with gzip.open(os.path.join(src_dir, name)) as src, open(partial, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)  # atomic, so a concurrent process never reads half a file


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Bound every blocking socket operation, since torchvision's downloads set no timeout of their own."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision_dataset(name, split, data_dir, download, transform):
    """A split of a torchvision dataset: 'train'/'val' from its training set, 'test' from its test set."""
    cls, folder, archives, alternative = _TORCHVISION[name]
    where = os.path.join(data_dir, folder, '')
    if name == 'fashion_mnist' and all(os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, f)) for f in _IDX_GZ):
        # Unzip them ourselves: Debian recompressed them, so torchvision's md5 check would reject the .gz files.
        _gunzip_into(FASHION_MNIST_SYSTEM_DIR, where)
    # torchvision's download() unpacks archives already in place without the network (after checking their md5).
    in_place = all(os.path.exists(os.path.join(where, f)) for f in archives)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            full = cls(data_dir, train=split != 'test', transform=transform, download=download or in_place)
    except (RuntimeError, OSError) as error:  # URLError and socket timeouts are OSErrors
        failure = 'the download failed' if download else 'downloading is off'
        raise UserError(f"{name}: files not found under {where} and {failure}; "
                        f"put {', '.join(archives)} ({alternative}) in {where}") from error
    if split == 'test':
        return full, full.classes
    train_size = len(full) - VAL_SIZE
    return Subset(full, range(train_size) if split == 'train' else range(train_size, len(full))), full.classes


# -----------------------------------------------------------------------------
# The one entry point

def build_dataset(name, split, image_size=None, data_dir='data', seed=0, download=True, num_samples=None):
    """Return (dataset, info) for split in {'train', 'val', 'test'}."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, not {split!r}')
    image_size = image_size or DEFAULT_IMAGE_SIZE[name]
    if name == 'shapes':
        size = SHAPES_NUM_SAMPLES[split] if num_samples is None else num_samples
        # 3 * seed + split index gives every (seed, split) pair its own images.
        dataset = ShapesDataset(size, image_size, seed=3 * seed + SPLITS.index(split))
        classes = dataset.classes
    else:
        transform = _transform(name, image_size)
        if name == 'imagefolder':
            dataset, classes = _image_folder(data_dir, split, transform)
        else:
            dataset, classes = _torchvision_dataset(name, split, data_dir, download, transform)
        if num_samples is not None:  # e.g. a quick run on the first few images of the split
            dataset = Subset(dataset, range(min(num_samples, len(dataset))))
    if len(dataset) == 0:
        raise UserError(f'{name}: the {split} split is empty; add images or raise num_samples')
    info = {'name': name, 'image_size': image_size, 'in_channels': 1 if name in ('mnist', 'fashion_mnist') else 3,
            'num_classes': len(classes), 'class_names': list(classes), 'split': split, 'num_samples': len(dataset)}
    return dataset, info
