"""Model configs: one dataclass per model family is the single source of its hyperparameters.

Each field carries its default, its help text and its allowed range. From that one definition come the model's
`config` dict (stored in checkpoints), the check of a config read from a file, and the scripts' command-line flags.

    @dataclass
    class MyConfig(ModelConfig):
        hidden_channels: int = option(128, 'channels of each layer', low=1, high=8192)
"""

import dataclasses
import math
import typing
from dataclasses import dataclass


class ConfigError(ValueError):
    """A model config with an unknown field, or a value of the wrong type or out of range."""


def option(default, help, low=None, high=None, below=None, choices=None):
    """A config field: its default, help text, and the allowed range [low, high] (or [low, below)) or choices."""
    return dataclasses.field(default=default, metadata={'help': help, 'low': low, 'high': high, 'below': below,
                                                        'choices': choices})


def base_type(annotation):
    """int for `int` and `Optional[int]`, float for `float`, ...; and whether None is allowed."""
    args = typing.get_args(annotation)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def check_value(name, annotation, value, meta):
    """Return `value` converted to the field's type, or raise ConfigError saying what is wrong with it."""
    kind, optional = base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f'{name} must be set, got None')
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{name} must be true or false, got {value!r}')
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{name} must be an integer, got {value!r}')
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f'{name} must be a finite number, got {value!r}')
        value = float(value)
    if meta.get('choices') is not None and value not in meta['choices']:
        raise ConfigError(f'{name} must be one of {", ".join(map(str, meta["choices"]))}, got {value!r}')
    if meta.get('low') is not None and value < meta['low']:
        raise ConfigError(f'{name} must be >= {meta["low"]}, got {value!r}')
    if meta.get('high') is not None and value > meta['high']:
        raise ConfigError(f'{name} must be <= {meta["high"]}, got {value!r}')
    if meta.get('below') is not None and value >= meta['below']:
        raise ConfigError(f'{name} must be < {meta["below"]}, got {value!r}')
    return value


@dataclass
class ModelConfig:
    """Base of the model configs: every field is checked for type and range when the config is made."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f.name, hints[f.name], getattr(self, f.name), f.metadata))
        self.check()

    def check(self):
        """Checks that involve several fields; raise ConfigError. Nothing to check by default."""

    @classmethod
    def from_dict(cls, values):
        """A checked config from a mapping (e.g. a checkpoint's 'config'); unknown names are a ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f'the config must be a dict of settings, got a {type(values).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(name) for name in values if name not in known)
        if unknown:
            raise ConfigError(f'unknown setting {", ".join(unknown)} (known: {", ".join(sorted(known))})')
        return cls(**values)

    def to_dict(self):
        """The config as a plain dict of primitives, as stored in checkpoints."""
        return dataclasses.asdict(self)
