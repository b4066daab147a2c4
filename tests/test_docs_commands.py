"""Every command in README.md and docs/*.md runs as written.

The commands are taken from the shell blocks (fenced, no language or sh/bash/shell/console; backslash
continuations joined, comments dropped) and from inline code that starts like a command (`python -m ...`,
`make ...`, `launch/...`, ...); inline code that is one repository path (`ds_configs/zero2.json`) names a file
that must exist. Each command is checked against what it calls, cheaply:
  - `python -m MODULE ...` (and `cid-ds-*`, `python FILE.py`, `bench/FILE.py`): the module's own `--help`, run
    here (DS_ACCELERATOR=cpu, one process for all of them), lists every flag the command uses; a module from
    outside the project only has to exist;
  - `deepspeed [FLAGS] (--module M | SCRIPT) ...`: DeepSpeed's runner's `--help` lists FLAGS, and M's or SCRIPT's
    own help the flags after it;
  - `make TARGET`: `make -n TARGET` accepts it;
  - `launch/X`, `bench/X`, `ds_configs/...` and the other repository paths named exist (`<x>` matches anything);
    a shell script named is executable and `bash -n` reads it;
  - `key=value` overrides of an experiment YAML name keys of cid_ds.config.Config;
  - `NAME=value` settings (before a command, `export`, `docker -e`) name a variable the project's code reads;
  - `sbatch`, `scancel`, `scontrol`, `docker SUB`, `tensorboard`: their `--help` lists the flags (and the
    scontrol subcommand); `docker run` starts an image that a documented `docker build -t` makes, and a
    `--build-arg` is an ARG of the Dockerfile.
Blocks in another language: python parses and imports modules that exist, yaml names repository paths that exist,
a dockerfile starts FROM a documented image. A tool that is not installed here (SLURM, docker, clip_benchmark) leaves its flags unchecked: that command is
skipped, with the reason, after its paths were checked. Placeholders are the capitalised words (CONFIG,
HOSTFILE, JOB), `...`, `[optional parts]` (their flags are checked) and `<x>`.
"""
from __future__ import annotations

import ast
import atexit
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from tests.helpers import REPO_ROOT

DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console"}
PROJECT_PACKAGES = ("cid_ds", "data_tools", "launch", "bench", "tests")
REPO_DIRS = ("cid_ds/", "data_tools/", "launch/", "bench/", "ds_configs/", "tests/", "docs/")
PYTHONS = {"python", "python3", ".venv/bin/python"}
SLURM_TOOLS = {"sbatch", "scancel", "scontrol", "srun", "squeue", "sinfo"}
COMMANDS = PYTHONS | SLURM_TOOLS | {"make", "deepspeed", "docker", "tensorboard", "bash", "source", "export",
                                    "clip_benchmark"}
EXTERNAL_TOOLS = {"clip_benchmark"}  # documented, not installed by the project
# commands taking an experiment YAML and then key=value overrides of it
TAKES_OVERRIDES = {"launch/single_node.sh", "launch/multi_node.sh", "launch/slurm.sbatch", "launch.ablate",
                   "launch.train", "docker run"}
GENERIC_VARIABLES = {"HOME", "PATH", "TMPDIR"}
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)=")
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=")
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
INLINE_COMMAND = re.compile(r"^(python3? |\.venv/bin/python |deepspeed |make |sbatch |srun |scancel |scontrol |docker "
                            r"|tensorboard |bash |cid-ds-|launch/\S+ |bench/\S+ |[A-Z_]+=\S+ (?:python|deepspeed|"
                            r"sbatch|launch/|bench/|make))")


# ---------------------------------------------------------------- finding the commands

def fenced_blocks(doc: str):
    """(language, first line number, lines) of every fenced block of ``doc``."""
    block, language, start = None, "", 0
    for number, line in enumerate(open(os.path.join(REPO_ROOT, doc)).read().splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and block is None:
            block, language, start = [], fence.group(1), number + 1
        elif fence:
            yield language, start, block
            block = None
        elif block is not None:
            block.append(line)


def shell_commands(lines: list[str], start: int):
    """(line number, command) of a shell block: continuations joined, comment lines dropped."""
    i = 0
    while i < len(lines):
        number, line = start + i, lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if line and not line.startswith("#"):
            yield number, line


def inline_spans(doc: str):
    """(line number, code) of the inline code outside fenced blocks."""
    inside = False
    for number, line in enumerate(open(os.path.join(REPO_ROOT, doc)).read().splitlines(), 1):
        if re.match(r"^\s*```", line):
            inside = not inside
            continue
        if not inside:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span.strip()


def collect():
    commands, paths, blocks = [], [], []
    for doc in DOCS:
        for language, start, lines in fenced_blocks(doc):
            if language in SHELL_LANGUAGES:
                commands += [(f"{doc}:{n}", c) for n, c in shell_commands(lines, start)]
            else:
                blocks.append((f"{doc}:{start}", language, "\n".join(lines)))
        for number, span in inline_spans(doc):
            if " " in span and INLINE_COMMAND.match(span + " "):
                commands.append((f"{doc}:{number}", span))
            elif " " not in span and span.startswith(REPO_DIRS):
                paths.append((f"{doc}:{number}", span))
    return commands, paths, blocks


COMMANDS_FOUND, PATHS_FOUND, OTHER_BLOCKS = collect()


# ---------------------------------------------------------------- what the commands call

def repo_path_exists(path: str) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", path).replace("...", "*")
    return bool(glob.glob(os.path.join(REPO_ROOT, pattern)))


def is_placeholder(token: str) -> bool:
    return token in ("...", "k=v") or token.startswith("$") or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", token))


def tokens_of(command: str) -> tuple[list[list[str]], list[str]]:
    """The simple commands of ``command`` (split at ;, &&, ||, |) and those inside $(...)."""
    inner = SUBSTITUTION.findall(command)
    try:
        words = [w.strip("[]") for w in shlex.split(SUBSTITUTION.sub("$SUBST", command), comments=True)]
    except ValueError:  # not shell (a listing in a block without a language): the test names it
        return [], inner
    parts, current = [], []
    for word in words:
        if word in (";", "&&", "||", "|"):
            parts.append(current)
            current = []
        elif word:
            current.append(word)
    return [p for p in parts + [current] if p], inner


HELPER = r"""
import contextlib, io, json, runpy, sys, dataclasses, typing
targets, out = json.loads(sys.argv[1]), sys.argv[2]
helps = {}
for kind, name in targets:
    text = io.StringIO()
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(name, run_name="__main__")
    except SystemExit:
        pass
    except BaseException as e:
        text.write(f"\nHELP FAILED: {type(e).__name__}: {e}")
    helps[name] = text.getvalue()
from cid_ds.config import Config
def keys_of(node, prefix=""):
    for f in dataclasses.fields(node):
        yield prefix + f.name
        kind = typing.get_type_hints(node)[f.name]
        if dataclasses.is_dataclass(kind):
            yield from keys_of(kind, prefix + f.name + ".")
json.dump({"helps": helps, "config_keys": sorted(keys_of(Config))}, open(out, "w"))
"""


def python_target(words: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, module or script, its arguments) of a Python invocation, or None."""
    head, rest = words[0], words[1:]
    if head in PYTHONS:
        if rest[:1] == ["-m"] and len(rest) > 1:
            return "module", rest[1], rest[2:]
        if rest and rest[0].endswith(".py"):
            return "script", rest[0], rest[1:]
        return None
    if head.startswith("cid-ds-"):
        pyproject = open(os.path.join(REPO_ROOT, "pyproject.toml")).read()
        scripts = re.findall(r'^(cid-ds-[\w-]+) = "([\w.]+):main"', pyproject, re.M)
        module = dict(scripts).get(head)
        return ("module", module, rest) if module else ("missing", head, rest)
    if head.endswith(".py") and head.startswith(("launch/", "bench/")):
        return "script", head, rest
    return None


def wrapped(target: tuple[str, str, list[str]] | None) -> tuple[tuple[str, str, list[str]] | None, list[str]]:
    """A wrapper's own invocation and the command it runs after ``--`` (data_tools.spread, launch.supervise)."""
    if target and "--" in target[2]:
        split = target[2].index("--")
        return (target[0], target[1], target[2][:split]), target[2][split + 1:]
    return target, []


def deepspeed_split(rest: list[str]) -> tuple[list[str], tuple[str, str, list[str]] | None]:
    """DeepSpeed's own arguments, and what it starts: (kind, module or script, its arguments)."""
    for i, word in enumerate(rest):
        if word == "--module" and i + 1 < len(rest):
            return rest[:i + 1], ("module", rest[i + 1], rest[i + 2:])
        if word.endswith(".py"):
            return rest[:i], ("script", word, rest[i + 1:])
    return rest, None


def every_python_target():
    """What the --help helper must run for every command found."""
    targets = set()

    def visit(words: list[str]):
        if not words:
            return
        target, inner = wrapped(python_target(words))
        visit(inner)
        if words[0] == "deepspeed":
            targets.add(("module", "deepspeed.launcher.runner"))
            target = deepspeed_split(words[1:])[1]
        if words[0] == "docker" and words[1:2] == ["exec"]:
            positional = [w for w in words[2:] if not w.startswith("-")]
            if len(positional) > 1:
                visit(words[words.index(positional[0]) + 1:])
        if target and target[0] != "missing" and not is_placeholder(target[1]) and is_project(target[1]):
            targets.add(target[:2])
            if target[1] == "launch.supervise" and "--" in target[2]:
                visit(target[2][target[2].index("--") + 1:])

    for _, command in COMMANDS_FOUND:
        parts, inner = tokens_of(command)
        for words in parts + [tokens_of(c)[0][0] for c in inner if tokens_of(c)[0]]:
            if strip_assignments(words) and not ASSIGNMENT.match(strip_assignments(words)[0]):
                visit(strip_assignments(words))
    return sorted(targets)


def is_project(name: str) -> bool:
    return name.replace("/", ".").split(".")[0] in PROJECT_PACKAGES


def strip_assignments(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) - 1 and ASSIGNMENT.match(words[i]):
        i += 1
    return words[i:]


def overrides(words: list[str], target) -> list[str]:
    """The key=value overrides of an experiment YAML in ``words``."""
    called = target[1] if target else words[0]
    if words[0] == "sbatch":
        called = next((w for w in words[1:] if w.endswith(".sbatch")), "sbatch")
    if words[0] == "docker" and words[1:2] == ["run"]:
        called, image = "docker run", documented_images()
        words = words[next((i for i, w in enumerate(words) if w in image), len(words)):]
    if called not in TAKES_OVERRIDES:
        return []
    return [m.group(1) for m in map(OVERRIDE.match, words) if m and m.group(0) != "k="]


@functools.cache
def documented_images() -> frozenset[str]:
    images = set()
    for _, command in COMMANDS_FOUND:
        for words in tokens_of(command)[0]:
            if words[:2] == ["docker", "build"] and "-t" in words:
                images.add(words[words.index("-t") + 1])
    return frozenset(images)


@pytest.fixture(scope="session")
def python_helps(tmp_path_factory) -> dict:
    targets = every_python_target()
    out = str(tmp_path_factory.mktemp("helps") / "helps.json")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", HELPER, json.dumps(targets), out], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.load(open(out))


@functools.cache
def listed_flags(help_text: str) -> frozenset[str]:
    """The flags a --help defines: those of its usage lines and of the definition column of its option lines
    (not the prose, which may quote another command's flags)."""
    flags, in_usage = set(), False
    for line in help_text.splitlines():
        in_usage = bool(re.match(r"^\s*usage:", line, re.I)) or (in_usage and bool(line.strip()))
        definition = re.match(r"^\s*(-.*?)(?:\s{2,}|$)", line)
        if in_usage:
            flags.update(FLAG.findall(line))
        elif definition:
            flags.update(FLAG.findall(definition.group(1)))
    return frozenset(flags)


@functools.cache
def slurm_conf() -> str:
    """A configuration the SLURM commands read before printing their --help (they need one to start)."""
    folder = tempfile.mkdtemp(prefix="docs_slurm_")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "slurm.conf")
    with open(path, "w") as f:
        f.write("ClusterName=docs\nSlurmctldHost=localhost\n")
    return path


@functools.cache
def tool_help(*command: str) -> str | None:
    """``command --help``, or None where the tool is not installed here."""
    if shutil.which(command[0]) is None:
        return None
    env = dict(os.environ)
    if command[0] in SLURM_TOOLS and "SLURM_CONF" not in env and not os.path.exists("/etc/slurm/slurm.conf"):
        env["SLURM_CONF"] = slurm_conf()
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, env=env)
    return done.stdout + done.stderr


@functools.cache
def variables_read() -> str:
    """The text of the project's code, in which a documented variable must appear."""
    files = [p for d in ("cid_ds", "data_tools", "launch") for p in glob.glob(os.path.join(REPO_ROOT, d, "**", "*"),
                                                                          recursive=True) if os.path.isfile(p)]
    files += [os.path.join(REPO_ROOT, f) for f in ("Makefile", "Dockerfile")]
    return "\n".join(open(p, errors="replace").read() for p in files if not p.endswith((".pyc", ".so")))


@functools.cache
def make_dry_run(target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@functools.cache
def bash_syntax(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n", path], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- the checks

class Check:
    def __init__(self, where: str, command: str, helps: dict):
        self.where, self.command, self.helps = where, command, helps
        self.problems: list[str] = []
        self.unchecked: list[str] = []

    def fail(self, problem: str) -> None:
        self.problems.append(problem)

    def flags_listed(self, words: list[str], help_text: str | None, what: str) -> None:
        if help_text is None:
            self.unchecked.append(f"{what} is not installed here: its flags are not checked")
            return
        listed = listed_flags(help_text)
        for word in words:
            if word.startswith("-") and word != "--" and FLAG.fullmatch(word.split("=")[0]):
                if word.split("=")[0] not in listed:
                    self.fail(f"{what} has no flag {word.split('=')[0]}")

    def paths(self, words: list[str]) -> None:
        for word in words:
            for value in (word, word.split("=", 1)[-1]):
                if value.startswith(REPO_DIRS) and not repo_path_exists(value):
                    self.fail(f"no such file in the repository: {value}")

    def variable(self, name: str) -> None:
        if name not in GENERIC_VARIABLES and not re.search(rf"\b{name}\b", variables_read()):
            self.fail(f"{name}: no code of the project reads this variable")

    def python(self, kind: str, name: str, args: list[str]) -> None:
        if kind == "missing":
            self.fail(f"{name} is not a script of pyproject.toml")
            return
        if is_placeholder(name):
            return
        if kind == "script" and not repo_path_exists(name):
            self.fail(f"no such file in the repository: {name}")
            return
        if not is_project(name):
            if importlib.util.find_spec(name.split(".")[0]) is None:
                self.fail(f"python module {name} is not installed")
            return
        text = self.helps["helps"].get(name, "")
        if "HELP FAILED" in text or "usage:" not in text:
            self.fail(f"`{name} --help` did not print a usage: {text[-500:]}")
            return
        if name == "launch.supervise" and "--" in args:
            self.flags_listed(args[:args.index("--")], text, name)
            self.simple(args[args.index("--") + 1:])
        else:
            self.flags_listed(args, text, name)

    def simple(self, words: list[str]) -> None:
        words = [w for w in words if w]
        if all(ASSIGNMENT.match(w) for w in words):
            return  # shell variables (JOB=$(sbatch ...)), not settings of a command
        for word in words:
            if not ASSIGNMENT.match(word):
                break
            self.variable(ASSIGNMENT.match(word).group(1))
        words = strip_assignments(words)
        target, inner = wrapped(python_target(words))
        if inner:
            self.simple(inner)
            words = words[:len(words) - len(inner) - 1]
        head = words[0]
        self.paths(words)
        for key in overrides(words, target):
            if key not in self.helps["config_keys"]:
                self.fail(f"override {key}=...: no such key in the experiment YAML (cid_ds/config.py)")
        if target:
            self.python(*target)
        elif head == "export":
            for word in words[1:]:
                if ASSIGNMENT.match(word):
                    self.variable(ASSIGNMENT.match(word).group(1))
        elif head == "source":
            if not os.path.exists(os.path.join(REPO_ROOT, words[1])):
                self.fail(f"no such file: {words[1]} (run `make setup` first?)")
        elif head == "make":
            for target_name in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
                done = make_dry_run(target_name)
                if done.returncode != 0:
                    self.fail(f"make {target_name}: {done.stderr.strip()[-300:]}")
        elif head == "bash":
            self.script(next((w for w in words[1:] if not w.startswith("-")), ""))
        elif head.startswith(("launch/", "bench/")):
            self.script(head)
        elif head == "deepspeed":
            own, started = deepspeed_split(words[1:])
            self.flags_listed(own, self.helps["helps"].get("deepspeed.launcher.runner"), "deepspeed")
            if started:
                self.python(*started)
        elif head == "sbatch":
            self.sbatch(words)
        elif head in SLURM_TOOLS:
            help_text = tool_help(head)
            self.flags_listed(words[1:], help_text, head)
            subcommand = next((w for w in words[1:] if not w.startswith("-")), None)
            if head == "scontrol" and help_text is not None and subcommand and \
                    not re.search(rf"\b{subcommand}\b", help_text):
                self.fail(f"scontrol has no command {subcommand}")
        elif head == "docker":
            self.docker(words)
        elif head == "tensorboard":
            self.flags_listed(words[1:], tool_help("tensorboard"), "tensorboard")
        elif head in EXTERNAL_TOOLS:
            if shutil.which(head) is None:
                self.unchecked.append(f"{head} (not a dependency of the project) is not installed here")
            else:
                self.flags_listed(words[1:], tool_help(head, *words[1:2]), head)
        else:
            self.fail(f"`{head}`: no check for this command (tests/test_docs_commands.py)")

    def script(self, path: str) -> None:
        full = os.path.join(REPO_ROOT, path)
        if not os.path.isfile(full):
            self.fail(f"no such file in the repository: {path}")
        elif not path.endswith(".py"):
            if not os.access(full, os.X_OK) and not path.endswith(".sbatch"):
                self.fail(f"{path} is not executable")
            done = bash_syntax(path)
            if done.returncode != 0:
                self.fail(f"bash -n {path}: {done.stderr.strip()}")

    def sbatch(self, words: list[str]) -> None:
        help_text = tool_help("sbatch")
        script_at = next((i for i, w in enumerate(words[1:], 1) if not w.startswith("-")), None)
        if help_text is not None and script_at is not None:
            takes_value = set(re.findall(r"(--[\w-]+)=", help_text)) | set(re.findall(r"(-\w), --[\w-]+=", help_text))
            while script_at is not None and words[script_at - 1] in takes_value:  # `--nodes 4`: 4 is a value
                script_at = next((i for i, w in enumerate(words[script_at + 1:], script_at + 1)
                                  if not w.startswith("-")), None)
        self.flags_listed(words[1:script_at], help_text, "sbatch")
        if script_at is None:
            self.fail("sbatch without a script")
            return
        script = words[script_at]
        if not is_placeholder(script):
            self.script(script)

    def docker(self, words: list[str]) -> None:
        subcommand = words[1] if len(words) > 1 else ""
        help_text = tool_help("docker", subcommand)
        images = documented_images()
        if help_text is not None and f"docker {subcommand}" not in help_text:
            self.fail(f"docker has no command {subcommand}")
        takes_value = set()
        if help_text is not None:
            for short, long, kind in re.findall(r"^\s+(?:(-\w), )?(--[\w-]+)(?: (\w+))?", help_text, re.M):
                if kind:
                    takes_value.update({long, short} - {""})
        options, rest, i = [], [], 2
        while i < len(words):
            if words[i].startswith("-"):
                options.append(words[i])
                if words[i] in takes_value:
                    i += 1
                    if i < len(words) and words[i - 1] in ("-e", "--env") and ASSIGNMENT.match(words[i]):
                        self.variable(ASSIGNMENT.match(words[i]).group(1))
                    if i < len(words) and words[i - 1] == "--build-arg":
                        arg = words[i].split("=")[0]
                        if not re.search(rf"^ARG {arg}\b", open(os.path.join(REPO_ROOT, "Dockerfile")).read(), re.M):
                            self.fail(f"--build-arg {arg}: the Dockerfile has no ARG {arg}")
                i += 1
            else:
                rest = words[i:]
                break
        self.flags_listed(options, help_text, f"docker {subcommand}")
        if subcommand == "build":
            if not rest or not os.path.isfile(os.path.join(REPO_ROOT, rest[0], "Dockerfile")):
                self.fail("docker build: no Dockerfile in its context")
        elif subcommand == "run":
            if not rest or rest[0] not in images:
                self.fail(f"docker run: image {rest[:1]} is not one a documented `docker build -t` makes "
                          f"({sorted(images)})")
            self.script("launch/docker_entrypoint.sh")
        elif subcommand == "exec" and len(rest) > 1:
            self.simple(rest[1:])


@pytest.mark.parametrize("where,command", COMMANDS_FOUND, ids=[w for w, _ in COMMANDS_FOUND])
def test_a_documented_command_calls_what_exists_with_flags_it_takes(where, command, python_helps):
    check = Check(where, command, python_helps)
    parts, inner = tokens_of(command)
    assert parts, f"{where}: `{command}` does not read as a shell command (a listing? give its block a language)"
    for words in parts:
        check.simple(words)
    for substituted in inner:
        for words in tokens_of(substituted)[0]:
            head = strip_assignments(words)[0]
            if head in COMMANDS or head.startswith(("launch/", "bench/")):  # not `id -u` and the like
                check.simple(words)
    assert not check.problems, f"{where}: `{command}`:\n  " + "\n  ".join(check.problems)
    if check.unchecked:
        pytest.skip("; ".join(check.unchecked))


@pytest.mark.parametrize("where,path", PATHS_FOUND, ids=[w for w, _ in PATHS_FOUND])
def test_a_documented_repository_path_exists(where, path):
    assert repo_path_exists(path), f"{where}: {path} is not in the repository"


@pytest.mark.parametrize("where,language,text", OTHER_BLOCKS, ids=[w for w, _, _ in OTHER_BLOCKS])
def test_a_documented_block_in_another_language_reads(where, language, text):
    if language == "python":
        for node in ast.walk(ast.parse(text, where)):
            for alias in node.names if isinstance(node, ast.Import) else []:
                assert importlib.util.find_spec(alias.name.split(".")[0]), f"{where}: no module {alias.name}"
    elif language == "yaml":
        values = []

        def walk(node):
            if isinstance(node, dict):
                list(map(walk, node.values()))
            elif isinstance(node, list):
                list(map(walk, node))
            elif isinstance(node, str):
                values.append(node)
        walk(yaml.safe_load(text))
        for value in values:
            assert not value.startswith(REPO_DIRS) or repo_path_exists(value), f"{where}: no such file {value}"
    elif language == "dockerfile":
        image = re.search(r"^\s*FROM (\S+)", text, re.M).group(1)
        assert image in documented_images(), f"{where}: FROM {image}: no documented `docker build -t` makes it"


def test_the_docs_have_commands_and_the_extraction_finds_the_known_ones():
    """The extraction itself: a change that finds nothing would pass every check above."""
    found = {c for _, c in COMMANDS_FOUND}
    assert len(COMMANDS_FOUND) > 30
    assert any(c.startswith("sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sbatch") for c in found)
    assert any("--pretrained /ckpt/teacher.pt --student ViT-B-16" in c for c in found)  # a joined continuation
    assert "make demo" in found and not any(c.startswith("cid_ds/") for c in found)


def test_a_wrong_flag_a_missing_file_and_a_wrong_key_are_found(python_helps):
    """The checks fail where they should: on a made-up flag, script, target, key and variable."""
    wrong = {"python -m data_tools.prepare --shards x --nodse 4": "has no flag --nodse",
             "launch/multi_node.sh launch/hostfile ds_configs/experiments/x.yaml": "launch/hostfile",
             "make no-such-target": "make no-such-target",
             "deepspeed --num_gpus 8 -m data_tools.extract": "has no flag -m",
             "launch/single_node.sh CONFIG optim.learning_rate=1": "no such key",
             "CID_RANK_PER_NODE=2 sbatch launch/slurm.sbatch CONFIG": "CID_RANK_PER_NODE"}
    for command, problem in wrong.items():
        check = Check("test", command, python_helps)
        for words in tokens_of(command)[0]:
            check.simple(words)
        assert any(problem in p for p in check.problems), (command, check.problems)
