"""Command-line helpers: one-line errors with exit status 2, checked number types, device and output-folder checks."""

import argparse
import dataclasses
import errno
import fcntl
import os
import sys
import time
import traceback
import typing

import torch

from models import CheckpointError
from models.config import ConfigError, base_type, check_value

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr (exit status 2) instead of usage plus error."""

    def error(self, message):
        exit_with_line(f'{self.prog}: error: {message} (see --help)')


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


def nonnegative_float(text):
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be a finite number >= 0, got {text}')
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not value > 0 or value == float('inf'):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def seed_int(text):
    """argparse type: a seed in [0, 2^31 - 1]."""
    value = int(text)
    if not 0 <= value < 2 ** 31:
        raise argparse.ArgumentTypeError(f'must be in [0, 2147483647], got {text}')
    return value


def config_type(config_class, name):
    """argparse type for a model-config field: parsed as the field's type and checked against its range."""
    annotation = typing.get_type_hints(config_class)[name]
    meta = config_class.__dataclass_fields__[name].metadata
    kind, _ = base_type(annotation)

    def parse(text):
        value = kind(text) if kind in (int, float) else text
        try:
            return check_value(name, annotation, value, meta)
        except ConfigError as e:  # "<name> must be ...": argparse names the flag itself
            raise argparse.ArgumentTypeError(str(e)[len(name) + 1:]) from e
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def add_config_flags(group, config_class, names, presets):
    """One flag per config field in `names`, with type, range and help from the config class itself.

    Defaults are None, meaning the preset's value; the help states the class default and every preset's value.
    """
    for f in dataclasses.fields(config_class):
        if f.name not in names:
            continue
        in_presets = ', '.join(f'{preset} {values[f.name]}' for preset, values in presets.items() if f.name in values)
        default = f'{f.default}' + (f'; presets: {in_presets}' if in_presets else '')
        group.add_argument(f'--{f.name}', type=config_type(config_class, f.name), default=None,
                           choices=f.metadata.get('choices'), help=f'{f.metadata["help"]} (default: {default})')


def config_from_flags(args, config_class, names, preset):
    """A config dict: the preset, then every flag of `names` that was given."""
    config = dict(preset)
    config.update({name: getattr(args, name) for name in names if getattr(args, name, None) is not None})
    return config


def add_common_flags(parser, out_dir, out_dir_help='folder for checkpoints and images'):
    """Flags every script shares: output folder, device, seed, debug."""
    parser.add_argument('--out_dir', default=out_dir, help=f'{out_dir_help} (default: {out_dir})')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                        help='auto picks cuda when available (default: auto)')
    parser.add_argument('--seed', type=seed_int, default=0, help='random seed (default: 0)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks instead of one-line errors')


def resolve_device(name):
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a UserError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for but no CUDA GPU is available; use --device cpu')
    return torch.device(name)


class OutputDir:
    """A run's output folder, created if needed and held with an exclusive lock for the life of the run.

    The lock (flock on <out_dir>/.lock, which holds the owner's process id) keeps a second run from writing into the
    same folder; the operating system drops it when the process ends, even by SIGKILL. Temporary files of a save
    that was killed half-way are removed only once the lock is held. Leaving the `with` block because of an error
    removes the folder again if this run created it and wrote nothing into it.
    """

    LOCK_NAME = '.lock'

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        self.created, self.lock_file = False, None

    def __enter__(self):
        if not self.enabled:  # ranks other than 0 under torchrun write nothing
            return self
        try:
            if not os.path.isdir(self.path):
                os.makedirs(self.path)
                self.created = True
            self.lock_file = open(os.path.join(self.path, self.LOCK_NAME), 'a+')
        except OSError as e:
            raise UserError(f'cannot write to output folder {self.path}: {e.strerror or e}; '
                            f'choose another --out_dir') from e
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock_file.seek(0)
            owner = self.lock_file.read().strip() or 'unknown'
            self.lock_file.close()
            self.lock_file = None
            raise UserError(f'output folder {self.path} is in use by another run (process {owner}); wait for it to '
                            f'end or choose another --out_dir')
        self.lock_file.seek(0)
        self.lock_file.truncate()
        self.lock_file.write(f'{os.getpid()}\n')
        self.lock_file.flush()
        for name in os.listdir(self.path):  # what a save killed half-way left behind
            if name.startswith('.tmp_') and name.endswith('.pth'):
                os.remove(os.path.join(self.path, name))
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.lock_file is None:
            return False
        if exc_type is not None and self.created and os.listdir(self.path) == [self.LOCK_NAME]:
            os.remove(os.path.join(self.path, self.LOCK_NAME))
            os.rmdir(self.path)
        self.lock_file.close()  # releases the lock
        return False


def run_main(main, args):
    """Call main(args); a UserError, CheckpointError or full disk becomes one line on stderr and exit status 2.

    Ctrl-C stops with one line too (exit status 130), without a traceback.
    """
    try:
        main(args)
    except (UserError, CheckpointError) as e:
        if getattr(args, 'debug', False):
            traceback.print_exc()
        fail(str(e))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        if getattr(args, 'debug', False):
            traceback.print_exc()
        fail(f'no space left on device while writing {e.filename or "output"}; free some space and run again')
    except KeyboardInterrupt:
        sys.stderr.write(f'interrupted; {interrupt_note(args)}\n')
        sys.exit(130)


OTHER_RANKS_ERROR_DELAY_S = 3


def fail(message):
    """Print the last line of `message` as 'error: ...' on stderr and exit with status 2.

    Under torchrun every rank usually meets the same bad input. The ranks other than 0 wait a moment first: torchrun
    stops the other processes as soon as one exits, so rank 0 reports and the rest are stopped before they repeat
    it. An error only one of them meets still gets printed, after the wait, naming the rank.
    """
    # An error raised in a DataLoader worker arrives with the worker's traceback in front: keep the last line,
    # without the exception's qualified name that the worker adds.
    lines = message.strip().splitlines() or ['unknown error']
    line = lines[-1]
    for prefix in ('common.errors.UserError: ', 'models.checkpoint.CheckpointError: '):
        line = line[len(prefix):] if line.startswith(prefix) else line
    exit_with_line(f'error: {line}')


def exit_with_line(line):
    """Write one line on stderr and exit with status 2; under torchrun, ranks other than 0 wait first (see fail)."""
    rank = int(os.environ.get('RANK', '0'))
    if rank != 0:
        time.sleep(OTHER_RANKS_ERROR_DELAY_S)
        line = f'rank {rank}: {line}'
    sys.stderr.write(f'{line}\n')
    sys.stderr.flush()
    sys.exit(2)


def interrupt_note(args):
    """Where a stopped run's last checkpoint is, for the line printed on Ctrl-C."""
    last = os.path.join(getattr(args, 'out_dir', '') or '', 'last.pth')
    if getattr(args, 'resume', None) is not None or os.path.exists(last):
        return f'the last checkpoint is {last} (continue with --resume {last})'
    return 'no checkpoint was written'
