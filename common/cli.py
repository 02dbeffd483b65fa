"""Command-line helpers: one-line errors with exit status 2, checked number types, device and output-folder checks."""

import argparse
import os
import sys
import traceback

import torch

from models import CheckpointError

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr (exit status 2) instead of usage plus error."""

    def error(self, message):
        sys.stderr.write(f'{self.prog}: error: {message} (see --help)\n')
        sys.exit(2)


def positive_int(text):
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not value > 0 or value == float('inf'):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def add_common_flags(parser, out_dir, out_dir_help='folder for checkpoints and images'):
    """Flags every script shares: output folder, device, seed, debug."""
    parser.add_argument('--out_dir', default=out_dir, help=f'{out_dir_help} (default: {out_dir})')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                        help='auto picks cuda when available (default: auto)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks instead of one-line errors')


def resolve_device(name):
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a UserError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for but no CUDA GPU is available; use --device cpu')
    return torch.device(name)


_created_dirs = []  # output folders this run created, removed again by run_main if an error leaves them empty


def prepare_out_dir(path):
    """Create the output folder and check that it can be written, or raise UserError."""
    try:
        if not os.path.isdir(path):
            os.makedirs(path)
            _created_dirs.append(path)
        probe = os.path.join(path, '.write_test')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise UserError(f'cannot write to output folder {path}: {e.strerror or e}; choose another --out_dir') from e


def run_main(main, args):
    """Call main(args); a UserError or CheckpointError becomes one line on stderr and exit status 2."""
    try:
        main(args)
    except (UserError, CheckpointError) as e:
        if getattr(args, 'debug', False):
            traceback.print_exc()
        for path in _created_dirs:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        # An error raised in a DataLoader worker arrives with the worker's traceback in front: keep the last line.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        sys.stderr.write(f'error: {lines[-1]}\n')
        sys.exit(2)
