"""Reading a config file's YAML strictly: what a YAML 1.1 parser accepts silently or slowly is an error here.

- A key given twice in one mapping is refused (PyYAML keeps the last one without a word).
- A number in exponent form without a dot (`2e-3`, `1e23`) is a number, as in YAML 1.2 and JSON, not the string
  YAML 1.1 makes of it (the config would then say "expected a number, got str '2e-3'").
- Anchors and aliases are allowed, but a document is capped in size (MAX_BYTES) and in the nodes its aliases
  expand to (MAX_EXPANDED_NODES): an alias bomb ("billion laughs") fails at once instead of exhausting memory.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from hyperinf_ops.errors import ConfigError

__all__ = ["MAX_BYTES", "MAX_EXPANDED_NODES", "read_yaml"]

MAX_BYTES = 1 << 20  # a config is a few kB; a pool or target file never goes in it
MAX_EXPANDED_NODES = 100_000

# YAML 1.2's float forms that YAML 1.1 reads as strings: an exponent without a dot in the mantissa.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and counts the nodes its aliases expand to."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            if anchor in self.anchors:
                self._expanded += _count_nodes(self.anchors[anchor], self._sizes)
                if self._expanded > MAX_EXPANDED_NODES:
                    raise ConfigError(f"the YAML's aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias "
                                      "bomb?): write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one mapping "
                                  f"(first on line {seen[key] + 1}): keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _count_nodes(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under `node`, itself included: what one alias of it adds to the document. Memoized by node
    (`sizes`): an alias bomb shares its nodes, and counting them unshared would take as long as expanding them."""
    if id(node) not in sizes:
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
        elif isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(_count_nodes(child, sizes) for child in node.value)
        else:
            sizes[id(node)] = 1 + sum(_count_nodes(k, sizes) + _count_nodes(v, sizes) for k, v in node.value)
    return sizes[id(node)]


def read_yaml(text: str) -> Any:
    """The document in `text`; ConfigError for one over MAX_BYTES, a duplicate key or an alias bomb, and
    yaml.YAMLError for text that is not YAML."""
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise ConfigError(f"the config is {size:,} bytes, over the {MAX_BYTES:,} a config may have: is it the right "
                          "file?")
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
