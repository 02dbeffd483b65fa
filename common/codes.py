"""Code extraction for stage 2: encode a dataset split once with the frozen VQ model and cache the codes on disk.

The cache lives next to the VQ checkpoint, in codes_cache/. Its file name and the key stored inside it include the
SHA-256 of the VQ checkpoint's content and every data setting, so a retrained VQ model or another dataset never
reuses stale codes. A cache file that cannot be read is reported, moved aside and extracted again.
"""

import hashlib
import json
import os
import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import atomic_save

from .data import build_dataset
from .errors import UserError


def cache_key(vq_sha256, data, image_size, split):
    """Everything the codes depend on, as a dict of primitives."""
    return {'vq_sha256': vq_sha256, 'split': split, 'num_samples': (data.get('num_samples') or {}).get(split),
            'image_size': image_size, **{k: data.get(k) for k in ('name', 'data_dir', 'seed')}}


def cache_path(vq_path, key):
    """Where the codes for `key` are cached: <VQ checkpoint folder>/codes_cache/<dataset>_<split>_<hash>.pt."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(os.path.abspath(vq_path)), 'codes_cache',
                        f"{key['name']}_{key['split']}_{digest}.pt")


@torch.no_grad()
def extract_codes(vq_model, dataset, batch_size, device, num_workers=0):
    """Encode every image of `dataset`: {'levels': {level: codes [N, h, w]}, 'labels': [N]}."""
    vq_model.eval()
    parts, labels = {level: [] for level in vq_model.levels}, []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for images, y in tqdm(loader, desc='extracting codes', dynamic_ncols=True, leave=False):
        for level, codes in vq_model.level_codes(images.to(device)).items():
            # int16 holds any codebook of up to 32768 codes at a quarter of int64's size.
            parts[level].append(codes.to(torch.int16).cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    return {'levels': {level: torch.cat(values) for level, values in parts.items()}, 'labels': torch.cat(labels)}


def read_cache(path, key, levels):
    """The cached codes at `path` if the file is sound and holds `key`, else None; a damaged file is moved aside."""
    if not os.path.exists(path):
        return None
    try:
        cached = torch.load(path, map_location='cpu', weights_only=True)
        sound = (isinstance(cached, dict) and isinstance(cached.get('codes'), dict)
                 and isinstance(cached['codes'].get('levels'), dict)
                 and set(cached['codes']['levels']) == set(levels)
                 and isinstance(cached['codes'].get('labels'), torch.Tensor))
        problem = None if sound else 'it does not hold codes of this repo'
    except Exception as e:  # truncated, not a pickle, or refused by the safe loader
        cached, problem = None, f'{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}'
    if problem is not None:
        aside = f'{path}.bad'
        os.replace(path, aside)
        print(f'WARNING: code cache {path} is unreadable ({problem}); moved it to {aside} and extracting again',
              file=sys.stderr)
        return None
    return cached['codes'] if cached.get('key') == key else None


def load_or_extract_codes(vq_model, vq_path, vq_sha256, data, image_size, split, batch_size, device, num_workers=0,
                          extract=True):
    """Codes for one split, from the cache when its key matches; returns (codes dict, whether the cache was used).

    With extract=False (ranks other than 0 under torchrun) the cache must already exist.
    """
    key = cache_key(vq_sha256, data, image_size, split)
    path = cache_path(vq_path, key)
    codes = read_cache(path, key, vq_model.levels)
    if codes is not None:
        return codes, True
    if not extract:  # rank 0 wrote it a moment ago: this process cannot see rank 0's files
        raise UserError(f'code cache {path}, written by rank 0, is missing here; under torchrun on several nodes the '
                        f'VQ checkpoint\'s folder must be on a file system all nodes share')
    dataset, _ = build_dataset(data['name'], split, image_size, data['data_dir'], seed=data['seed'],
                               num_samples=key['num_samples'])
    codes = extract_codes(vq_model, dataset, batch_size, device, num_workers)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({'key': key, 'codes': codes}, path)
    return codes, False
