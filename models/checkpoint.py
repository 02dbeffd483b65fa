"""Checkpoint files: plain dicts of tensors and primitives, written atomically and read with weights_only=True.

Layout: {'format_version', 'kind', 'config', 'model', ...}; training scripts add 'optimizer', 'epoch', 'step',
'metrics', 'data' and more, prior scripts 'code_shapes' and 'vq_checkpoint' (see PIXELCNN_PRIOR_README.md, section 9).
`kind`, `config` and `model` are all that is needed to rebuild the model.
"""

import hashlib
import os
import pickle
import re
import tempfile

import torch

FORMAT_VERSION = 3  # 2: per-level 'code_shapes' in prior checkpoints; 3: transformer priors name their activation


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it the usual mode
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _umask():
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, kinds=None, map_location='cpu'):
    """Read a checkpoint safely (weights_only=True); raise CheckpointError if it is unusable or not of `kinds`.

    `kinds` is one kind ('vq_vae2') or a tuple of kinds; None accepts any.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory, not a checkpoint file (give e.g. {os.path.join(path, "best.pth")})')
    if not os.path.exists(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if not os.access(path, os.R_OK):
        raise CheckpointError(f'cannot read checkpoint {path}: permission denied')
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
    if not isinstance(state['kind'], str):
        raise CheckpointError(f'{path}: kind must be a model kind name, got a {type(state["kind"]).__name__}')
    if not isinstance(state['config'], dict):
        raise CheckpointError(f'{path}: config must be a dict of settings, got a {type(state["config"]).__name__}')
    if not isinstance(state['model'], dict) or not all(isinstance(v, torch.Tensor) for v in state['model'].values()):
        raise CheckpointError(f'{path}: model must be a dict of weight tensors (a state_dict)')
    if kinds is not None and state['kind'] not in kinds:
        raise CheckpointError(f"{path} holds a {state['kind']} model, but a {' or '.join(kinds)} checkpoint is needed")
    return _upgrade(state)


def _upgrade(state):
    """Bring a checkpoint of an older format up to date: format 1 stored a prior's grids as 'code_shape'; before
    format 3 every transformer prior used GELU, the default since being SiLU."""
    version = state.get('format_version', 1)
    if version < 2 and 'code_shape' in state and 'code_shapes' not in state:
        shape = state.pop('code_shape')
        state['code_shapes'] = shape if isinstance(shape, dict) else {'flat': shape}
    if version < 3 and state['kind'] in ('transformer', 'hierarchical_transformer'):
        state['config'].setdefault('activation', 'gelu')
    return state


def file_sha256(path):
    """Hex SHA-256 of a file's content, recorded so that later stages can tell which checkpoint they were given."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
