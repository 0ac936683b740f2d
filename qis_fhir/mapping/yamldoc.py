"""YAML with line numbers, under one reading policy for every YAML file the project reads.

Errors in mapping and quality files name ``file:line`` so a clinician editing YAML can find the
problem; YAML's node API (``compose``) gives every value its ``start_mark``, which plain
``yaml.safe_load`` throws away. ``mapping/loader.py``, ``quality/suites.py`` and the tests read
YAML only through here.

The policy: no anchors or aliases, at most ``MAX_DEPTH`` levels of nesting, no duplicate keys
(YAML silently keeps the last of two, which hides a whole bucket or table). Safe loading still
expands aliases: a 431-byte "billion laughs" of nine aliases nine deep would build 9**9 list items
(a 1.3 KB one took 27.7 s and 1.55 GB, then printed a 312 MB schema error), and a self-referencing
alias or ~500 nested brackets end in a RecursionError. Mapping files never need either: the first
anchor or alias is refused at its line, before anything is built. Error text is bounded
(``MAX_MESSAGE`` per line, ``MAX_ERRORS`` lines), so no error can carry the document along.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qis_fhir.errors import MappingError

#: deepest nesting of mappings and lists accepted; the v1 files nest at most 8 deep (quality.yaml)
MAX_DEPTH = 32
#: longest error line (PyYAML's messages are under 80 characters, but a tag or a schema message
#: quoting a value can be any length: the bomb's schema error was 312 MB)
MAX_MESSAGE = 200
#: most error lines one ``MappingError`` lists; the rest are counted
MAX_ERRORS = 50
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
        return bounded(f"{self.name}:{self.line(path, key=key)}: {where + ': ' if where else ''}{message}")


def bounded(text: str) -> str:
    """``text`` cut to ``MAX_MESSAGE`` characters."""
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def mapping_error(errors: list[str]) -> MappingError:
    """One ``MappingError`` listing at most ``MAX_ERRORS`` of ``errors`` (each already bounded)."""
    shown = errors[:MAX_ERRORS]
    if len(errors) > MAX_ERRORS:
        shown.append(f"... and {len(errors) - MAX_ERRORS} more")
    return MappingError("\n".join(shown))


def _dotted(path: Path_) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


class _Refused(yaml.MarkedYAMLError):
    """A construct the reading policy refuses, at the line where it starts."""


class _PolicyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses anchors, aliases and deep nesting while composing, before building."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                problem="YAML anchors and aliases (&name, *name) are not allowed; write the value out in full",
                problem_mark=event.start_mark,
            )
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _problem(exc: yaml.YAMLError, text: str) -> tuple[int, str]:
    """Line and message of a YAML error, without the document's text and bounded in length."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: PyYAML gives its offset only
        return text.count("\n", 0, exc.position) + 1, f"invalid YAML: character #x{exc.character:04x} is not allowed"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return 1, "invalid YAML"
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    reason = exc.problem or exc.context or ""
    if isinstance(exc, _Refused):
        return line, reason
    return line, f"invalid YAML: {reason}" if reason else "invalid YAML"


def compose_yaml(text: str, name: str) -> YamlDoc | None:
    """``text`` as a ``YamlDoc`` (safe loading, policy above), or None when it holds no document.

    Raises ``MappingError`` naming ``name:line`` for invalid YAML and for what the policy refuses.
    """
    loader = None
    try:
        loader = _PolicyLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(name, node)
        return YamlDoc(name, loader.construct_document(node), node)
    except yaml.YAMLError as exc:
        line, problem = _problem(exc, text)
        raise MappingError(bounded(f"{name}:{line}: {problem}")) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_duplicate_keys(name: str, node: yaml.Node) -> None:
    """YAML silently keeps the last of two equal keys; in a mapping that hides a whole bucket."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen:
                    raise MappingError(
                        bounded(f"{name}:{k.start_mark.line + 1}: duplicate key {k.value!r} (first on line {seen[k.value]})")
                    )
                seen[k.value] = k.start_mark.line + 1
            _check_duplicate_keys(name, v)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_duplicate_keys(name, v)


def read_yaml(path: Path) -> YamlDoc | None:
    """The YAML file ``path`` under this policy (see ``compose_yaml``); errors name it by its name."""
    return compose_yaml(read_yaml_text(path), path.name)


def read_yaml_text(path: Path) -> str:
    """The text of YAML file ``path``; ``MappingError`` (naming the file, not its bytes) if not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MappingError(f"{path.name}:{line}: not UTF-8 text ({exc.reason})") from None
