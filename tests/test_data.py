"""Behaviour of common/data.py: shapes, image folders, splits, and the errors users see when data is missing."""
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import SHAPE_CLASSES, ShapesDataset, build_dataset, denormalize, to_uint8
from common.errors import UserError


# -----------------------------------------------------------------------------
# Shapes

def test_shapes_item_depends_only_on_seed_and_index():
    a, b, other = ShapesDataset(10, seed=0), ShapesDataset(10, seed=0), ShapesDataset(10, seed=1)
    a[7]  # access order must not matter
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == b[3][1]
    assert not torch.equal(a[3][0], other[3][0])
    assert not torch.equal(a[3][0], a[4][0])


@pytest.mark.parametrize('image_size', [16, 32, 64])
def test_shapes_size_range_and_quantisation(image_size):
    dataset, info = build_dataset('shapes', 'val', image_size=image_size, num_samples=20)
    for x, label in dataset:
        assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert isinstance(label, int)
        # 8-bit pixels like real data, so the round trip through to_uint8 is exact.
        assert torch.equal(2 * to_uint8(x).float() / 255 - 1, x)
    assert info == {'name': 'shapes', 'image_size': image_size, 'in_channels': 3, 'num_classes': 6,
                    'class_names': list(SHAPE_CLASSES), 'split': 'val', 'num_samples': 20}


def test_shapes_labels_cover_all_classes_and_shapes_are_visible():
    dataset = ShapesDataset(300, image_size=32, seed=5)
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert set(labels) == set(range(len(SHAPE_CLASSES)))
    for i in range(50):
        x = dataset[i][0]
        assert (x.amax(dim=(1, 2)) - x.amin(dim=(1, 2))).sum() > 0.5  # a contrasting shape, not a blank image


def test_shapes_splits_and_sizes():
    items = {split: build_dataset('shapes', split)[0] for split in ('train', 'val', 'test')}
    assert [len(d) for d in items.values()] == [20000, 2000, 2000]
    assert not torch.equal(items['train'][0][0], items['val'][0][0])
    assert not torch.equal(items['val'][0][0], items['test'][0][0])
    assert not torch.equal(build_dataset('shapes', 'train', seed=1)[0][0][0], items['train'][0][0])


def test_denormalize_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    assert torch.equal(denormalize(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def test_info_is_checkpoint_safe(tmp_path):
    _, info = build_dataset('shapes', 'train', num_samples=4)
    torch.save({'data': info}, tmp_path / 'ckpt.pt')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['data'] == info


# -----------------------------------------------------------------------------
# Image folders

def _write_images(root, per_class=6):
    """Two classes of small real PNGs, some grayscale and of different sizes."""
    rng = np.random.default_rng(0)
    for name in ('cats', 'dogs'):
        os.makedirs(root / name)
        for i in range(per_class):
            mode, shape = ('L', (40, 50)) if i % 2 else ('RGB', (30, 20, 3))
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / name / f'{i}.png')


def test_imagefolder_loads_and_splits(tmp_path):
    _write_images(tmp_path)  # 12 files: indices 0 and 10 are held out
    train, info = build_dataset('imagefolder', 'train', image_size=16, data_dir=str(tmp_path))
    val, _ = build_dataset('imagefolder', 'val', image_size=16, data_dir=str(tmp_path))
    test, _ = build_dataset('imagefolder', 'test', image_size=16, data_dir=str(tmp_path))
    assert (len(train), len(val), len(test)) == (10, 2, 2)
    assert val.indices == test.indices == [0, 10]
    assert info['num_classes'] == 2 and info['class_names'] == ['cats', 'dogs'] and info['in_channels'] == 3
    for x, label in list(train) + list(val):
        assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and label in (0, 1)
    assert build_dataset('imagefolder', 'val', data_dir=str(tmp_path))[0][0][0].shape == (3, 64, 64)


def test_imagefolder_empty_or_missing_dir(tmp_path):
    with pytest.raises(UserError, match='no images'):
        build_dataset('imagefolder', 'train', data_dir=str(tmp_path))
    with pytest.raises(UserError, match='not found'):
        build_dataset('imagefolder', 'train', data_dir=str(tmp_path / 'missing'))


def test_imagefolder_corrupt_image_names_the_file(tmp_path):
    _write_images(tmp_path, per_class=1)
    (tmp_path / 'dogs' / 'broken.png').write_bytes(b'not a png')
    dataset, _ = build_dataset('imagefolder', 'train', image_size=16, data_dir=str(tmp_path))
    with pytest.raises(UserError, match='broken.png') as error:
        [dataset[i] for i in range(len(dataset))]
    assert '\n' not in str(error.value)


# -----------------------------------------------------------------------------
# Torchvision datasets and errors

def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match='cifar10'):
        build_dataset('imagenet', 'train')
    with pytest.raises(ValueError):
        build_dataset('shapes', 'training')


@pytest.fixture
def offline(monkeypatch):
    """Every download fails at once, as on a machine without internet, whatever this machine can reach."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError('offline')
    monkeypatch.setattr(urllib.request, 'urlopen', refuse)


@pytest.mark.parametrize('name', ['cifar10', 'mnist'])
@pytest.mark.parametrize('download', [False, True])
def test_missing_torchvision_dataset_says_where_to_put_files(tmp_path, offline, name, download):
    with pytest.raises(UserError) as error:
        build_dataset(name, 'train', data_dir=str(tmp_path), download=download)
    message = str(error.value)
    assert name in message and str(tmp_path) in message and '\n' not in message
    assert ('download failed' in message) == download


def test_fashion_mnist_from_debian_package(fashion_data_dir, offline):
    sizes = {}
    for split in ('train', 'val', 'test'):
        dataset, info = build_dataset('fashion_mnist', split, data_dir=str(fashion_data_dir), download=False)
        sizes[split] = info['num_samples']
        x, label = dataset[0]
        assert x.shape == (1, 32, 32) and 0 <= label < 10
        assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, -2:] == -1)  # padded with the black background
        assert x.max() > 0
    assert sizes == {'train': 55000, 'val': 5000, 'test': 10000}
    assert info['num_classes'] == 10 and info['in_channels'] == 1
    small, _ = build_dataset('fashion_mnist', 'train', image_size=28, data_dir=str(fashion_data_dir), num_samples=3)
    assert len(small) == 3 and small[0][0].shape == (1, 28, 28)
    # Unpacked from Debian's recompressed .gz files, so that torchvision reads them without its md5 check.
    assert sorted(os.listdir(fashion_data_dir / 'FashionMNIST' / 'raw')) == [
        't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte']
