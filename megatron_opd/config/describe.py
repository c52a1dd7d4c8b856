"""The training config's reference, read from the schema's own source: every key, its value and its documentation.

    python -m megatron_opd.config.describe                      # the defaults, as commented YAML
    python -m megatron_opd.config.describe --config X.yaml k=v  # X.yaml + overrides, as commented YAML
    python -m megatron_opd.config.describe --markdown > docs/config.md

The documentation lives once, in `config/*.py`: a field's trailing `# ...` comment, the
comment lines just above it, and the class docstring of each section (a docstring
paragraph that opens with a backticked field name documents that field; a section class
without a docstring is described by its module's). Nothing here repeats it: the YAML,
`megatron-opd train --help` and docs/config.md are all read from that source
(`inspect.getsource` + `ast` + `tokenize`).

The YAML loads back (`config.job.load_job_config`) to the config it was rendered from;
the defaults do once the required keys (`model`, `data.dataset`, shown as `null  # required`)
are filled in.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from megatron_opd.config.job import JobConfig, _load_yaml, load_job_config, read_raw_config
from megatron_opd.config.schema import ConfigError, _coerce

MARKDOWN_COMMAND = "python -m megatron_opd.config.describe --markdown > docs/config.md"
# The one line `train --help` gives the top level, which has no class docstring of its own.
TOP_LEVEL_SUMMARY = "the student (model), the algorithm, the teacher and the algorithm's parameters"


@dataclass(frozen=True)
class Key:
    """One config key: where it is, what it holds and what the source says about it."""

    path: str  # dotted, e.g. optimizer.lr
    annotation: Any
    default: Any  # dataclasses.MISSING when required; a section's class when the key is a section
    above: tuple[str, ...]  # comment lines above the field, then its docstring paragraph
    trailing: str  # the comment after the field on its line(s)
    section: Optional[type] = None  # the dataclass, when the key is a nested section
    see: str = ""  # the key whose docstring paragraph also documents this one (when it has no doc of its own)

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def doc(self) -> str:
        """The documentation as one paragraph (above, then trailing)."""
        return " ".join(line.strip() for line in (*self.above, self.trailing) if line.strip())


# --- reading the source ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module_source(module_name: str) -> tuple[ast.Module, dict[int, tuple[str, bool]], tuple[str, ...]]:
    """The module's syntax tree, its comments by line (text, whether alone on the line) and its lines."""
    source = inspect.getsource(sys.modules[module_name])
    lines = tuple(source.splitlines())
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            text = token.string[1:]
            comments[row] = (text[1:] if text.startswith(" ") else text, lines[row - 1][:column].strip() == "")
    return ast.parse(source), comments, lines


def _class_node(cls: type) -> ast.ClassDef:
    tree, _, _ = _module_source(cls.__module__)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node
    raise LookupError(f"class {cls.__name__} not found at the top level of {cls.__module__}")


def _docstring_paragraphs(cls: type) -> list[str]:
    text = ast.get_docstring(_class_node(cls)) or ""
    return [paragraph for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


_LEADING_NAMES = re.compile(r"^`(\w+)`")


def _field_paragraphs(cls: type) -> dict[str, str]:
    """Docstring paragraphs that open with a backticked field name, by that field."""
    names = {field.name for field in dataclasses.fields(cls)}
    found = {}
    for paragraph in _docstring_paragraphs(cls):
        match = _LEADING_NAMES.match(paragraph)
        if match and match.group(1) in names:
            found[match.group(1)] = paragraph
    return found


def _mentioned_in(cls: type) -> dict[str, str]:
    """Fields named (backticked) in another field's docstring paragraph, by the name of that field."""
    names = {field.name for field in dataclasses.fields(cls)}
    found: dict[str, str] = {}
    for owner, paragraph in _field_paragraphs(cls).items():
        for name in re.findall(r"`(\w+)`", paragraph):
            if name in names and name != owner:
                found.setdefault(name, owner)
    return found


def section_doc(cls: type) -> str:
    """What a section is: its class docstring less the field paragraphs, else its module's docstring."""
    fields = set(_field_paragraphs(cls).values())
    paragraphs = [paragraph for paragraph in _docstring_paragraphs(cls) if paragraph not in fields]
    if not paragraphs:
        tree, _, _ = _module_source(cls.__module__)
        return (ast.get_docstring(tree) or "").strip()
    return "\n\n".join(paragraphs)


def section_summary(cls: type) -> str:
    """The first sentence of `section_doc`, on one line."""
    first = " ".join(section_doc(cls).split("\n\n")[0].split())
    return re.split(r"(?<=[\w)`])\.(?:\s|$)", first, maxsplit=1)[0].rstrip(".") + "."


def _field_comments(cls: type) -> dict[str, tuple[tuple[str, ...], str]]:
    """Each field's (comment lines just above it, its trailing comment)."""
    _, comments, lines = _module_source(cls.__module__)
    found = {}
    for node in _class_node(cls).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = " ".join(comments[row][0] for row in range(node.lineno, node.end_lineno + 1)
                            if row in comments and not comments[row][1])
        above = []
        row = node.lineno - 1
        while row in comments and comments[row][1] and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row][0])
            row -= 1
        found[node.target.id] = (tuple(above), trailing)
    return found


def _section_class(annotation: Any) -> Optional[type]:
    return annotation if dataclasses.is_dataclass(annotation) and isinstance(annotation, type) else None


def config_keys(cls: type = JobConfig, prefix: str = "") -> list[Key]:
    """Every key of `cls`, sections followed by their own keys, in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    paragraphs = _field_paragraphs(cls)
    mentioned = _mentioned_in(cls)
    keys = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        above, trailing = comments.get(field.name, ((), ""))
        if field.name in paragraphs:
            above = (*above, *paragraphs[field.name].splitlines())
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        section = _section_class(hints[field.name])
        see = f"{prefix}{mentioned[field.name]}" if field.name in mentioned and not (above or trailing) else ""
        key = Key(f"{prefix}{field.name}", hints[field.name], default, above, trailing, section, see)
        keys.append(key)
        if section is not None:
            keys.extend(config_keys(section, f"{key.path}."))
    return keys


# --- YAML ----------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    """`value` as a one-line YAML flow node."""
    if value is None:
        return "null"
    if isinstance(value, list) and any(dataclasses.is_dataclass(item) for item in value):  # teachers:
        value = [_plain(item) for item in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    text = text.strip()
    # A string our loader would read as something else (`2e-5`: a float to config.job, a string
    # to PyYAML's dumper), or one with line breaks: double-quoted (JSON's quoting is YAML too).
    if "\n" in text or _load_yaml(text) != value:
        text = json.dumps(value)
    return text


def _plain(item: Any) -> Any:
    """A list entry that is a config dataclass as a mapping of its set fields (nulls left out)."""
    if not dataclasses.is_dataclass(item):
        return item
    return {name: _plain(value) for name, value in dataclasses.asdict(item).items() if value is not None}


def _choices(annotation: Any) -> list[Any]:
    """The allowed values of a Literal (or Optional Literal) annotation; [] for other types."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return list(args)
    if origin in (Union, types.UnionType):
        inner = [choice for arg in args if arg is not type(None) for choice in _choices(arg)]
        return [*inner, None] if inner and type(None) in args else inner
    return []


def _note(key: Key, value: Any, with_defaults: bool) -> str:
    """The comment after `key: value`."""
    parts = []
    if with_defaults and key.required:
        parts.append("required")
    if key.trailing:
        parts.append(key.trailing)
    choices = _choices(key.annotation)
    if choices:
        parts.append("one of " + ", ".join(_scalar(choice) for choice in choices))
    if not with_defaults and not key.required and value != key.default:
        parts.append(f"default: {_scalar(key.default)}")
    return "; ".join(parts)


def _render(cls: type, config: Any, header: Sequence[str]) -> str:
    """Commented YAML of `config` (an instance of `cls`), or of the defaults when it is None."""
    with_defaults = config is None
    out = [f"# {line}".rstrip() for line in header]
    values: dict[str, Any] = {}  # section path -> instance
    for key in config_keys(cls):
        parent, _, name = key.path.rpartition(".")
        depth = key.path.count(".")
        pad = "  " * depth
        if with_defaults:
            value = None if key.required or key.section else key.default
        else:
            value = getattr(values[parent] if parent else config, name)
        comments = list(key.above)
        if key.section is not None:
            values[key.path] = value
            comments += section_doc(key.section).splitlines()
        after_header = re.fullmatch(r" *\w+:", out[-1]) is not None
        if (comments or key.section is not None) and not after_header:
            out.append("")
        out.extend(f"{pad}# {line}".rstrip() for line in comments)
        if key.section is not None:
            out.append(f"{pad}{name}:")
            continue
        line = f"{pad}{name}: {_scalar(value)}"
        note = _note(key, value, with_defaults)
        out.append(f"{line}  # {note}" if note else line)
    return "\n".join(out) + "\n"


def _header(title: str) -> list[str]:
    doc = section_doc(JobConfig)
    return [title, "", *doc.splitlines(), "",
            "Every key is shown, documented from the schema's source (megatron_opd/config/*.py; also docs/config.md).",
            "Use: megatron-opd train --config THIS.yaml [key=value ...]"]


def render_defaults() -> str:
    """Every key of the training config with its default and documentation, as commented YAML.

    Required keys (`model`, `data.dataset`) are `null  # required ...`: fill them in to load it.
    """
    return _render(JobConfig, None, _header("megatron_opd training config: the defaults."))


def render_config(config: JobConfig) -> str:
    """`config` (the effective config, after YAML and overrides) as commented YAML.

    Every key is shown with its documentation; a value that differs from the default says
    `default: X`. `load_job_config` of the text gives back an equal config.
    """
    return _render(JobConfig, config, _header("megatron_opd training config: the effective values."))


def _missing_required(raw: dict[str, Any]) -> list[str]:
    missing = []
    for key in config_keys(JobConfig):
        node: Any = raw
        for part in key.path.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if key.required and key.section is None and (not isinstance(node, dict) or node.get(key.name) is None):
            missing.append(key.path)
    return missing


def _partial(raw: dict[str, Any], missing: list[str]) -> str:
    """The defaults with the values of `raw` (type-checked, unknown keys refused), not validated as a whole."""
    keys = {key.path: key for key in config_keys(JobConfig)}
    given: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            path = f"{prefix}{name}"
            key = keys.get(path)
            if key is None:
                allowed = sorted(k.name for k in keys.values() if k.path.rpartition(".")[0] == prefix.rstrip("."))
                raise ConfigError(f"unknown key(s) {path}; allowed: {', '.join(allowed)}")
            if key.section is not None and isinstance(value, dict):
                walk(value, f"{path}.")
            elif value is not None or not key.required:
                given[path] = _coerce(path, value, key.annotation)

    walk(raw, "")
    header = _header("megatron_opd training config: the defaults with the values given (not validated: "
                     f"missing required key(s) {', '.join(missing)}).")
    lines = _render(JobConfig, None, header).splitlines()
    out = []
    path: list[str] = []
    for line in lines:
        match = re.match(r"^( *)(\w+):(.*)$", line)
        if match:
            depth = len(match.group(1)) // 2
            path = [*path[:depth], match.group(2)]
            dotted = ".".join(path)
            if dotted in given:
                key = keys[dotted]
                line = f"{match.group(1)}{key.name}: {_scalar(given[dotted])}"
                note = _note(key, given[dotted], with_defaults=False)
                line = f"{line}  # {note}" if note else line
        out.append(line)
    return "\n".join(out) + "\n"


def config_text(path: Optional[Path | str] = None, overrides: Sequence[str] = ()) -> str:
    """What `--print-config` prints: commented YAML of the config at `path` with `overrides`.

    With neither, the defaults. When the required keys are all given, the config is loaded and
    validated (`load_job_config`; ConfigError as for a run) and its effective values rendered.
    Without them, the defaults overlaid with the values given (types and key names checked).
    """
    if path is None and not overrides:
        return render_defaults()
    raw = read_raw_config(path, overrides)
    missing = _missing_required(raw)
    if missing:
        return _partial(raw, missing)
    return render_config(load_job_config(path, overrides))


# --- help and docs ---------------------------------------------------------------------------------


def config_help_epilog(prog: str = "megatron-opd train") -> str:
    """A short text for `PROG --help` (argparse epilog, RawDescriptionHelpFormatter): the config's
    sections, one line each, and how to print every key."""
    sections = [("(top level)", TOP_LEVEL_SUMMARY)]
    sections += [(key.path, section_summary(key.section)) for key in config_keys(JobConfig)
                 if key.section is not None]
    width = max(len(name) for name, _ in sections) + 2
    lines = ["config sections (YAML keys; override any key as section.key=value, e.g. optimizer.lr=3e-4):"]
    for name, summary in sections:
        lines.append(textwrap.fill(summary, width=100, initial_indent=f"  {name:<{width}}",
                                   subsequent_indent=" " * (width + 2)))
    lines += ["", textwrap.fill(f"{prog} --print-config [--config X.yaml] [key=value ...] prints every key with "
                                "its default and documentation (docs/config.md has the same reference).", width=100)]
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    choices = _choices(annotation)
    if choices:
        return "one of " + ", ".join(f"`{_scalar(choice)}`" for choice in choices)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}"
    if args and type(None) in args:
        return " or ".join(_type_name(arg) for arg in args if arg is not type(None)) + " or null"
    return {str: "string", int: "integer", float: "number", bool: "true / false"}.get(annotation,
                                                                                       getattr(annotation, "__name__",
                                                                                               str(annotation)))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/config.md: every key with its type, default and documentation, section by section."""
    out = ["# Training config reference", "",
           f"<!-- Generated from megatron_opd/config/*.py by `{MARKDOWN_COMMAND}`; do not edit:",
           "     tests/test_config_describe.py fails when this file is stale. -->", "",
           "Every key of the training config (`megatron_opd.config.job.JobConfig`), as read from the schema's",
           "source. A run takes them from YAML and `key=value` overrides:",
           "`megatron-opd train --config X.yaml [section.key=value ...]`.",
           "`megatron-opd train --print-config [--config X.yaml] [key=value ...]` prints the same reference",
           "as commented YAML, with the values that config gives.", ""]
    keys = config_keys(JobConfig)
    groups: list[tuple[str, Optional[Key], list[Key]]] = [("Top level", None, [])]
    for key in keys:
        if key.section is not None:
            groups.append((f"`{key.path}`", key, []))
        elif "." not in key.path:
            groups[0][2].append(key)
        else:
            groups[-1][2].append(key)
    for title, section, members in groups:
        doc = section_doc(section.section if section else JobConfig)
        out += [f"## {title}", "", doc, ""]
        if section is not None and section.doc:
            out += [section.doc, ""]
        out += ["| key | type | default | documentation |", "|---|---|---|---|"]
        for key in members:
            default = "**required**" if key.required else f"`{_scalar(key.default)}`"
            doc = key.doc or (f"see `{key.see}`" if key.see else "")
            out.append(f"| `{key.path}` | {_cell(_type_name(key.annotation))} | {_cell(default)} | {_cell(doc)} |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_opd.config.describe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="the reference as Markdown (docs/config.md)")
    parser.add_argument("--config", help="YAML training config to render (default: the defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=3e-4")
    args = parser.parse_args(argv)
    if args.markdown:
        if args.config or args.overrides:
            parser.error("--markdown renders the defaults: no --config or overrides")
        sys.stdout.write(render_markdown())
        return 0
    try:
        sys.stdout.write(config_text(args.config, args.overrides))
    except (ConfigError, FileNotFoundError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
