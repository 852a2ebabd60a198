"""MongoDB filter documents, translated to SQL for the SQLite store.

The SQLite store keeps each document as JSON (plus `_id` and `time` columns) and
answers the common query operators the way MongoDB does on our documents
(scalars and sub-documents, no arrays):

    $eq $ne $gt $gte $lt $lte $in $nin $exists $and $or

MongoDB only compares values of the same type bracket (a number is never
"greater" than a string), and `$ne`/`$nin` match documents that lack the field;
the translation keeps both rules. Anything else is rejected with a clear
`BadFilter` naming the operator and the key path.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from megafleet.collect.docs import datetime_to_ms, ms_to_datetime

SUPPORTED = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists",
             "$and", "$or")
_COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_PART_RE = re.compile(r"[A-Za-z0-9_-]+")


class BadFilter(ValueError):
    pass


def _json_path(field: str) -> str:
    parts = field.split(".")
    for part in parts:
        if not _PART_RE.fullmatch(part):
            raise BadFilter(f"filter key {field!r}: each part of a dotted key must be "
                            "letters, digits, '_' or '-'")
    return "$" + "".join(f'."{p}"' for p in parts)


class _Translator:
    """Builds one SQL boolean expression (never NULL) and its parameters."""

    def __init__(self) -> None:
        self.args: list[Any] = []

    def top(self, flt: Any, where: str = "filter") -> str:
        if not isinstance(flt, dict):
            raise BadFilter(f"{where}: a filter must be a document ({{...}}), got {flt!r}")
        if not flt:
            return "1"
        terms = []
        for key, value in flt.items():
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise BadFilter(f"{where}.{key}: needs a non-empty list of filters")
                subs = [self.top(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
                joiner = " AND " if key == "$and" else " OR "
                terms.append("(" + joiner.join(subs) + ")")
            elif key.startswith("$"):
                raise BadFilter(f"{where}: operator {key} is not supported by the SQLite "
                                f"store (supported: {' '.join(SUPPORTED)})")
            else:
                terms.append(self.field(key, value))
        return "(" + " AND ".join(terms) + ")"

    def field(self, key: str, value: Any) -> str:
        if isinstance(value, dict) and any(k.startswith("$") for k in value):
            terms = []
            for op, operand in value.items():
                if not op.startswith("$"):
                    raise BadFilter(f"filter key {key!r}: cannot mix operators and fields "
                                    f"in one document ({op!r})")
                terms.append(self.operator(key, op, operand))
            return "(" + " AND ".join(terms) + ")"
        return self.equal(key, value)

    # -- one operator on one key ------------------------------------------------

    def operator(self, key: str, op: str, operand: Any) -> str:
        if op == "$eq":
            return self.equal(key, operand)
        if op == "$ne":
            return f"(NOT {self.equal(key, operand)})"
        if op in _COMPARE:
            return self.compare(key, _COMPARE[op], operand, op)
        if op in ("$in", "$nin"):
            if not isinstance(operand, list):
                raise BadFilter(f"filter key {key!r}: {op} needs a list, got {operand!r}")
            if not operand:
                inside = "0"
            else:
                inside = "(" + " OR ".join(self.equal(key, v) for v in operand) + ")"
            return inside if op == "$in" else f"(NOT {inside})"
        if op == "$exists":
            present = self.presence(key)
            return present if bool(operand) else f"(NOT {present})"
        raise BadFilter(f"filter key {key!r}: operator {op} is not supported by the SQLite "
                        f"store (supported: {' '.join(SUPPORTED)})")

    def _column(self, key: str) -> str | None:
        return {"_id": "id", "time": "time_ms"}.get(key)

    def presence(self, key: str) -> str:
        if self._column(key):
            return "1"
        self.args.append(_json_path(key))
        return "(json_type(doc, ?) IS NOT NULL)"

    def _time_operand(self, key: str, value: Any) -> int:
        if not isinstance(value, datetime):
            raise BadFilter(f"filter key {key!r}: compare time with a date, e.g. "
                            '{"$date": "2026-01-01T00:00:00Z"}, got ' + repr(value))
        return datetime_to_ms(value)

    def equal(self, key: str, value: Any) -> str:
        column = self._column(key)
        if column == "time_ms":
            self.args.append(self._time_operand(key, value))
            return "(time_ms = ?)"
        if column == "id":
            if not isinstance(value, str):
                return "0"  # our ids are strings: nothing else can be equal
            self.args.append(value)
            return "(id = ?)"
        path = _json_path(key)
        if value is None:  # MongoDB: null matches null and missing
            self.args.append(path)
            return "(COALESCE(json_type(doc, ?), 'null') = 'null')"
        if isinstance(value, bool):
            self.args.append(path)
            return f"(COALESCE(json_type(doc, ?) = '{'true' if value else 'false'}', 0))"
        if isinstance(value, (int, float)):
            self.args += [path, path, value]
            return ("(COALESCE(json_type(doc, ?) IN ('integer', 'real') "
                    "AND json_extract(doc, ?) = ?, 0))")
        if isinstance(value, str):
            self.args += [path, path, value]
            return "(COALESCE(json_type(doc, ?) = 'text' AND json_extract(doc, ?) = ?, 0))"
        raise BadFilter(f"filter key {key!r}: the SQLite store compares numbers, strings, "
                        f"booleans and null; not {type(value).__name__} {value!r}")

    def compare(self, key: str, sql_op: str, value: Any, op: str) -> str:
        column = self._column(key)
        if column == "time_ms":
            self.args.append(self._time_operand(key, value))
            return f"(time_ms {sql_op} ?)"
        if column == "id":
            if not isinstance(value, str):
                return "0"
            self.args.append(value)
            return f"(id {sql_op} ?)"
        path = _json_path(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadFilter(f"filter key {key!r}: {op} takes a number or a string in the "
                            f"SQLite store, got {value!r}")
        types = "('integer', 'real')" if not isinstance(value, str) else "('text')"
        self.args += [path, path, value]
        return (f"(COALESCE(json_type(doc, ?) IN {types} "
                f"AND json_extract(doc, ?) {sql_op} ?, 0))")


def to_sql(flt: dict[str, Any]) -> tuple[str, list[Any]]:
    """(where-expression, parameters) for a MongoDB filter document."""
    t = _Translator()
    sql = t.top(flt)
    return sql, t.args


def _date_hook(obj: dict[str, Any]) -> Any:
    """{"$date": "ISO"} or {"$date": milliseconds} -> datetime (naive UTC); every
    other document stays as it is (so "$regex" stays an operator and is judged
    by the store, not turned into a value)."""
    if len(obj) == 1 and "$date" in obj:
        value = obj["$date"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return ms_to_datetime(int(value))
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise BadFilter(f'{{"$date": {value!r}}}: not an ISO date') from None
            return ms_to_datetime(datetime_to_ms(parsed))
        raise BadFilter(f'{{"$date": {value!r}}}: give an ISO date string or milliseconds')
    return obj


def parse_filter_text(text: str, where: str = "--filter") -> dict[str, Any]:
    """A filter typed by a user: JSON, with {"$date": ...} for dates."""
    try:
        value = json.loads(text, object_hook=_date_hook)
    except ValueError as exc:
        if isinstance(exc, BadFilter):
            raise BadFilter(f"{where}: {exc}") from None
        raise BadFilter(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BadFilter(f"{where}: a filter must be a JSON object, got {text!r}")
    return value
