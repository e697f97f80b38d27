"""Parse YAML text into plain dicts and lists that remember the line of every key and item."""
from __future__ import annotations

import yaml

from kvrouter.errors import ConfigError


class LineDict(dict):
    """A dict that knows the 1-based line of each key (``lines[key]``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lines: dict = {}
        self.line: int | None = None


class LineList(list):
    """A list that knows the 1-based line of each item (``lines[i]``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lines: list = []
        self.line: int | None = None


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node):
    out = LineDict()
    out.line = node.start_mark.line + 1
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader, node):
    out = LineList()
    out.line = node.start_mark.line + 1
    for child in node.value:
        out.append(loader.construct_object(child, deep=True))
        out.lines.append(child.start_mark.line + 1)
    return out


def _construct_int(loader, node):
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)
    except ValueError:
        digits = sum(c.isdigit() for c in str(node.value))
        raise ConfigError(f"integer with {digits} digits is too large",
                          line=node.start_mark.line + 1) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, source: str = "<config>"):
    """Return the document as LineDict/LineList; YAML mistakes become located ConfigErrors."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(err.message, source=source, line=err.line) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        problem = err.problem or "invalid YAML"
        if err.context:
            problem = f"{err.context}, {problem}"
        raise ConfigError(f"YAML syntax error: {problem}", source=source, line=line) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"YAML error: {err}", source=source) from None
