"""A memory estimate made before anything is allocated, so that a run too big for the machine stops in one line.

The model is built on PyTorch's meta device (shapes only, no storage) and one forward pass is traced there; the
estimate is 16 bytes per parameter (weights, gradients and Adam's two moments in float32) plus twice the outputs of
every layer (kept for the backward pass, and their gradients).
"""

import torch
import torch.nn as nn

from models import build_model

from .errors import UserError

BYTES_PER_PARAMETER = 16
GIB = 2 ** 30


def available_bytes(device):
    """Free memory on `device`: the GPU's free memory, or MemAvailable of the machine for the CPU."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            fields = dict(line.split(':', 1) for line in f)
        return int(fields['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no estimate to compare with
        return None


def estimate_training_bytes(kind, config, forward):
    """(bytes, parameters) for training a model of `kind`; `forward(model)` runs one batch on meta tensors."""
    with torch.device('meta'):
        model = build_model(kind, config).eval()
        parameters = sum(p.numel() for p in model.parameters())
        activations = []

        def record(module, inputs, output):
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor):
                    activations.append(tensor.numel() * tensor.element_size())

        hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())
                 and not isinstance(m, nn.Embedding)]
        try:
            with torch.no_grad():
                forward(model)
        finally:
            for hook in hooks:
                hook.remove()
    return BYTES_PER_PARAMETER * parameters + 2 * sum(activations), parameters


def check_memory(kind, config, device, forward, what='lower --batch_size or the model size'):
    """Raise UserError if training a model of `kind` needs more memory than `device` has free; `what` is the advice."""
    needed, parameters = estimate_training_bytes(kind, config, forward)
    free = available_bytes(device)
    if free is not None and needed > free:
        raise UserError(f'this run needs about {needed / GIB:.1f} GiB ({parameters / 1e6:.1f}M parameters plus '
                        f'activations) but {device.type} has {free / GIB:.1f} GiB free; {what}')
