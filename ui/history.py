"""The verdict history: one SQLite row per verdict, its columns derived from the contract's Verdict record,
searched by time range, line, agent, camera, verdict and model, and exported as CSV.

Columns follow Verdict's fields in order; the nested latency_ms becomes one column per stage
(`latency_ms_total`...). A new field in the contract therefore needs a new schema version here.
"""

from __future__ import annotations

import csv
import io
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from lineguard.agent.contract import Latency, Verdict, decode_object

_NESTED = "latency_ms"
_SKIPPED = {"v"}


def _sql_type(annotation: Any) -> str:
    """REAL for anything that may hold a float, INTEGER for ints, TEXT otherwise (literals, names)."""
    if annotation is float:
        return "REAL"
    if annotation is int:
        return "INTEGER"
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = {_sql_type(each) for each in typing.get_args(annotation) if each is not type(None)}
        return "REAL" if "REAL" in kinds else kinds.pop() if len(kinds) == 1 else "TEXT"
    return "TEXT"


def _columns() -> tuple[tuple[str, str], ...]:
    columns: list[tuple[str, str]] = []
    for name, field in Verdict.model_fields.items():
        if name in _SKIPPED:
            continue
        if name == _NESTED:
            columns += [(f"{name}_{stage}", "REAL") for stage in Latency.model_fields]
        else:
            columns.append((name, _sql_type(field.annotation)))
    return tuple(columns)


VERDICT_COLUMNS = _columns()
COLUMN_NAMES = tuple(name for name, _ in VERDICT_COLUMNS)


def verdict_row(verdict: Verdict) -> tuple[Any, ...]:
    """The verdict's values in VERDICT_COLUMNS order."""
    values: list[Any] = []
    for name in Verdict.model_fields:
        if name in _SKIPPED:
            continue
        value = getattr(verdict, name)
        if name == _NESTED:
            values += [getattr(value, stage) for stage in Latency.model_fields]
        else:
            values.append(value)
    return tuple(values)


def verdict_of_row(row: tuple[Any, ...]) -> Verdict:
    """A stored row back as the Verdict it was; ContractError if the row does not make one."""
    values: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    prefix = _NESTED + "_"
    for name, value in zip(COLUMN_NAMES, row, strict=True):
        if name.startswith(prefix) and name[len(prefix) :] in Latency.model_fields:
            latency[name[len(prefix) :]] = value
        else:
            values[name] = value
    values[_NESTED] = latency
    return decode_object(Verdict, values)


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """A search: decided between start_ts and end_ts (Unix seconds, inclusive); empty strings match anything.

    before_id: only rows stored before this row id (the next page of a newest-first listing); 0 = none.
    """

    start_ts: float
    end_ts: float
    line: str = ""
    agent_id: str = ""
    camera: str = ""
    verdict: str = ""
    model: str = ""
    before_id: int = 0

    def where(self) -> tuple[str, tuple[Any, ...]]:
        clauses = ["decided_ts >= ?", "decided_ts <= ?"]
        parameters: list[Any] = [self.start_ts, self.end_ts]
        for column, value in (
            ("line", self.line),
            ("agent_id", self.agent_id),
            ("camera", self.camera),
            ("verdict", self.verdict),
            ("model", self.model),
        ):
            if value:
                clauses.append(f"{column} = ?")
                parameters.append(value)
        if self.before_id > 0:
            clauses.append("rowid < ?")
            parameters.append(self.before_id)
        return " AND ".join(clauses), tuple(parameters)


class HistoryReader:
    """Reads the verdicts table through a Store's read-only cursor helpers."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def page(self, query: HistoryQuery, limit: int) -> tuple[list[tuple[int, Verdict]], int]:
        """(row id, verdict) pairs newest first, at most `limit`; and how many rows match in all."""
        where, parameters = query.where()
        select = f"SELECT rowid, {', '.join(COLUMN_NAMES)} FROM verdicts WHERE {where} ORDER BY rowid DESC LIMIT ?"
        rows = [(row[0], verdict_of_row(row[1:])) for row in self._store.read(select, (*parameters, limit))]
        count_where, count_parameters = replace(query, before_id=0).where()
        total = int(self._store.scalar(f"SELECT COUNT(*) FROM verdicts WHERE {count_where}", count_parameters))
        return rows, total

    def csv_lines(self, query: HistoryQuery) -> Iterator[str]:
        """The matching verdicts as CSV text, header first, oldest first, a few hundred rows per chunk."""
        where, parameters = query.where()
        select = f"SELECT {', '.join(COLUMN_NAMES)} FROM verdicts WHERE {where} ORDER BY decided_ts, rowid"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMN_NAMES)
        for count, row in enumerate(self._store.read(select, parameters), 1):
            writer.writerow(["" if value is None else value for value in row])
            if count % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()
