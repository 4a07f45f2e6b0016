"""Generate the configuration and command-line reference from the code: ``docs/reference.md`` and the marked
blocks of the other docs pages.

    python -m mola.cli.reference --write        # rewrite docs/reference.md and every generated docs block
    python -m mola.cli.reference > docs/reference.md   # the same reference page, on stdout

Sources: the config dataclasses under ``RunConfig`` (field types and defaults from ``dataclasses.fields``,
help from the field's ``metadata["help"]``, else its trailing ``# comment``, else ``#:`` comment lines just
above it, else a string literal just below it), the architectures' ``Options`` dataclasses, the ``__init__``
signatures and docstrings of the registered methods, and the argparse parsers of the ``mola`` subcommands.

A docs page embeds a generated block between ``<!-- generated: KIND NAME -->`` and ``<!-- end generated -->``;
KIND is ``config`` (NAME a dotted section such as ``model.mola``), ``arch``, ``weighting``, ``method`` or
``cli`` (NAME a subcommand).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REGENERATE = "python -m mola.cli.reference --write"
BLOCK_RE = re.compile(r"(<!-- generated: (\w+) ([\w.-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
SKIP_PARAMS = {"self", "num_tasks", "feature_dim"}


# -- help text from the source -------------------------------------------------------------------------
def _comments(source: str) -> dict[int, str]:
    """Line number (1-based, in ``source``) -> text of the comment on that line."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


@cache
def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of dataclass ``cls``, read from its metadata or its source (see module doc)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        source = ""
    helps: dict[str, str] = {}
    if source:
        lines = source.splitlines()
        comments = _comments(source)
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        stmts = body.body
        for i, node in enumerate(stmts):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            end = node.end_lineno or node.lineno
            text = comments.get(end, "")
            if text and lines[end - 1].lstrip().startswith("#"):
                text = ""
            text = text.lstrip("#:").strip()
            if not text:
                above, ln = [], node.lineno - 1
                while ln >= 1 and lines[ln - 1].lstrip().startswith("#:"):
                    above.insert(0, lines[ln - 1].lstrip()[2:].strip())
                    ln -= 1
                text = " ".join(above)
            if not text and i + 1 < len(stmts):
                nxt = stmts[i + 1]
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(
                        nxt.value.value, str):
                    text = " ".join(nxt.value.value.split())
            helps[node.target.id] = text
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            helps[f.name] = str(f.metadata["help"])
    return helps


def _doc(obj: Any) -> str:
    """The object's docstring as one paragraph-preserving string ('' when it has none)."""
    doc = inspect.getdoc(obj) or ""
    return "\n".join(" ".join(p.split()) for p in doc.split("\n\n"))


def _paragraphs(text: str) -> str:
    return "\n\n".join(p for p in text.split("\n") if p)


# -- formatting -----------------------------------------------------------------------------------------
def _value(v: Any) -> str:
    """A default as it would be written in YAML."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    if isinstance(v, tuple):
        v = list(v)
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _cell(text: Any) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _code(text: Any) -> str:
    return f"`{_cell(text)}`" if str(text) != "" else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _literal(m: re.Match[str]) -> str:
    return " | ".join(v.strip().strip("'\"") for v in m.group(1).split(","))


def _type_name(tp: Any) -> str:
    """A readable type: ``Literal['a', 'b']`` becomes ``a | b``."""
    if isinstance(tp, str):
        return re.sub(r"Literal\[([^\]]*)\]", _literal, tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# -- config dataclasses ---------------------------------------------------------------------------------
def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def sections(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted section, dataclass) for ``RunConfig`` and every dataclass nested in it, depth first."""
    if cls is None:
        from mola.engine.config import RunConfig

        cls = RunConfig
    yield prefix, cls
    for f in dataclasses.fields(cls):
        d = _default(f)
        if dataclasses.is_dataclass(d):
            yield from sections(type(d), f"{prefix}{f.name}.")


def dataclass_table(cls: type, prefix: str = "") -> str:
    """A Markdown table of the non-dataclass fields of ``cls``: key, type, default, help."""
    helps = field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        d = _default(f)
        if dataclasses.is_dataclass(d):
            continue
        default = "required" if d is dataclasses.MISSING else _code(_value(d))
        rows.append([_code(prefix + f.name), _code(_type_name(f.type)), default, _cell(helps.get(f.name, ""))])
    if not rows:
        return "No options."
    return _table(["key", "type", "default", "help"], rows)


def missing_help() -> list[str]:
    """Config keys (``RunConfig`` tree and architecture options) whose field has no help text in the code."""
    out = []
    for prefix, cls in sections():
        helps = field_help(cls)
        out += [prefix + f.name for f in dataclasses.fields(cls)
                if not dataclasses.is_dataclass(_default(f)) and not helps.get(f.name)]
    for arch, cls in _registries()["arch"].items():
        helps = field_help(cls.Options)
        out += [f"model.options.{f.name} (arch {arch})" for f in dataclasses.fields(cls.Options)
                if not helps.get(f.name)]
    return out


def config_block(section: str) -> str:
    """Description and key table of one config section (``""`` = top level, else e.g. ``model.mola``)."""
    prefix = f"{section}." if section else ""
    for name, cls in sections():
        if name == prefix:
            return f"{_paragraphs(_doc(cls))}\n\n{dataclass_table(cls, prefix)}"
    raise ValueError(f"unknown config section {section!r}; known: {[n.rstrip('.') for n, _ in sections()]}")


# -- registries -----------------------------------------------------------------------------------------
def _registries() -> dict[str, Any]:
    import mola.methods  # noqa: F401
    import mola.models.archs  # noqa: F401
    from mola.methods import DOMAIN_METHODS, WEIGHTINGS
    from mola.models import ARCHS

    return {"arch": ARCHS, "weighting": WEIGHTINGS, "method": DOMAIN_METHODS}


def arch_block(name: str) -> str:
    """The options dataclass of architecture ``name`` (keys under ``model.options``)."""
    cls = _registries()["arch"].get(name)
    opts = cls.Options
    doc = _paragraphs(_doc(opts))
    if not dataclasses.fields(opts) and "no options" in doc.lower():
        return doc
    return f"{doc}\n\n{dataclass_table(opts, 'model.options.')}"


def _signature_table(cls: type, prefix: str) -> str:
    rows = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in SKIP_PARAMS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        tp = p.annotation if p.annotation is not inspect.Parameter.empty else ""
        default = "required" if p.default is inspect.Parameter.empty else _code(_value(p.default))
        rows.append([_code(prefix + p.name), _code(_type_name(tp)), default])
    if not rows:
        return "No options."
    return _table(["key", "type", "default"], rows)


def method_block(kind: str, name: str) -> str:
    """Docstring and option table of a registered weighting (``kind="weighting"``) or domain method."""
    cls = _registries()[kind].get(name)
    prefix = "train.weighting_options." if kind == "weighting" else "train.method_options."
    return f"{_paragraphs(_doc(cls))}\n\n{_signature_table(cls, prefix)}"


# -- command line ---------------------------------------------------------------------------------------
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from mola.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_help() -> dict[str, str]:
    from mola.cli.main import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def cli_block(command: str) -> str:
    """Usage, description and argument table of ``mola COMMAND``."""
    subs = _subcommands()
    if command not in subs:
        raise ValueError(f"unknown mola subcommand {command!r}; known: {sorted(subs)}")
    p = subs[command]
    usage = " ".join(p.format_usage().split())
    usage = usage.removeprefix("usage: ")
    parts = [f"```text\n{usage}\n```"]
    helps = _subcommand_help()
    desc = p.description or ""
    if desc and desc != helps.get(command):
        if "\n" in desc.strip():
            parts.append(f"```text\n{textwrap.dedent(desc).strip()}\n```")
        else:
            parts.append(_cell(desc))
    rows = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = ", ".join(a.option_strings) if a.option_strings else a.metavar or a.dest
        if a.choices:
            kind = " | ".join(str(c) for c in a.choices)
        elif a.nargs == 0:
            kind = "flag"
        else:
            kind = getattr(a.type, "__name__", "str") if a.type else "str"
        if a.nargs in ("*", "+"):
            kind += " ..."
        required = a.required and a.nargs not in ("*", "?")
        default = "" if a.default in (None, False, argparse.SUPPRESS) or required else _code(_value(a.default))
        if required:
            default = "required"
        text = a.help or ""
        if "%(" in text:
            text = text % {"default": a.default, "prog": p.prog}
        rows.append([_code(name), _code(kind), default, _cell(text)])
    parts.append(_table(["argument", "type", "default", "help"], rows) if rows else "No arguments.")
    return "\n\n".join(parts)


# -- blocks and the page --------------------------------------------------------------------------------
def render_block(kind: str, name: str) -> str:
    """The generated Markdown of one docs block (see the module docstring for the kinds)."""
    if kind == "config":
        return config_block("" if name == "top" else name)
    if kind == "arch":
        return arch_block(name)
    if kind in ("weighting", "method"):
        return method_block(kind, name)
    if kind == "cli":
        return cli_block(name)
    raise ValueError(f"unknown generated block kind {kind!r}; known: config, arch, weighting, method, cli")


def generate() -> str:
    """The whole ``docs/reference.md``."""
    reg = _registries()
    out = [
        "# Reference: configuration keys and command line",
        f"<!-- Generated by `{REGENERATE}` from the config dataclasses, the registries and the argparse "
        "parsers. Do not edit by hand. -->",
        "A run config is a YAML file whose sections mirror the dataclasses below; every key is optional (the "
        "default applies). On the command line, `mola train --config FILE key.sub=value ...` overrides any key "
        "(the value is parsed as YAML), and `--arch`, `--weighting`, `--method`, `--seed` are shorthands for "
        "`model.arch`, `train.weighting`, `train.method` (`mola_grad` / `mola_router` set `model.arch=mola` and "
        "`model.mola.mode`) and `train.seed`. Unknown keys and wrong types are errors that name the key.",
        "## Configuration keys",
    ]
    for name, _cls in sections():
        title = name.rstrip(".") or "top level"
        out.append(f"### `{title}`" if name else f"### {title}")
        out.append(config_block(name.rstrip(".")))
    out.append("## Architecture options (`model.options`)")
    out.append("Set with `model.arch=NAME` (or `--arch NAME`); the keys below go under `model.options`.")
    for name in reg["arch"].names():
        out.append(f"### arch `{name}`")
        out.append(arch_block(name))
    out.append("## Loss-weighting and gradient methods (`train.weighting`, `train.weighting_options`)")
    for name in reg["weighting"].names():
        out.append(f"### weighting `{name}`")
        out.append(method_block("weighting", name))
    out.append("## Domain methods (`train.method`, `train.method_options`)")
    out.append("`erm` is the default (the plain sum of the per-domain losses). A domain method combines only with "
               "`train.weighting=ew`.")
    for name in reg["method"].names():
        out.append(f"### method `{name}`")
        out.append(method_block("method", name))
    out.append("## Command line")
    helps = _subcommand_help()
    for cmd in _subcommands():
        out.append(f"### `mola {cmd}`")
        if helps.get(cmd):
            out.append(_cell(helps[cmd][0].upper() + helps[cmd][1:]) + ".")
        out.append(cli_block(cmd))
    return "\n\n".join(out) + "\n"


def refresh_blocks(text: str) -> str:
    """``text`` with every ``<!-- generated: ... -->`` block re-rendered."""

    def sub(m: re.Match[str]) -> str:
        return f"{m.group(1)}\n{render_block(m.group(2), m.group(3))}\n\n{m.group(5)}"

    return BLOCK_RE.sub(sub, text)


def docs_dir() -> Path:
    """The repository's ``docs/`` folder (next to ``src/``)."""
    return Path(__file__).resolve().parents[3] / "docs"


def stale(docs: Path | None = None) -> list[Path]:
    """Docs files whose generated content differs from what the code gives now."""
    docs = docs or docs_dir()
    out = []
    ref = docs / "reference.md"
    if not ref.is_file() or ref.read_text() != generate():
        out.append(ref)
    for path in sorted(docs.rglob("*.md")):
        if path != ref:
            text = path.read_text()
            if BLOCK_RE.search(text) and refresh_blocks(text) != text:
                out.append(path)
    return out


def write(docs: Path | None = None) -> list[Path]:
    """Rewrite ``reference.md`` and the generated blocks of every docs page; returns the files changed."""
    docs = docs or docs_dir()
    changed = []
    ref = docs / "reference.md"
    new = generate()
    if not ref.is_file() or ref.read_text() != new:
        ref.write_text(new)
        changed.append(ref)
    for path in sorted(docs.rglob("*.md")):
        if path == ref:
            continue
        text = path.read_text()
        fresh = refresh_blocks(text)
        if fresh != text:
            path.write_text(fresh)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mola.cli.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite docs/reference.md and the generated docs blocks")
    p.add_argument("--docs", type=Path, help="docs folder (default: the repository's docs/)")
    args = p.parse_args(argv)
    if args.write:
        for path in write(args.docs):
            print(f"updated {path}")
        return 0
    sys.stdout.write(generate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
