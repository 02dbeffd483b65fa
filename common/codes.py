"""Code extraction for stage 2: encode a dataset split once with the frozen VQ model and cache the codes on disk.

The cache lives next to the VQ checkpoint, in codes_cache/. Its file name and the key stored inside it include the
SHA-256 of the VQ checkpoint's content and every data setting, so a retrained VQ model or another dataset never
reuses stale codes.
"""

import hashlib
import json
import os

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import atomic_save

from .data import build_dataset


def cache_key(vq_sha256, data, split):
    """Everything the codes depend on, as a dict of primitives."""
    return {'vq_sha256': vq_sha256, 'split': split, 'num_samples': data.get('num_samples', {}).get(split),
            **{k: data.get(k) for k in ('name', 'image_size', 'data_dir', 'seed')}}


def cache_path(vq_path, key):
    """Where the codes for `key` are cached: <VQ checkpoint folder>/codes_cache/<dataset>_<split>_<hash>.pt."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(os.path.abspath(vq_path)), 'codes_cache',
                        f"{key['name']}_{key['split']}_{digest}.pt")


@torch.no_grad()
def extract_codes(vq_model, dataset, batch_size, device, num_workers=0):
    """Encode every image of `dataset`: {'codes': [N,h,w]} or {'codes_top', 'codes_bottom'}, plus 'labels' [N]."""
    vq_model.eval()
    parts, labels = {}, []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for images, y in tqdm(loader, desc='extracting codes', dynamic_ncols=True, leave=False):
        codes = vq_model.get_code_indices(images.to(device))
        names = ('codes_top', 'codes_bottom') if isinstance(codes, tuple) else ('codes',)
        for name, value in zip(names, codes if isinstance(codes, tuple) else (codes,)):
            # int16 holds any codebook of up to 32768 codes at a quarter of int64's size.
            parts.setdefault(name, []).append(value.to(torch.int16).cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    return {**{name: torch.cat(values) for name, values in parts.items()}, 'labels': torch.cat(labels)}


def load_or_extract_codes(vq_model, vq_path, vq_sha256, data, split, batch_size, device, num_workers=0,
                          extract=True):
    """Codes for one split, from the cache when its key matches; returns (codes dict, whether the cache was used).

    With extract=False (ranks other than 0 under torchrun) the cache must already exist.
    """
    key = cache_key(vq_sha256, data, split)
    path = cache_path(vq_path, key)
    if os.path.exists(path):
        cached = torch.load(path, map_location='cpu', weights_only=True)
        if cached.get('key') == key:
            return cached['codes'], True
    if not extract:
        raise FileNotFoundError(f'code cache {path} is missing')
    dataset, _ = build_dataset(data['name'], split, data['image_size'], data['data_dir'], seed=data['seed'],
                               num_samples=key['num_samples'])
    codes = extract_codes(vq_model, dataset, batch_size, device, num_workers)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({'key': key, 'codes': codes}, path)
    return codes, False
