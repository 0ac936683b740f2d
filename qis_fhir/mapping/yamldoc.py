"""YAML with line numbers: the data and the node tree it was built from.

Errors in mapping and quality files name ``file:line`` so a clinician editing YAML can find the
problem; YAML's node API (``compose``) gives every value its ``start_mark``, which plain
``yaml.safe_load`` throws away. ``mapping/loader.py`` and ``quality/suites.py`` both read through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Path_ = tuple  # a path into a YAML document: keys and list indices


@dataclass
class YamlDoc:
    """One parsed YAML file: its data and the node tree to find lines in."""

    name: str
    data: Any
    node: yaml.Node

    def line(self, path: Path_ = (), *, key: bool = False) -> int:
        """1-based line of the value at ``path`` (or of its key when ``key``); nearest parent if absent."""
        node, line = self.node, self.node.start_mark.line + 1
        for i, step in enumerate(path):
            found = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == step:
                        found = (k, v)
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                found = (node.value[step], node.value[step])
            if found is None:
                return line
            knode, node = found
            last = i == len(path) - 1
            line = (knode if (key and last) else node).start_mark.line + 1
        return line

    def error(self, path: Path_, message: str, *, key: bool = False) -> str:
        where = _dotted(path)
        return f"{self.name}:{self.line(path, key=key)}: {where + ': ' if where else ''}{message}"


def _dotted(path: Path_) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def compose_yaml(text: str, name: str) -> YamlDoc | None:
    """``text`` as a ``YamlDoc`` (safe loading), or None when it holds no document.

    Raises ``yaml.YAMLError``; each caller words that error itself.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return YamlDoc(name, loader.construct_document(node), node)
    finally:
        loader.dispose()
