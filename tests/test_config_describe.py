"""The config reference (`config/describe.py`): every field of the schema, its default and the
documentation its source gives, as YAML that loads back to the same config, and docs/config.md
kept equal to what the source generates.

The expectations are read independently of the renderer: the keys from `dataclasses.fields`,
the documentation from the source lines of each class (a regex per field, not ast/tokenize).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from megatron_opd.config import describe
from megatron_opd.config.data import DataConfig
from megatron_opd.config.job import JobConfig, OptimizerConfig, load_job_config
from megatron_opd.config.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["model=/models/student", "data.dataset=[train.jsonl]"]
# The default algorithm (gkd) needs a teacher to validate.
FILLED = [*REQUIRED, "teacher_model=/models/teacher"]


def schema_fields(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, type, dataclasses.Field]]:
    """(dotted path, owning class, field) of every field, nested sections included."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        found.append((f"{prefix}{field.name}", cls, field))
        if dataclasses.is_dataclass(hints[field.name]):
            found += schema_fields(hints[field.name], f"{prefix}{field.name}.")
    return found


def is_section(cls: type, field: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(typing.get_type_hints(cls)[field.name])


def source_docs(cls: type, name: str) -> list[str]:
    """What the source says of field `name` of `cls`: its trailing comment, the comment lines
    just above it, and a docstring paragraph that opens with `name` in backticks."""
    lines = inspect.getsource(cls).splitlines()
    row = next(i for i, line in enumerate(lines) if re.match(rf"^    {name}\s*:", line))
    docs = []
    trailing = re.search(r"\s#\s?(.*)$", lines[row])
    if trailing:
        docs.append(trailing.group(1))
    above = row - 1
    while lines[above].strip().startswith("#"):
        docs.append(lines[above].strip().lstrip("#").strip())
        above -= 1
    if "__doc__" in cls.__dict__ and cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(cls.__doc__)):
            if paragraph.startswith(f"`{name}`"):
                docs += [line.strip() for line in paragraph.splitlines()]
    return docs


def rendered_keys(text: str) -> dict[str, str]:
    """Each key line of commented YAML by dotted path -> its documentation: the comment lines
    right above it and the comment after it."""
    lines = text.splitlines()
    found, path = {}, []
    for i, line in enumerate(lines):
        match = re.match(r"^( *)(\w+):( .*)?$", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        path = [*path[:depth], match.group(2)]
        doc = []
        above = i - 1
        while above >= 0 and lines[above].lstrip().startswith("#"):
            doc.insert(0, lines[above].strip().lstrip("#").strip())
            above -= 1
        trailing = re.search(r"\s\s#\s(.*)$", line)
        found[".".join(path)] = " ".join([*doc, trailing.group(1) if trailing else ""])
    return found


def flatten(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in raw.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= flatten(value, f"{prefix}{name}.")
    return keys


def test_every_field_is_rendered_with_the_documentation_its_source_gives():
    text = describe.render_defaults()
    keys = rendered_keys(text)
    fields = schema_fields()
    assert flatten(yaml.safe_load(text)) == {path for path, _, _ in fields}
    assert set(keys) == {path for path, _, _ in fields}
    documented = 0
    for path, cls, field in fields:
        for doc in source_docs(cls, field.name):
            assert doc in keys[path], f"{path}: {doc!r} is not in the rendered documentation {keys[path]!r}"
            documented += 1
    assert documented > 40  # the source documents most fields: the comparison above is not vacuous


def test_every_section_is_rendered_with_its_docstring():
    keys = rendered_keys(describe.render_defaults())
    for path, cls, field in schema_fields():
        if is_section(cls, field):
            section = typing.get_type_hints(cls)[field.name]
            own = section.__dict__.get("__doc__") or ""
            first = inspect.cleandoc(own).split("\n\n")[0] if own and not own.startswith(f"{section.__name__}(") \
                else inspect.getmodule(section).__doc__.split("\n\n")[0]
            assert " ".join(first.split()) in " ".join(keys[path].split()), path


def test_required_keys_are_null_and_marked():
    lines = describe.render_defaults().splitlines()
    assert any(line.startswith("model: null  # required") for line in lines)
    assert any(line.startswith("  dataset: null  # required") for line in lines)


def test_defaults_load_back_to_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(describe.render_defaults())
    with pytest.raises(ConfigError, match="model"):
        load_job_config(path)
    loaded = load_job_config(path, FILLED)
    assert loaded == JobConfig(model="/models/student", data=DataConfig(dataset=["train.jsonl"]),
                               teacher_model="/models/teacher")


@pytest.mark.parametrize("recipe", sorted(path.name for path in (ROOT / "configs").glob("*.yaml")))
def test_an_effective_config_loads_back_equal_and_shows_the_override(recipe, tmp_path):
    config = load_job_config(ROOT / "configs" / recipe, ["optimizer.lr=3e-4"])
    text = describe.render_config(config)
    assert re.search(r"^  lr: 0\.0003  # default: 1\.0e-05$", text, flags=re.M), text
    assert set(rendered_keys(text)) == {path for path, _, _ in schema_fields()}
    path = tmp_path / "effective.yaml"
    path.write_text(text)
    assert load_job_config(path) == config


def test_print_config_text():
    assert describe.config_text() == describe.render_defaults()
    # Required keys missing: the defaults with the values given, types and key names checked.
    partial = describe.config_text(None, ["optimizer.lr=3e-4", "data.max_length=7"])
    assert "missing required key(s) model, data.dataset" in partial
    assert re.search(r"^  lr: 0\.0003  # default: 1\.0e-05$", partial, flags=re.M)
    assert re.search(r"^  max_length: 7  # default: 2048$", partial, flags=re.M)
    assert re.search(r"^model: null  # required", partial, flags=re.M)
    with pytest.raises(ConfigError, match="unknown key.*optimizer.lrr"):
        describe.config_text(None, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="optimizer.lr='x' is invalid"):
        describe.config_text(None, ["optimizer.lr=x"])
    # Complete: loaded and validated as a run would be.
    full = describe.config_text(None, [*FILLED, "optimizer.lr=3e-4"])
    assert "missing" not in full and re.search(r"^  lr: 0\.0003  # default", full, flags=re.M)
    with pytest.raises(ConfigError, match="teacher"):
        describe.config_text(None, REQUIRED)


def test_help_epilog_names_every_section_and_print_config():
    epilog = describe.config_help_epilog()
    sections = [path for path, cls, field in schema_fields() if is_section(cls, field)]
    for section in sections:
        assert re.search(rf"^  {section}\s+\S", epilog, flags=re.M), section
    assert "megatron-opd train --print-config [--config X.yaml] [key=value ...]" in " ".join(epilog.split())
    assert OptimizerConfig.__doc__.split("(")[0].strip() in epilog


def test_docs_config_md_lists_every_key_and_is_up_to_date():
    markdown = describe.render_markdown()
    for path, cls, field in schema_fields():
        if not is_section(cls, field):
            assert f"| `{path}` |" in markdown, path
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == markdown, f"docs/config.md is stale: run `{describe.MARKDOWN_COMMAND}`"


def test_values_that_yaml_could_misread_load_back_as_given(tmp_path):
    config = load_job_config(None, [*REQUIRED, "algorithm=sft", "data.dataset=['2e-5', 'a #b', 'yes', 'x: y']",
                                    "training.output_dir='1.5'", "reward_funcs=[]"])
    path = tmp_path / "effective.yaml"
    path.write_text(describe.render_config(config))
    assert load_job_config(path) == config
