"""Table names as data: the (schema, table) pair, never the ambiguous ``schema.table`` string.

``"s.x".t`` and ``s."x.t"`` are different tables whose dotted strings are equal, so
everything keys on :class:`TableName`. Users write names as SQL does: ``schema.table``,
``table`` (schema ``public``), and double quotes for names with dots, capitals or spaces
(``"Sales.EU"."Order Items"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cdc.errors import ConfigError

_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


def quote_ident(name: str) -> str:
    """``name`` as SQL writes it: bare when it is a plain lower-case identifier."""
    return name if _PLAIN.match(name) else '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, order=True)
class TableName:
    schema: str
    table: str

    def display(self) -> str:
        """``schema.table``, each part quoted where SQL would need it (parseable again)."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    def sql(self) -> str:
        return self.display()

    def option(self) -> str:
        """The name as an ``--exclude-tables`` value (shell-quoted when it needs quotes)."""
        text = self.display()
        return text if '"' not in text and " " not in text else "'" + text.replace(
            "'", "'\\''") + "'"


def _split(text: str) -> list[str]:
    """Split on commas and dots outside double quotes; keep the quotes for unquoting."""
    parts, current, quoted, i = [], "", False, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if quoted and text[i + 1:i + 2] == '"':
                current += '""'
                i += 2
                continue
            quoted = not quoted
            current += ch
        elif ch in ",." and not quoted:
            parts.append(current)
            parts.append(ch)
            current = ""
        else:
            current += ch
        i += 1
    if quoted:
        raise ConfigError(f"unbalanced double quote in table name {text!r}",
                          fix='close the quote, e.g. "Sales.EU"."Order Items"')
    parts.append(current)
    return parts


def _unquote(part: str, whole: str) -> str:
    part = part.strip()
    if len(part) >= 2 and part[0] == part[-1] == '"':
        return part[1:-1].replace('""', '"')
    if not part or '"' in part:
        raise ConfigError(f"table name {whole!r} is not schema.table",
                          fix='write schema.table, quoting parts with dots: "a.b".c')
    return part.lower() if _PLAIN.match(part.lower()) else part


def parse_table_list(items: Iterable[str]) -> list[TableName]:
    """Table names as users write them (each item may hold several, comma-separated)."""
    names: list[TableName] = []
    for item in items:
        parts = _split(item)
        current: list[str] = []
        for part in [*parts, ","]:
            if part == ",":
                if any(p.strip() for p in current if p != "."):
                    names.append(_one(current, item))
                current = []
            else:
                current.append(part)
    return names


def _one(parts: list[str], whole: str) -> TableName:
    idents = [p for p in parts if p != "."]
    if len(idents) == 1:
        return TableName("public", _unquote(idents[0], whole))
    if len(idents) == 2:
        return TableName(_unquote(idents[0], whole), _unquote(idents[1], whole))
    raise ConfigError(f"table name {whole!r} is not schema.table",
                      fix='write schema.table, quoting parts with dots: "a.b".c')


def split_table_list(text: str) -> list[str]:
    """``a.b, "x,y".z`` → ``["a.b", '"x,y".z']``: split on commas outside double quotes."""
    items: list[str] = []
    current: list[str] = []
    for part in _split(text):
        if part == ",":
            items.append("".join(current).strip())
            current = []
        else:
            current.append(part)
    items.append("".join(current).strip())
    return [item for item in items if item]


def parse_table_name(text: str) -> TableName:
    names = parse_table_list([text])
    if len(names) != 1:
        raise ConfigError(f"{text!r} is not one schema.table name",
                          fix='write schema.table, quoting parts with dots: "a.b".c')
    return names[0]
