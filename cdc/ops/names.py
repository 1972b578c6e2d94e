"""Names other engines see: DuckDB views (``cdc query``) and Athena tables (``cdc ddl``).

Both derive from the tables' real names (decoded from their lake segments), never from
the folder names:

- DuckDB: the view of staged ``"Sales.EU"."Order Items"`` is ``"Sales.EU"."Order Items"``
  (raw history: ``"raw_Sales.EU"."Order Items"``). DuckDB identifiers ignore case, so when
  two views would differ only in case (``public."Foo"`` and ``public.foo``) the one spelled
  exactly in lower case keeps its name (a staged view before a raw one) and the others are
  registered under their lake segment's table part (``public."-46oo"``): an escaped,
  lower-case, injective spelling. (A staged table of schema ``raw_public`` meeting the raw
  view of ``public`` with the same table name gets ``"staged.raw_public.t"``.)
- Athena (Glue) names allow only ``[a-z0-9_]``: ordinary names are ``<schema>__<table>``
  (``public__invoice``; raw: ``raw_public__invoice``, history: ``history_public__invoice``);
  any other name, one holding ``__``, or a staged one whose schema starts with ``raw_`` or
  ``history_``, becomes its lower-cased name with every other character written ``_``, then
  ``__h`` and 10 hex digits of the SHA-256 of its segment (``sales_eu__order_items__h…``).
  An ordinary rendering holds exactly one ``__`` and a hashed one at least two, so they
  never meet; two hashed names meet only if 40 bits of SHA-256 collide.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import structlog

from cdc.lake.layout import segment_table

log = structlog.get_logger("cdc.ops.names")

_PLAIN = re.compile(r"^[a-z0-9_]+$")


RAW_PREFIX = "raw_"
HISTORY_PREFIX = "history_"
LAYER_PREFIX = {"staged": "", "raw": RAW_PREFIX, "history": HISTORY_PREFIX}


def view_map(staged: Iterable[str], raw: Iterable[str], history: Iterable[str] = ()
             ) -> dict[tuple[str, str], tuple[str, str]]:
    """(``staged``, ``raw`` or ``history``, lake segment) → (DuckDB schema, view name),
    collision-free under DuckDB's case rules (raw and history views' schemas get the
    ``raw_`` / ``history_`` prefix)."""
    names: dict[tuple[str, str], tuple[str, str]] = {}
    for layer, segments in (("staged", staged), ("raw", raw), ("history", history)):
        for seg in segments:
            name = segment_table(seg)
            if name is not None:
                names[(layer, seg)] = (LAYER_PREFIX[layer] + name.schema, name.table)
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for item, (schema, table) in sorted(names.items()):
        groups.setdefault((schema.lower(), table.lower()), []).append(item)
    result: dict[tuple[str, str], tuple[str, str]] = {}
    taken: set[tuple[str, str]] = set()
    fallback: list[tuple[str, str]] = []
    for key, items in groups.items():
        keep = next((i for i in items if names[i] == key and i[0] == "staged"),
                    next((i for i in items if names[i] == key), items[0]))
        result[keep] = names[keep]
        taken.add(key)
        fallback += [i for i in items if i != keep]
    for item in fallback:
        schema, table = names[item]
        layer, seg = item
        alt = seg.split(".")[1] if seg.count(".") == 1 else seg  # the escaped table part
        if alt == table.lower():  # already lower case: it met a raw_ schema
            alt = f"{layer}.{seg}"
        if (schema.lower(), alt) in taken:  # only a table literally named like it
            log.warning("view_skipped", table=seg, reason="its name and its fallback name "
                        "are both taken (DuckDB ignores case)")
            continue
        taken.add((schema.lower(), alt))
        result[item] = (schema, alt)
    return result


def athena_name(segment: str, *, raw: bool = False, history: bool = False) -> str:
    """A lake table's Athena (Glue) table name; see the module doc for the mapping."""
    name = segment_table(segment)
    prefix = RAW_PREFIX if raw else HISTORY_PREFIX if history else ""
    if name is None:
        raise ValueError(f"{segment!r} is not a table segment")
    plain = all(_PLAIN.match(p) and "__" not in p for p in (name.schema, name.table))
    if plain and (prefix or not name.schema.startswith((RAW_PREFIX, HISTORY_PREFIX))):
        return f"{prefix}{name.schema}__{name.table}"  # (raw_public__t is raw's, not staged's)
    clean = "__".join(re.sub(r"[^a-z0-9_]", "_", p.lower()) for p in (name.schema, name.table))
    digest = hashlib.sha256(segment.encode()).hexdigest()[:10]
    return f"{prefix}{clean[:200]}__h{digest}"
