"""A stage's settings, declared once: a dataclass whose fields are its flags, each with its default, its help and
how argparse reads it (``flag``). The stage's command line is made from it (``add_flags``) and read back into it
(``parse_options``); ``run_stage`` is the command-line ending every stage shares."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from typing import Any, Callable, Iterator, Optional, TypeVar

from cid_ds.config import expand_shards
from cid_ds.io import check_writable
from data_tools.spread import Share, accept_local_rank, keep_own_gpu, share_from_env

Options = TypeVar("Options")
Result = TypeVar("Result")


def flag(default: Any = dataclasses.MISSING, help: Optional[str] = None, *, names: tuple[str, ...] = (),
         group: Optional[str] = None, parse: Optional[Callable[[Any], Any]] = None, **how: Any) -> Any:
    """A field that is the flag ``--<name>`` (``names``: its spellings instead), required when it has no default.
    ``how``: argparse's keywords for it (type, nargs, choices, action, metavar); a bool is a store_true flag and
    an int or float default gives the type. Flags of one ``group`` exclude each other. ``parse``: what makes the
    field's value of the flag's, raising ValueError on a value it refuses."""
    return dataclasses.field(default=default, metadata={"help": help, "names": names, "group": group,
                                                        "parse": parse, "argparse": how})


def borrowed(options_type: type, name: str, help: Optional[str] = None) -> Any:
    """``options_type``'s flag ``name`` (its default, how it is read) in another command, with that command's
    ``help`` (None: the same help)."""
    source = next(field for field in dataclasses.fields(options_type) if field.name == name)
    return dataclasses.field(default=source.default,
                             metadata={**source.metadata, "help": source.metadata["help"] if help is None else help})


def shard_paths(pattern: str) -> list[str]:
    """The shards a ``--shards`` brace pattern or glob names; none is refused."""
    shards = expand_shards(pattern)
    if not shards:
        raise ValueError(f"--shards {pattern!r} matches no file")
    return shards


def add_flags(parser: argparse.ArgumentParser, options_type: type) -> None:
    """Every field of ``options_type`` as its flag, in field order."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in dataclasses.fields(options_type):
        meta = field.metadata
        how = dict(meta["argparse"])
        if field.default is dataclasses.MISSING:
            how["required"] = True
        else:
            how["default"] = field.default
            if isinstance(field.default, bool):
                how.setdefault("action", "store_true")
            elif isinstance(field.default, (int, float)):
                how.setdefault("type", type(field.default))
        if meta["group"] is not None and meta["group"] not in groups:
            groups[meta["group"]] = parser.add_mutually_exclusive_group()
        into = parser if meta["group"] is None else groups[meta["group"]]
        into.add_argument(*(meta["names"] or [f"--{field.name.replace('_', '-')}"]), dest=field.name,
                          help=meta["help"], **how)


def parse_options(options_type: type[Options], name: str, doc: str, argv: Optional[list[str]] = None,
                  epilog: Optional[str] = None) -> Options:
    """The options ``argv`` gives ``python -m data_tools.<name>`` (whose flags are ``options_type``'s and the
    launcher's --local_rank); a value a field's ``parse`` refuses is a usage error."""
    parser = argparse.ArgumentParser(prog=f"python -m data_tools.{name}", description=doc.split("\n")[0],
                                     epilog=epilog)
    add_flags(parser, options_type)
    accept_local_rank(parser)
    args = parser.parse_args(argv)
    values = {}
    for field in dataclasses.fields(options_type):
        values[field.name] = getattr(args, field.name)
        if field.metadata["parse"] is not None:
            try:
                values[field.name] = field.metadata["parse"](values[field.name])
            except ValueError as e:
                parser.error(str(e))
    return options_type(**values)


@contextlib.contextmanager
def refusals(command: str, explain: Callable[[Exception], str] = str,
             also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """End the command with ``command: <explain(error)>`` on a stage's refusal (ValueError, FileNotFoundError, and
    ``also``): the user reads why and what to change, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, *also) as e:
        sys.exit(f"{command}: {explain(e)}")


def run_stage(name: str, options_type: type[Options], doc: str, run: Callable[[Options, Share], Result],
              report: Callable[[Options, Result, Share], None], argv: Optional[list[str]] = None) -> None:
    """A stage's command line: its options from ``argv``, ``run`` on this process's share (data_tools.spread)
    once its output folder is known to be writable, then ``report`` of what it returned."""
    options = parse_options(options_type, name, doc, argv)
    keep_own_gpu()
    with refusals(name):
        share = share_from_env()
        check_writable(options.out)
        result = run(options, share)
    report(options, result, share)
