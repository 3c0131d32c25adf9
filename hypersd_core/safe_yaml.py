"""YAML from people, parsed with bounds: at most MAX_YAML_BYTES of text, at most
MAX_ALIASES alias uses, and at most MAX_YAML_NODES nodes once every alias is expanded.

``yaml.safe_load`` alone builds an alias bomb (each level lists the one before nine times)
in microseconds as a small graph of shared lists; whatever walks it afterwards (a repr
in an error message, a dump, a type check) sees the expanded tree: 436 bytes became
hours of work and gigabytes. Counting the expanded size on the composed graph, with one
size per distinct node, is linear in the text, so the refusal costs nothing.
"""

from __future__ import annotations

import yaml

MAX_YAML_BYTES = 256 * 1024  # a stage config or study.yaml is a few KB
MAX_ALIASES = 100  # anchors are a convenience; a settings file needs few
MAX_YAML_NODES = 100_000  # scalars + collections after expanding every alias


class YAMLBoundsError(ValueError):
    """A YAML document over one of the bounds; the message says which."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts alias uses while composing."""

    def __init__(self, stream, max_aliases: int):
        super().__init__(stream)
        self._aliases_left = max_aliases

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases_left -= 1
            if self._aliases_left < 0:
                raise YAMLBoundsError("the YAML uses too many aliases (*name); at most "
                                      f"{MAX_ALIASES} are allowed")
        return super().compose_node(parent, index)


def expanded_size(node: yaml.Node) -> int:
    """Nodes in the tree ``node`` stands for with every alias expanded (shared nodes
    counted once per use); computed once per distinct node."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int = 0) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > 200:
            raise YAMLBoundsError("the YAML nests deeper than 200 levels")
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c, depth + 1) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        else:
            total = 1
        sizes[id(n)] = min(total, MAX_YAML_NODES + 1)  # saturate: no huge integers either
        return sizes[id(n)]

    return size(node)


def load(text: str | bytes | None, what: str = "the YAML", max_bytes: int = MAX_YAML_BYTES,
         max_aliases: int = MAX_ALIASES, max_nodes: int = MAX_YAML_NODES):
    """``yaml.safe_load`` of ``text`` within the bounds; raises YAMLBoundsError (a
    ValueError naming ``what``) when over one, yaml.YAMLError when the text is not YAML."""
    if text is None:
        return None
    size = len(text.encode("utf-8", "replace") if isinstance(text, str) else text)
    if size > max_bytes:
        raise YAMLBoundsError(f"{what} has {size:,} bytes; at most {max_bytes:,} are read")
    loader = _BoundedLoader(text, max_aliases)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > max_nodes:
            raise YAMLBoundsError(f"{what} expands (through its aliases) to more than "
                                  f"{max_nodes:,} values; write the values out instead")
        return loader.construct_document(node)
    except YAMLBoundsError as err:
        raise YAMLBoundsError(str(err).replace("the YAML", what, 1)) from None
    finally:
        loader.dispose()
