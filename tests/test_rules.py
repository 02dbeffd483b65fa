"""Rules of the code base (see STYLE.md) that keep classes of bugs from coming back: every class and public function
documented, models/ independent of the scripts' helpers, one script skeleton whose help states every default, and
no torch.load that could run code from a file.
"""
import argparse
import ast
import glob
import importlib
import inspect
import os

import pytest

from helpers import REPO

PACKAGES = ('models', 'common')
SCRIPTS = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, '*.py')))


def package_modules():
    """'models.vq_vae', 'common.cli', ... for every module of the two packages."""
    return [f'{package}.{os.path.basename(path)[:-3]}' for package in PACKAGES
            for path in sorted(glob.glob(os.path.join(REPO, package, '*.py')))]


def python_files(*folders):
    """Every .py file under the given folders of the repo (the repo root itself: '.', not recursive)."""
    files = []
    for folder in folders:
        pattern = os.path.join(REPO, folder, '*.py')
        files += sorted(glob.glob(pattern))
    return files


@pytest.mark.parametrize('name', package_modules())
def test_every_class_and_public_function_has_a_docstring(name):
    module = importlib.import_module(name)
    missing = []
    if not (module.__doc__ or '').strip():
        missing.append('the module')
    for attribute, value in vars(module).items():
        if attribute.startswith('_') or getattr(value, '__module__', None) != name:
            continue  # private, or imported from elsewhere
        if inspect.isfunction(value) and not (value.__doc__ or '').strip():
            missing.append(f'{attribute}()')
        if inspect.isclass(value):
            if not (value.__doc__ or '').strip():  # a class's own docstring: __doc__ is not inherited
                missing.append(attribute)
            for method_name, method in vars(value).items():
                if method_name.startswith('_') or not inspect.isfunction(method):
                    continue
                # inspect.getdoc falls back to the overridden method's docstring (forward, error, ...).
                if not (inspect.getdoc(getattr(value, method_name)) or '').strip():
                    missing.append(f'{attribute}.{method_name}()')
    assert not missing, f'{name}: no docstring for {", ".join(missing)}'


def imported_modules(path):
    """The absolute module names a file imports, at the top or inside functions."""
    names = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize('path', python_files('models'), ids=os.path.basename)
def test_models_import_nothing_from_common_or_the_scripts(path):
    # models/ is what a notebook imports to load a checkpoint: it must not drag in data loading, W&B, the CLI...
    forbidden = [name for name in imported_modules(path)
                 if name.split('.')[0] in ('common', 'bench', 'examples', 'tests', *SCRIPTS)]
    assert not forbidden, f'{os.path.relpath(path, REPO)} imports {forbidden}'


def script_parsers():
    """{script: its parser} for every script at the repo root with a build_parser()."""
    parsers = {}
    for script in SCRIPTS:
        source = open(os.path.join(REPO, f'{script}.py')).read()
        if 'def build_parser' in source:
            parsers[script] = importlib.import_module(script).build_parser()
    return parsers


def test_every_script_has_the_same_skeleton():
    parsers = script_parsers()
    assert {'main', 'train_pixelcnn_vqvae', 'train_pixelcnn_vqvae2', 'generate_samples_pixelcnn_vqvae',
            'generate_samples_pixelcnn_vqvae2'} <= set(parsers)
    for script in parsers:
        module = importlib.import_module(script)
        source = open(os.path.join(REPO, f'{script}.py')).read()
        assert 'Example' in module.__doc__ and f'python {script}.py' in module.__doc__, script
        assert list(inspect.signature(module.main).parameters) == ['args'], script
        assert "if __name__ == '__main__':" in source and 'run_main(main, ' in source, script


@pytest.mark.parametrize('script', ['main', 'train_pixelcnn_vqvae', 'train_pixelcnn_vqvae2',
                                    'generate_samples_pixelcnn_vqvae', 'generate_samples_pixelcnn_vqvae2'])
def test_every_flag_that_takes_a_value_states_its_default(script):
    parser = importlib.import_module(script).build_parser()
    silent = [action.option_strings[0] for action in parser._actions
              if not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)) and not action.required
              and '(default' not in (action.help or '')]
    assert not silent, f'{script}: the help of {", ".join(silent)} does not state the default'


@pytest.mark.parametrize('path', python_files('.', 'models', 'common', 'bench', 'examples'),
                         ids=lambda path: os.path.relpath(path, REPO))
def test_every_torch_load_is_weights_only(path):
    # A checkpoint or cache file is data; torch.load without weights_only=True would run whatever its pickle says.
    unsafe = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'load' \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == 'torch':
            if not any(k.arg == 'weights_only' and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords):
                unsafe.append(node.lineno)
    assert not unsafe, f'{os.path.relpath(path, REPO)}: torch.load without weights_only=True at lines {unsafe}'
