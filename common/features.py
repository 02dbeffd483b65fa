"""Feature spaces for sample-quality metrics: the FID Inception-v3 network, and a small CNN classifier that the
evaluation trains on the dataset's own training split (the offline default), cached on disk.

Images travel as uint8 tensors [N, C, H, W] (8-bit pixels, as the datasets and saved samples hold them): a quarter of
the memory of float images, and exactly the values a PNG stores.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models import atomic_save

from .data import build_dataset, to_uint8
from .errors import UserError

FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}'
CLASSIFIER_FORMAT = 2  # bump when SmallCNN or its training changes, so old cached classifiers are not re-used


def to_float(images):
    """uint8 pixels [N, C, H, W] -> float32 in [-1, 1], as the datasets give them."""
    return images.float() * (2 / 255) - 1


@torch.no_grad()
def _batched(function, images, batch_size, device, desc):
    """Apply function(float images [B, C, H, W] on device) -> {name: [B, ...]} batch by batch; joined on the CPU."""
    outputs = {}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit='batch', dynamic_ncols=True, leave=False):
        batch = to_float(images[start:start + batch_size]).to(device)
        for name, value in function(batch).items():
            outputs.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(values) for name, values in outputs.items()}


def load_images(dataset, indices=None, desc='loading images', batch_size=500):
    """A dataset's (image, label) items, or those at `indices`, as (uint8 images [N, C, H, W], labels [N])."""
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    images, labels = [], []
    for batch_images, batch_labels in tqdm(loader, desc=desc, unit='batch', dynamic_ncols=True, leave=False):
        images.append(to_uint8(batch_images))
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(images), torch.cat(labels)


# -----------------------------------------------------------------------------
# Inception-v3 (the FID network), from a local weights file only

def default_inception_weights():
    """Where torch's hub cache keeps the FID Inception weights: <torch.hub.get_dir()>/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', FID_WEIGHTS_FILE)


def build_fid_inception():
    """pytorch-fid's FID Inception-v3 structure (TF-ported pooling quirks included), with untrained weights."""
    try:
        import torchvision
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    except ImportError as e:
        raise UserError('--features inception needs the pytorch-fid package: pip install "pytorch-fid>=0.3"') from e
    # The same layers as pytorch_fid.inception.fid_inception_v3(), which would download its weights instead.
    inception = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


class FIDInception(nn.Module):
    """The FID network up to its final average pool: images in [-1, 1] [B, 1 or 3, H, W] -> features [B, 2048]."""

    name = 'inception'

    def __init__(self, inception):
        super().__init__()
        # pytorch_fid.inception.InceptionV3's blocks 0-3, in one sequence.
        self.layers = nn.Sequential(
            inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3, inception.Conv2d_2b_3x3, nn.MaxPool2d(3, stride=2),
            inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3, nn.MaxPool2d(3, stride=2),
            inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d, inception.Mixed_6a, inception.Mixed_6b,
            inception.Mixed_6c, inception.Mixed_6d, inception.Mixed_6e,
            inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c, nn.AdaptiveAvgPool2d(1))

    def forward(self, images):
        """Grey images are repeated to RGB, then resized bilinearly to 299x299 like pytorch-fid's resize_input."""
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        # pytorch-fid resizes [0, 1] images and then maps them to [-1, 1]; resizing is linear, so the order is moot.
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        return self.layers(x).flatten(1)  # [B, 2048]

    def extract(self, images, batch_size, device, desc='inception features'):
        """uint8 images [N, C, H, W] -> {'features': [N, 2048]}."""
        return _batched(lambda batch: {'features': self(batch)}, images, batch_size, device, desc)


def load_fid_inception(path=None, device='cpu'):
    """The FID Inception network with weights from `path` (default: torch's hub cache); never downloads."""
    where = path or default_inception_weights()
    if not os.path.isfile(where):
        raise UserError(f'FID Inception weights not found at {where}; no download is attempted: get '
                        f'{FID_WEIGHTS_URL} and put it at {default_inception_weights()} or pass --inception_weights')
    inception = build_fid_inception()
    try:
        inception.load_state_dict(torch.load(where, map_location='cpu', weights_only=True))
    except Exception as e:  # unpickling and key mismatches raise many exception types
        raise UserError(f'{where} is not the FID Inception weights file {FID_WEIGHTS_FILE} '
                        f'({type(e).__name__}); get it from {FID_WEIGHTS_URL}') from e
    return FIDInception(inception).to(device).eval()


# -----------------------------------------------------------------------------
# The small classifier: the offline feature space

@dataclass
class ClassifierSettings:
    """How the evaluation classifier is trained; part of its cache key."""
    epochs: int = 2
    min_steps: int = 200  # small sets (CAS on a few hundred samples) still get this many steps: epochs alone would
    # leave them untrained, and CAS would only measure the set's size
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 16  # channels of the first conv block; the next two double it
    outlier_weight: float = 0.5  # weight of the loss that teaches the classifier to be unsure on non-images


class SmallCNN(nn.Module):
    """Three conv blocks and two linear layers; the 128 activations before the last layer are the features."""

    name = 'classifier'
    feature_dim = 128

    def __init__(self, in_channels, num_classes, width=16):
        super().__init__()
        # A stride-2 first convolution: the full-resolution layer would cost most of the CPU time and add little.
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),  # S/2
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),  # S/4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4))  # [B, 4 * width, 4, 4] whatever the image size
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, num_classes)
        # Features are divided by their RMS on the training images (set after training), so that distances, FID and
        # KID's kernel (x.y / d + 1)^3 see values of order 1, as with Inception features, whatever the training did.
        self.register_buffer('feature_scale', torch.ones(()))

    def forward(self, x):
        """Images [B, C, S, S] in [-1, 1] -> (features [B, 128] scaled by 1 / feature_scale, logits [B, classes])."""
        hidden = self.hidden(self.convs(x))
        return hidden / self.feature_scale, self.head(hidden)

    def extract(self, images, batch_size, device, desc='classifier features'):
        """uint8 images [N, C, H, W] -> {'features': [N, 128], 'probs': [N, num_classes]} (softmax probabilities)."""
        def run(batch):
            features, logits = self(batch)
            return {'features': features, 'probs': logits.softmax(1)}
        return _batched(run, images, batch_size, device, desc)

    def predict_proba(self, images, batch_size=500, device='cpu'):
        """uint8 images [N, C, H, W] -> softmax class probabilities [N, num_classes]."""
        return self.extract(images, batch_size, device, desc='classifying')['probs']


def outlier_images(images, generator):
    """Images that belong to no class, made from a float batch [B, C, S, S] in [-1, 1], a third of each kind: uniform
    noise; the batch's images cut into 2x2 or 4x4 patches and shuffled (their colours and edges, no shape); and two of
    the batch's images joined along a random smooth boundary (parts of two objects: the blobs a weak prior draws)."""
    B, C, S, _ = images.shape
    n_shuffled, n_mixed = B // 3, B // 3
    noise = torch.rand(B - n_shuffled - n_mixed, C, S, S, generator=generator) * 2 - 1
    patch = 4 if S % 4 == 0 and torch.rand((), generator=generator) < 0.5 else 2 if S % 2 == 0 else 1
    n = S // patch
    patches = images[:n_shuffled].reshape(n_shuffled, C, n, patch, n, patch).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
    order = torch.rand(n_shuffled, n * n, generator=generator).argsort(1)  # one permutation of the patches per image
    shuffled = patches[torch.arange(n_shuffled)[:, None], order]  # (n_shuffled, n*n, C, patch, patch)
    shuffled = shuffled.reshape(n_shuffled, n, n, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(-1, C, S, S)
    first = images[n_shuffled:n_shuffled + n_mixed]
    mask = F.interpolate(torch.rand(n_mixed, 1, 4, 4, generator=generator), size=(S, S), mode='bilinear',
                         align_corners=False) > 0.5  # a few smooth regions
    mixed = torch.where(mask.to(images.device), first, first.roll(1, dims=0))
    return torch.cat([shuffled, mixed, noise.to(images.device)])


def train_classifier(images, labels, num_classes, settings, seed=0, device='cpu', desc='training classifier'):
    """A SmallCNN trained with Adam on uint8 images [N, C, S, S] and labels [N]; returned in eval mode.

    Outlier exposure (Hendrycks et al. 2019): every step also shows half a batch of `outlier_images`, whose target
    is the uniform distribution over the classes, with weight `settings.outlier_weight`. Without it a softmax
    classifier called uniform noise some class with near certainty, and the share of samples it is confident about
    (evaluate.py's confident_fraction) rewarded noise as much as good samples.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], num_classes, settings.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    steps_per_epoch = max(len(images) // settings.batch_size, 1)
    total_steps = max(settings.epochs * steps_per_epoch, settings.min_steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=total_steps)
    model.train()
    step = 0
    with tqdm(total=total_steps, desc=desc, unit='step', dynamic_ncols=True, leave=False) as bar:
        while step < total_steps:
            order = torch.randperm(len(images), generator=generator)
            # Whole batches only: BatchNorm cannot train on a batch of one, and every step then sees as many images.
            for start in range(0, max(len(order) - settings.batch_size, 0) + 1, settings.batch_size):
                if step == total_steps:
                    break
                index = order[start:start + settings.batch_size]
                batch = to_float(images[index])
                outliers = outlier_images(batch[:len(batch) // 2], generator) if settings.outlier_weight else None
                _, logits = model((batch if outliers is None else torch.cat([batch, outliers])).to(device))
                loss = F.cross_entropy(logits[:len(batch)], labels[index].to(device))
                if outliers is not None:  # cross-entropy against the uniform distribution
                    loss = loss - settings.outlier_weight * logits[len(batch):].log_softmax(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
    model.eval()
    features = model.extract(images[:2000], 500, device, desc='feature scale')['features']
    model.feature_scale.fill_(max(float(features.pow(2).mean().sqrt()), 1e-6))
    return model


def accuracy(model, images, labels, batch_size=500, device='cpu'):
    """Fraction of uint8 images [N, C, S, S] whose most probable class is the label."""
    probs = model.predict_proba(images, batch_size, device)
    return float((probs.argmax(1) == labels).float().mean())


def random_subset(size, count, seed):
    """`count` distinct indices of range(size), drawn with `seed` (all of them, shuffled, if count >= size)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist()


def dataset_classifier(dataset, image_size, data_dir, seed, cache_dir, settings=None, num_train=None,
                       test=None, device='cpu', download=True):
    """(SmallCNN, record) trained on `num_train` random training-split images (default all) or read from the cache.

    The file in cache_dir is named by a hash of the data settings and the training settings and written atomically,
    so a later run with the same key re-uses it. record holds 'num_train', 'num_test' and 'test_accuracy' on the
    whole test split, which the caller may pass as `test` = (uint8 images, labels) if it has it loaded already.
    """
    settings = settings or ClassifierSettings()
    key = {'format': CLASSIFIER_FORMAT, 'dataset': dataset, 'image_size': image_size,
           'data_dir': os.path.abspath(data_dir), 'seed': seed, 'num_train': num_train, **asdict(settings)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f'classifier_{dataset}_{image_size}px_{digest}.pth')
    if os.path.isfile(path):
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            model = SmallCNN(**state['config'])
            model.load_state_dict(state['model'])
            if state['key'] == key:
                return model.to(device).eval(), state['record']
        except Exception:  # a damaged or foreign file: train afresh and replace it
            pass

    train_set, info = build_dataset(dataset, 'train', image_size, data_dir, seed, download)
    count = len(train_set) if num_train is None else min(num_train, len(train_set))
    images, labels = load_images(train_set, random_subset(len(train_set), count, seed), desc=f'{dataset} train')
    if test is None:
        test_set, _ = build_dataset(dataset, 'test', image_size, data_dir, seed, download)
        test = load_images(test_set, desc=f'{dataset} test')
    model = train_classifier(images, labels, info['num_classes'], settings, seed, device,
                             desc=f'training the {dataset} classifier')
    record = {'num_train': count, 'num_test': len(test[0]),
              'test_accuracy': accuracy(model, *test, settings.batch_size * 4, device)}
    config = {'in_channels': images.shape[1], 'num_classes': info['num_classes'], 'width': settings.width}
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save({'kind': 'eval_classifier', 'config': config, 'key': key, 'record': record,
                 'model': {name: value.cpu() for name, value in model.state_dict().items()}}, path)
    return model, record
