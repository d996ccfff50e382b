"""Dataclass config trees ↔ JSON and ↔ command line: shared by `grm-train` and `grm-serve`.

Every leaf field of a `@dataclass(kw_only=True)` tree becomes a flag named by its dotted path
(`--optim.lr`, `--server.port`); the docstring written under a field is its help text. Defaults are
suppressed in the parser, so only flags the user typed override the preset.

    >>> import argparse, dataclasses
    >>> Net = dataclasses.make_dataclass("Net", [("port", int, dataclasses.field(default=1))], kw_only=True)
    >>> p = argparse.ArgumentParser(); add_config_arguments(p, Net)
    >>> apply_overrides(Net(), vars(p.parse_args(["--port", "8"]))).port
    8
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import signal
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Literal

# ---------------------------------------------------------------------------------------------
# Dataclass <-> JSON


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config from `to_dict` output (unknown keys are an error)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def check_literals(cfg: Any, prefix: str = "") -> None:
    """Raise ValueError when a Literal-typed field holds a value outside its choices."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            check_literals(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ValueError(f"{prefix}{f.name} is {value!r}; expected one of {list(typing.get_args(tp))}")


# ---------------------------------------------------------------------------------------------
# The command line, generated from the tree


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (the string literal after `name: type = ...`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [item(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def iter_leaves(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted name, type, doc) for every leaf field of a config class."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, docs.get(f.name, "")


def _argparse_kwargs(tp: Any, name: str) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{name}: unsupported union type {tp}")
        kw = _argparse_kwargs(inner[0], name)
        base = kw["type"]
        kw["type"] = lambda text: None if text.lower() in ("none", "null") else base(text)
        return kw
    if tp is bool:
        return {"type": _parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    if tp in (int, float, str):
        return {"type": tp, "metavar": tp.__name__.upper()}
    if origin is Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin is list:
        return {"type": _list_of(args[0]), "metavar": f"{args[0].__name__.upper()},..."}
    if origin is tuple:
        return {"type": lambda text: tuple(_list_of(args[0])(text)),
                "metavar": ",".join(a.__name__.upper() for a in args)}
    raise TypeError(f"{name}: unsupported config field type {tp}")


def field_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> dataclass default for every leaf field that has one."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_defaults(hints[f.name], f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = f.default_factory()
    return out


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--dotted.name` flag per leaf field of `cls`, defaults suppressed (so that only flags
    the user typed override the preset); the help shows the dataclass default."""
    defaults = field_defaults(cls)
    for name, tp, doc in iter_leaves(cls):
        group_name = name.split(".")[0] if "." in name else "general"
        group = _group(parser, group_name)
        text = doc.replace("%", "%%")
        if name in defaults:
            text += f" (default: {_show(defaults[name])})".replace("%", "%%")
        group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, help=text or None,
                           required=name not in defaults, **_argparse_kwargs(tp, name))


def _group(parser: argparse.ArgumentParser, title: str):
    for g in parser._action_groups:  # noqa: SLF001 - argparse has no public lookup
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Set dotted-name values on a config tree in place (and return it)."""
    for dotted, value in overrides.items():
        *path, target = dotted.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, target):
            raise ValueError(f"unknown config field {dotted}")
        setattr(obj, target, value)
    return cfg


# ---------------------------------------------------------------------------------------------
# Commands: every grm-* command parses its config tree this way and fails the same way


USER_ERROR = 2
"""Exit status of every grm-* command when the user's input is wrong (argparse's own convention)."""


def parse_command(cls: type, argv: list[str] | None, *, prog: str, description: str = "", start: Any = None) -> Any:
    """A command's config from its command line: one `--dotted.name` flag per leaf of `cls`, applied
    over `start` (or the defaults; required fields are required flags). Bad values exit 2 with the reason.

        >>> import dataclasses
        >>> Cfg = dataclasses.make_dataclass("Cfg", [("src", str), ("keep", bool, dataclasses.field(default=False))],
        ...                                  kw_only=True)
        >>> parse_command(Cfg, ["--src", "a", "--keep"], prog="demo")
        Cfg(src='a', keep=True)
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, cls)
    args = vars(parser.parse_args(argv))
    try:
        cfg = apply_overrides(start, args) if start is not None else from_dict(cls, _nest(args))
        check_literals(cfg)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return cfg


def preset_parser(cls: type, presets: dict[str, Callable[[], Any]], *, prog: str, description: str,
                  preset_help: str, default_preset: str | None = None) -> argparse.ArgumentParser:
    """The parser of a command run from a preset (grm-train, grm-ppo): `--preset NAME`, `--print_config`
    and one `--dotted.name` flag per leaf of `cls`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset, help=preset_help)
    parser.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    add_config_arguments(parser, cls)
    return parser


def parse_preset_args(parser: argparse.ArgumentParser, cls: type, presets: dict[str, Callable[[], Any]],
                      argv: list[str] | None) -> tuple[Any, argparse.Namespace]:
    """(config, namespace) from `argv` parsed by a `preset_parser`: CLI > preset > defaults of `cls`. A
    value outside a field's choices exits 2 with the reason.

        >>> import dataclasses
        >>> Cfg = dataclasses.make_dataclass("Cfg", [("lr", float, dataclasses.field(default=1.0))], kw_only=True)
        >>> presets = {"fast": lambda: Cfg(lr=5.0)}
        >>> parser = preset_parser(Cfg, presets, prog="demo", description="", preset_help="")
        >>> [parse_preset_args(parser, Cfg, presets, argv)[0].lr for argv in ([], ["--preset", "fast"],
        ...                                                                    ["--preset", "fast", "--lr", "2"])]
        [1.0, 5.0, 2.0]
    """
    ns = parser.parse_args(argv)
    cfg = presets[ns.preset]() if ns.preset else cls()
    apply_overrides(cfg, {k: v for k, v in vars(ns).items() if k not in ("preset", "print_config")})
    try:
        check_literals(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, ns


def start_command(cfg: Any, ns: argparse.Namespace) -> bool:
    """The common start of a preset command's `main`: with `--print_config`, print the resolved config
    as JSON and return False (nothing else to do); else send INFO logs to stderr and return True."""
    if ns.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    return True


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} → {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def fail(prog: str, exc: BaseException) -> int:
    """Say what is wrong in one line on stderr; return the user-error exit status."""
    print(f"{prog}: {exc}", file=sys.stderr)
    return USER_ERROR


INTERRUPTED = 128 + signal.SIGINT
"""The exit status after Ctrl-C, as a shell reports a process that SIGINT ended."""


def interrupted(prog: str, where: str) -> int:
    """Say in one line on stderr where a run that Ctrl-C stopped stands and how to go on (`where`), not
    a traceback; return `INTERRUPTED`."""
    print(f"{prog}: interrupted {where}", file=sys.stderr)
    return INTERRUPTED


def resume_hint(step: int, saved_step: int | None, ckpt_dir: Any) -> str:
    """`interrupted`'s `where` for a checkpointing run (grm-train, grm-ppo): the step reached and the newest
    checkpoint (one being written when Ctrl-C came is never left half-written: saves are staged)."""
    if saved_step is None:
        return f"at step {step}; no checkpoint saved yet, so a rerun starts again"
    return (f"at step {step}; the newest checkpoint is step {saved_step} in {ckpt_dir}: rerun the same command "
            "with --resume to continue from it")
