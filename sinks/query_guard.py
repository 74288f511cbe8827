"""What user SQL may do on the analytics store, decided by ClickHouse itself.

User SQL (POST /query, `sluice analytics` without a running sink) is never
matched with regular expressions. It goes through three steps, all of them
ClickHouse's own machinery:

1. `formatQuery({sql:String})`, with the text bound as a query parameter:
   ClickHouse's parser reads exactly one statement (a second one is a syntax
   error, not a second query) and prints it back. Only that canonical text is
   explained and run, so what was checked is what runs.
2. `EXPLAIN AST` of the canonical text: the root must be one SELECT (a UNION
   or WITH is fine) with nothing attached to it (no INTO OUTFILE, which the
   embedded engine would write as the sink's user; no FORMAT; no SETTINGS),
   no SETTINGS anywhere inside (the budget below is not the user's to raise),
   no table function outside a small set that only makes data up or reads
   local tables, and no scalar function that reads files or reaches the
   network (`file`, the AI and dictionary families, ...). Which names are
   table functions and which scalar functions belong to those families comes
   from `system.table_functions` and `system.functions` at start, so a
   table function added in a later ClickHouse is refused until allowed here.
3. The run itself under ClickHouse's `readonly = 1` (no writes, no DDL, no
   setting changes, no file or network table function: the engine refuses
   them even if step 2 missed one) and the query budget: execution time, rows
   and bytes read, memory, result rows, threads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sinks.errors import QueryError

# Table functions that invent rows or read tables of this server, nothing else.
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generate_series",
        "generateseries",
        "generaterandom",
        "values",
        "view",
        "merge",
        "null",
        "format",
    }
)
# Families of scalar functions (system.functions.categories) that call out of
# the query: a model provider (AI), dictionary sources (files, HTTP, other
# databases), the server's binary (Introspection), model files (Machine Learning).
DENIED_CATEGORIES = ("AI", "Dictionary", "Embedded Dictionary", "Introspection", "Machine Learning")
# Scalar functions outside those families that read files, open connections
# or write state: `file` reads any file the sink's user can, `hasColumnInTable`
# takes a host to connect to, `generateSerialID` writes to Keeper.
DENIED_FUNCTIONS = frozenset(
    {
        "file",
        "hascolumnintable",
        "generateserialid",
        "showcertificate",
        "catboostevaluate",
        "getclienthttpheader",
        "zookeepersessionuptime",
    }
)

_CATALOG_SQL = (
    "SELECT 't', name FROM system.table_functions UNION ALL "
    "SELECT 'f', name FROM system.functions WHERE categories IN ({cats}) OR alias_to IN "
    "(SELECT name FROM system.functions WHERE categories IN ({cats}))"
).format(cats=", ".join(f"'{c}'" for c in DENIED_CATEGORIES))
_FUNCTION = re.compile(r"^\s*Function (\S+)", re.MULTILINE)
_SET = re.compile(r"^\s*Set\b", re.MULTILINE)


@dataclass(frozen=True)
class QueryBudget:
    """What one user query may use; enforced by ClickHouse, not by us."""

    max_execution_s: float = 10.0
    max_rows_to_read: int = 500_000_000
    max_bytes_to_read: int = 8 << 30
    max_memory_bytes: int = 1 << 30
    max_result_rows: int = 100_000
    max_threads: int = 1

    def settings(self) -> dict[str, Any]:
        """ClickHouse settings, `readonly` last: once it is 1 no setting can change."""
        return {
            "max_execution_time": self.max_execution_s,
            "max_rows_to_read": self.max_rows_to_read,
            "max_bytes_to_read": self.max_bytes_to_read,
            "max_memory_usage": self.max_memory_bytes,
            "max_result_rows": self.max_result_rows,
            "result_overflow_mode": "throw",
            "max_threads": self.max_threads,
            "readonly": 1,
        }


class QueryGuard:
    """Checks an `EXPLAIN AST` dump against the catalog read at start."""

    CATALOG_SQL = _CATALOG_SQL

    def __init__(self, table_functions: Iterable[str], denied_scalars: Iterable[str]) -> None:
        self.denied_tables = {n.lower() for n in table_functions} - ALLOWED_TABLE_FUNCTIONS
        self.denied_scalars = {n.lower() for n in denied_scalars} | DENIED_FUNCTIONS

    @classmethod
    def from_catalog(cls, rows: Iterable[tuple[Any, ...]]) -> QueryGuard:
        """From the rows of CATALOG_SQL: ('t', table function) and ('f', denied scalar)."""
        rows = list(rows)
        return cls([str(n) for k, n in rows if k == "t"], [str(n) for k, n in rows if k == "f"])

    def check(self, ast: str) -> None:
        """QueryError unless the dump is one plain SELECT that stays inside the database."""
        root = ast.lstrip().split("\n", 1)[0].strip()
        if not root.startswith("SelectWithUnionQuery"):
            raise QueryError(f"only SELECT queries are allowed (got {root.split(' ', 1)[0]})")
        if root != "SelectWithUnionQuery (children 1)":
            raise QueryError("INTO OUTFILE, FORMAT and SETTINGS clauses are not allowed")
        if _SET.search(ast):
            raise QueryError("SETTINGS are not allowed: the query budget is fixed by the sink")
        for name in _FUNCTION.findall(ast):
            if name.lower() in self.denied_tables or name.lower() in self.denied_scalars:
                raise QueryError(f"{name}() is not allowed here: it can read files or reach the network")


def vet(sql: str, canonical: Callable[[str], str], explain: Callable[[str], str], guard: QueryGuard) -> str:
    """The canonical text of `sql` once it passed the guard; QueryError otherwise."""
    if not sql.strip():
        raise QueryError("empty query")
    text = canonical(sql)
    if not text.strip():
        raise QueryError("empty query")
    guard.check(explain(text))
    return text
