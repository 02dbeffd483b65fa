"""The docs say what the code does: their examples run, their commands parse, their links and names exist.

Every fenced ```python and ```bash block of README.md, QUICKSTART_PIXELCNN.md and PIXELCNN_PRIOR_README.md has a
marker on the line just above it:

    <!-- doc-test: run -->             run it: python in this process, bash in a subprocess
    <!-- doc-test: run continue -->    python: run it with the names the doc's previous python block left
    <!-- doc-test: skip (reason) -->   do not run it (needs a GPU, downloads, trains for long, ...)

Blocks run in a scratch copy of the repo (its files linked) where the `workspace` fixture has trained tiny models with
the real scripts at the paths the docs use. Skipped blocks are still checked: every command that runs a script of
this repo is parsed by that script's own parser, so a renamed or removed flag fails here, and python is compiled with
its imports resolved. A block without a marker fails, so a new example cannot escape.
"""
import ast
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shlex
import subprocess

import pytest
import torch

from helpers import REPO, assert_succeeded, finish, run_in_process, run_ok, script_env

DOCS = ('README.md', 'QUICKSTART_PIXELCNN.md', 'PIXELCNN_PRIOR_README.md')
MAX_REFERENCE_LINES = 700
MARKER = re.compile(r'^<!-- doc-test: (run|run continue|skip \((.+)\)) -->$')
FENCE = re.compile(r'^(\s*)```(\S*)\s*$')
# Fence languages that would hide a python or shell example from the markers: write python or bash instead.
DISGUISED = {'py', 'python3', 'pycon', 'sh', 'shell', 'console', 'zsh', 'shell-session'}
TORCHRUN_FLAGS = {'--nproc_per_node', '--nnodes', '--node_rank', '--master_addr', '--master_port'}
LEVELS = ('flat', 'top', 'bottom')

# The docs' paths (relative to the workspace) -> the session fixture run whose files stand there (conftest.py):
# (fixture, run name). The session has no unconditional VQ-VAE-2 prior: PRIOR trains one in the workspace.
SESSION_RUNS = {
    'runs/vq_vae2': ('stage1', 'vq_vae2'),
    'runs/cifar10/vq_vae': ('stage1', 'vq_vae'),
    'runs/cifar10/prior': ('priors', 'hierarchical'),  # class-conditional, on runs/vq_vae2
    'runs/cifar10/prior_vqvae': ('priors', 'flat'),
    'runs/cifar10/samples': ('samples', 'hierarchical'),  # codes.pt of runs/cifar10/prior
}
# Two steps of an unconditional prior on the session's VQ-VAE-2 (whose codes the session cached already).
PRIOR = ['--hidden_channels', '8', '--num_layers', '2', '--embedding_dim', '8', '--batch_size', '16', '--epochs', '1',
         '--max_steps', '2', '--num_epoch_samples', '0', '--device', 'cpu']


# ----------------------------------------------------------------------------------------------------------------
# Reading the docs

@dataclasses.dataclass
class Block:
    """A fenced code block of a doc and its marker."""

    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str = None  # 'run', 'continue', 'skip', or None for no marker
    reason: str = None

    @property
    def name(self):
        return f'{self.doc}:{self.line}'


def read_doc(doc):
    """The text of a doc of the repo."""
    with open(os.path.join(REPO, doc)) as f:
        return f.read()


def read_blocks(doc):
    """(blocks, problems): every fenced block of `doc` with its marker, and markers that mark no block."""
    lines = read_doc(doc).splitlines()
    blocks, problems, i = [], [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if MARKER.match(lines[i].strip()) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                problems.append(f'{doc}:{i + 1}: a doc-test marker must stand just above a code block')
            i += 1
            continue
        indent, lang = fence.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == '```')
        code = '\n'.join(line[len(indent):] for line in lines[i + 1:end]) + '\n'
        block = Block(doc, i + 1, lang, code)
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        if marker:
            block.mode = {'run': 'run', 'run continue': 'continue'}.get(marker.group(1), 'skip')
            block.reason = marker.group(2)
        blocks.append(block)
        i = end + 1
    return blocks, problems


BLOCKS = [block for doc in DOCS for block in read_blocks(doc)[0]]
CODE_BLOCKS = [block for block in BLOCKS if block.lang in ('python', 'bash')]


def python_chains():
    """Runnable python blocks grouped with the `run continue` blocks that follow them, per doc."""
    chains = []
    for block in CODE_BLOCKS:
        if block.lang != 'python' or block.mode == 'skip':
            continue
        if block.mode == 'continue' and chains and chains[-1][0].doc == block.doc:
            chains[-1].append(block)
        else:
            chains.append([block])
    return chains


# ----------------------------------------------------------------------------------------------------------------
# Shell commands and the scripts' parsers

def split_commands(code):
    """Each simple command of a bash block as a token list: continuations joined, comments and redirections dropped."""
    commands = []
    for line in code.replace('\\\n', ' ').splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|<>')
        lexer.whitespace_split, lexer.commenters = True, '#'
        command, tokens = [], list(lexer)
        while tokens:
            token = tokens.pop(0)
            if token in (';', '&&', '||', '|', '&'):
                commands.append(command)
                command = []
            elif set(token) <= set('<>&'):
                tokens = tokens[1:]  # a redirection and its target
            else:
                command.append(token)
        commands.append(command)
    return [command for command in commands if command]


def script_call(tokens):
    """(script path, its arguments) if the command runs a python script of this repo, else None."""
    while tokens and re.match(r'^[A-Z_][A-Z0-9_]*=', tokens[0]):  # environment assignments
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == 'torchrun':
        scripts = [i for i, token in enumerate(tokens) if token.endswith('.py')]
        return (tokens[scripts[0]], tokens[scripts[0] + 1:]) if scripts else None
    if tokens[0] in ('python', 'python3') and len(tokens) > 1 and tokens[1].endswith('.py'):
        return tokens[1], tokens[2:]
    if tokens[0].endswith('.py') and os.path.exists(os.path.join(REPO, tokens[0])):
        return tokens[0], tokens[1:]
    return None


def python_c_code(tokens):
    """The program of a `python -c '...'` command, or None."""
    if tokens[:2] in (['python', '-c'], ['python3', '-c']) and len(tokens) > 2:
        return tokens[2]
    return None


def parser_of(script):
    """The script's own parser (build_parser) for a script in the repo root; None for the others."""
    if os.path.dirname(script):
        return None
    parser = importlib.import_module(script[:-len('.py')]).build_parser()
    parser.prog = script
    return parser


def ast_flags(script):
    """The option strings a script passes to add_argument, read from its source (for scripts without build_parser)."""
    with open(os.path.join(REPO, script)) as f:
        tree = ast.parse(f.read())
    return {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, 'attr', None) == 'add_argument'
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith('-')}


def check_arguments(script, args):
    """Problems with running `script args`, as a list of strings: unknown script, unknown flag or bad value."""
    if not os.path.isfile(os.path.join(REPO, script)):
        return [f'{script} is not a file of the repo']
    if '-h' in args or '--help' in args:
        return []
    parser = parser_of(script)
    if parser is None:
        known = ast_flags(script)
        return [f'{script} has no flag {token.split("=")[0]}' for token in args
                if token.startswith('--') and token.split('=')[0] not in known]
    if '...' in args:  # "the rest of your flags": check the flags given, not that the required ones are there
        for action in parser._actions:
            action.required = False
        kept = []
        for token in args:
            if token != '...':
                kept.append(token)
            elif kept and kept[-1] in parser._option_string_actions:  # '...' as a flag's value
                kept.append('X')
        args = kept
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(args)
    except SystemExit:
        return [f'{script} {" ".join(args)}: {stderr.getvalue().strip()}']
    return []


def all_known_flags():
    """Every option string of every script of the repo, plus torchrun's."""
    flags = set(TORCHRUN_FLAGS) | {'--help'}
    for name in os.listdir(REPO):
        if name.endswith('.py') and 'def build_parser(' in read_doc(name):
            flags |= set(parser_of(name)._option_string_actions)
    for folder in ('examples', 'bench'):
        for name in os.listdir(os.path.join(REPO, folder)):
            if name.endswith('.py'):
                flags |= ast_flags(os.path.join(folder, name))
    return flags


def check_imports(code, where):
    """Problems with a python program: a syntax error, or a `from X import Y` whose module or name does not exist."""
    try:
        tree = ast.parse(code, where)
    except SyntaxError as e:
        return [f'{where}: {e}']
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                problems.append(f'{where}: {e}')
                continue
            problems += [f'{where}: {node.module} has no {alias.name}' for alias in node.names
                         if alias.name != '*' and not hasattr(module, alias.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    importlib.import_module(alias.name)
                except ImportError as e:
                    problems.append(f'{where}: {e}')
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: a workspace with tiny checkpoints where the docs expect them, and the runnable bash blocks started early

@pytest.fixture(scope='module')
def workspace(tmp_path_factory, stage1, priors, samples):
    """A scratch folder that looks like the repo root (its files linked) with tiny runs at the docs' paths: the
    session's checkpoints, linked file by file (the folders are real, so os.walk finds their metrics.jsonl)."""
    root = tmp_path_factory.mktemp('docs')
    for name in os.listdir(REPO):
        if name not in ('runs', 'data', 'samples', 'wandb', '.git'):
            os.symlink(os.path.join(REPO, name), root / name)
    fixtures = {'stage1': stage1, 'priors': priors, 'samples': samples}
    for path, (fixture, name) in SESSION_RUNS.items():
        source = fixtures[fixture][name].out_dir
        os.makedirs(root / path)
        for entry in os.listdir(source):
            os.symlink(source / entry, root / path / entry)
    os.symlink(os.path.join('..', 'vq_vae2'), root / 'runs' / 'cifar10' / 'vq_vae2')  # the same stage-1 run
    run_ok(['train_pixelcnn_vqvae2.py', *PRIOR, '--vqvae2_checkpoint', stage1['vq_vae2'].path()],
           root / 'runs' / 'prior_vqvae2')
    return root


def in_process_commands(code):
    """The commands of a bash block as token lists if every one of them is `python script.py ...` or `python -c ...`
    with nothing for the shell to do (no pipes, redirections, variables or globs); else None."""
    commands = []
    for line in code.replace('\\\n', ' ').splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|<>()')
        lexer.whitespace_split, lexer.commenters = True, '#'
        tokens = list(lexer)
        if not tokens:
            continue
        code = python_c_code(tokens)
        if tokens[0] != 'python' or code is None and script_call(tokens) is None:
            return None
        if code is None and any(set(token) & set(';&|<>()$*?`~') for token in tokens):
            return None
        commands.append(tokens)
    return commands


def run_python_c(code, cwd):
    """`python -c code` in this process: a CompletedProcess with its stdout."""
    output, saved = io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(output):
            exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})
    finally:
        os.chdir(saved)
    return subprocess.CompletedProcess(['python', '-c', code], 0, output.getvalue(), '')


@pytest.fixture(scope='module')
def bash_runs(workspace):
    """The runnable bash blocks: {block name: Popen} for those that need a shell, all started at once (they run
    while the tests before theirs do); {block name: [commands]} for those made of python commands only, which the
    test runs in this process (helpers.run_in_process: the real scripts without importing torch again)."""
    started = {}
    for block in CODE_BLOCKS:
        if block.lang == 'bash' and block.mode == 'run':
            started[block.name] = in_process_commands(block.code) or subprocess.Popen(
                ['bash', '-e', '-o', 'pipefail', '-c', block.code], cwd=workspace, env=script_env(),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield started
    for process in started.values():
        if isinstance(process, subprocess.Popen) and process.poll() is None:
            process.kill()
            process.communicate()


# ----------------------------------------------------------------------------------------------------------------
# Markers

def test_every_python_and_bash_block_is_marked_run_or_skip():
    problems = [problem for doc in DOCS for problem in read_blocks(doc)[1]]
    for block in BLOCKS:
        if block.lang in DISGUISED:
            problems.append(f'{block.name}: a ```{block.lang} block; write ```python or ```bash, with a marker')
        elif block.lang in ('python', 'bash') and block.mode is None:
            problems.append(f'{block.name}: ```{block.lang} block without a marker: put <!-- doc-test: run --> or '
                            f'<!-- doc-test: skip (why) --> on the line above it')
        elif block.lang not in ('python', 'bash') and block.mode is not None:
            problems.append(f'{block.name}: a doc-test marker on a ```{block.lang} block, which is never run')
        elif block.mode == 'continue' and block.lang != 'python':
            problems.append(f'{block.name}: only python blocks can continue')
    for chain in python_chains():
        if chain[0].mode == 'continue':
            problems.append(f'{chain[0].name}: "run continue" without a runnable python block before it')
    assert not problems, '\n'.join(problems)


# ----------------------------------------------------------------------------------------------------------------
# Commands and flags

def doc_commands():
    """(where, tokens) for every command of every bash block, of examples/shapes_pipeline.sh, and of inline code
    spans that run a script (`python main.py ...`)."""
    commands = [(block.name, tokens) for block in CODE_BLOCKS if block.lang == 'bash'
                for tokens in split_commands(block.code)]
    commands += [('examples/shapes_pipeline.sh', tokens)
                 for tokens in split_commands(read_doc(os.path.join('examples', 'shapes_pipeline.sh')))]
    for doc in DOCS:
        for span in re.findall(r'`([^`\n]+)`', re.sub(r'```.*?```', '', read_doc(doc), flags=re.S)):
            if re.match(r'^(python|torchrun) \S+\.py', span):
                commands.append((f'{doc} `{span}`', shlex.split(span)))
    return commands


def test_every_command_of_a_script_parses_with_that_scripts_parser():
    problems, checked = [], 0
    for where, tokens in doc_commands():
        call = script_call(tokens)
        if call is not None:
            checked += 1
            problems += [f'{where}: {problem}' for problem in check_arguments(*call)]
        elif tokens[0] == 'bash' and not os.path.isfile(os.path.join(REPO, tokens[1])):
            problems.append(f'{where}: {tokens[1]} is not a file of the repo')
        elif python_c_code(tokens) is not None:
            problems += check_imports(python_c_code(tokens), where)
    assert not problems, '\n'.join(problems)
    assert checked >= 20  # the docs and the main job run the scripts in many places


def test_a_renamed_flag_would_be_caught():
    assert check_arguments('main.py', ['--epochs', '2']) == []
    assert check_arguments('main.py', ['--num_epochs', '2'])
    assert check_arguments('generate_samples_pixelcnn_vqvae2.py', ['--prior_checkpoint', 'p', '--top_p', '2'])
    assert check_arguments('examples/pixelcnn_prior_example.py', ['--vq_step', '3'])


def test_every_flag_the_docs_mention_is_a_flag_of_some_script():
    known = all_known_flags()
    unknown = {f'{doc}: --{flag}' for doc in DOCS
               for flag in re.findall(r'(?<![\w-])--([a-z][a-z0-9_]*)', read_doc(doc)) if f'--{flag}' not in known}
    assert not unknown, '\n'.join(sorted(unknown))


def test_python_blocks_compile_and_their_imports_resolve():
    problems = [problem for block in CODE_BLOCKS if block.lang == 'python'
                for problem in check_imports(block.code, block.name)]
    assert not problems, '\n'.join(problems)


def test_the_quickstart_quotes_the_main_job_as_the_script_runs_it():
    script = [' '.join(tokens).replace('$OUT', 'runs/shapes')
              for tokens in split_commands(read_doc(os.path.join('examples', 'shapes_pipeline.sh')))
              if tokens[0] == 'python' and tokens[1] != '-m']
    quoted = [[' '.join(tokens) for tokens in split_commands(block.code)]
              for block in CODE_BLOCKS if block.doc == 'QUICKSTART_PIXELCNN.md' and block.lang == 'bash']
    assert len(script) == 4 and script in quoted, 'QUICKSTART_PIXELCNN.md must quote these commands of ' \
        'examples/shapes_pipeline.sh in one bash block:\n' + '\n'.join(script)


# ----------------------------------------------------------------------------------------------------------------
# Running the examples

@pytest.mark.parametrize('chain', python_chains(), ids=lambda chain: chain[0].name)
def test_runnable_python_blocks_run(chain, workspace, bash_runs):
    namespace, cwd = {'__name__': '__doc_example__'}, os.getcwd()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.chdir(workspace)
    try:
        for block in chain:
            exec(compile(block.code, block.name, 'exec'), namespace)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.mark.parametrize('block', [block for block in CODE_BLOCKS if block.lang == 'bash' and block.mode == 'run'],
                         ids=lambda block: block.name)
def test_runnable_bash_blocks_run(block, bash_runs, workspace):
    run = bash_runs[block.name]
    if isinstance(run, subprocess.Popen):
        results = [finish(run, timeout=300)]
    else:  # python commands only: each in this process, in order, stopping at the first failure as bash -e would
        results = []
        for tokens in run:
            code = python_c_code(tokens)
            results.append(run_python_c(code, workspace) if code is not None
                           else run_in_process(tokens[1:], cwd=workspace, env=script_env()))
            if results[-1].returncode != 0 or 'Traceback' in results[-1].stderr:
                break
    for result in results:
        assert result.returncode == 0, f'{block.code}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}'
        assert_succeeded(result)


def test_metric_names_in_the_docs_are_the_ones_the_scripts_write(workspace):
    written = set()
    for folder, _, files in os.walk(workspace / 'runs'):
        if 'metrics.jsonl' in files:
            with open(os.path.join(folder, 'metrics.jsonl')) as f:
                written |= {key for line in f for key in json.loads(line)}
    sources = ''.join(read_doc(os.path.join('common', name)) for name in os.listdir(os.path.join(REPO, 'common'))
                      if name.endswith('.py'))
    problems = []
    for doc in DOCS:
        for name in set(re.findall(r'`((?:train|val)/[a-z_/<>]+)`', read_doc(doc))):
            if '<metric>' in name:
                continue
            if '<level>' in name:  # some level of it is written, or W&B logs it under a prefix the code names
                if not any(name.replace('<level>', level) in written for level in LEVELS) \
                        and f"'{name.split('<level>')[0]}" not in sources:
                    problems.append(f'{doc}: {name}')
            elif name not in written and f"'{name}'" not in sources:
                problems.append(f'{doc}: {name}')
    assert not problems, 'names no script writes:\n' + '\n'.join(problems)


# ----------------------------------------------------------------------------------------------------------------
# The shape of the docs

MAIN_JOB = 'bash examples/shapes_pipeline.sh'
TESTS = 'python -m pip install -q -r requirements.txt pytest && python -m pytest -q tests'


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first = next(block for block in CODE_BLOCKS if block.doc == 'README.md')
    assert first.code.splitlines() == [
        MAIN_JOB + ' ' * 46 + '# main job: stages 1-3 on built-in data',
        TESTS + '   # the tests',
    ]
    assert TESTS in read_doc(os.path.join('.ci', 'run')).splitlines()


def test_the_reference_is_short_and_copies_nothing_from_the_readme():
    reference = read_doc('PIXELCNN_PRIOR_README.md').splitlines()
    assert len(reference) <= MAX_REFERENCE_LINES
    readme = {line.strip() for line in read_doc('README.md').splitlines() if len(line.strip()) >= 40}
    copied = [line for line in reference if line.strip() in readme]
    assert not copied, '\n'.join(copied)


def heading_anchors(doc):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2, ... for repeats."""
    anchors = set()
    text = re.sub(r'```.*?```', '', read_doc(doc), flags=re.S)
    for heading in re.findall(r'^#+ (.+)$', text, flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-')
        anchor, count = slug, 0
        while anchor in anchors:
            count += 1
            anchor = f'{slug}-{count}'
        anchors.add(anchor)
    return anchors


def test_links_and_pictures_between_the_docs_resolve():
    problems = []
    for doc in DOCS:
        for target in re.findall(r'\]\(([^)\s]+)\)', read_doc(doc)):
            if re.match(r'^[a-z]+://', target):
                continue
            path, _, anchor = target.partition('#')
            path = path or doc
            if not os.path.exists(os.path.join(REPO, path)):
                problems.append(f'{doc}: {target}: no such file')
            elif anchor and anchor not in heading_anchors(path):
                problems.append(f'{doc}: {target}: no such heading in {path}')
    assert not problems, '\n'.join(problems)
