"""Checkpoint files: plain dicts of tensors and primitives, written atomically and read with weights_only=True.

Layout: {'format_version', 'kind', 'config', 'model', ...}; training scripts add 'optimizer', 'epoch', 'step',
'metrics', 'dataset', 'image_size' and more (see PIXELCNN_PRIOR_README.md). `kind` and `config` are all that is
needed to rebuild the model.
"""

import hashlib
import os
import pickle
import re
import tempfile

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe or of the wrong kind."""


def save_checkpoint(state, path):
    """Write a checkpoint dict to `path` atomically, stamped with the format version."""
    atomic_save({'format_version': FORMAT_VERSION, **state}, path)


def atomic_save(state, path):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over `path`.

    A kill at any moment leaves either the old file or the new one, never a truncated one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix='.tmp_', suffix='.pth', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path, kinds=None, map_location='cpu'):
    """Read a checkpoint safely (weights_only=True); raise CheckpointError if it is unusable or not one of `kinds`."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        if found is None:  # the weights-only unpickler also rejects plain garbage, with a misleading message
            raise CheckpointError(f'{path} is not a readable checkpoint (corrupt, truncated, or not a .pth file)') from e
        raise CheckpointError(f'{path} was refused by the safe loader (weights_only=True): its pickle calls '
                              f'{found.group(1)}, which a checkpoint of this repo never does; not loaded') from e
    except Exception as e:  # torch.load reports damaged files with many exception types
        raise CheckpointError(f'{path} is not a readable checkpoint (corrupt, truncated, or not a .pth file): '
                              f'{type(e).__name__}') from e
    if not isinstance(state, dict) or 'kind' not in state or 'config' not in state or 'model' not in state:
        raise CheckpointError(f'{path} is not a checkpoint of this repo (no kind/config/model entries)')
    if kinds is not None and state['kind'] not in kinds:
        raise CheckpointError(f"{path} holds a {state['kind']} model, but a {' or '.join(kinds)} checkpoint is needed")
    return state


def file_sha256(path):
    """Hex SHA-256 of a file's content, recorded so that later stages can tell which checkpoint they were given."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
