"""The one exception the data layer raises for bad input.

Every check on user data (loading, schema detection, validation, tokenization) raises :class:`DataError`,
so a bad row stops the run before training starts, with a message that names the source, the row and the
field and says what was expected:

>>> err = DataError("expected non-empty text or list of messages, got None",
...                 source="data.jsonl", row=3, line=4, field="chosen")
>>> str(err)
"data.jsonl: row 3 (line 4), field 'chosen': expected non-empty text or list of messages, got None"
>>> isinstance(err, ValueError), err.row, err.field
(True, 3, 'chosen')
"""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad input data, located as precisely as possible.

    Args:
        message: what was expected and what was found, e.g. ``"expected a finite number, got nan"``.
        source: where the data came from (a file path as given, ``"rows"``, ``"dataset"``, a Hub name).
        row: 0-based index of the offending row in the source, if the problem is in one row.
        field: the column (as named in the source) that holds the bad value, if one does.
        line: 1-based line number in a JSON Lines file.
        reason: a short category used to group dropped rows in a ``ValidationReport``
            (e.g. ``"empty text"``); defaults to the message.

    The location is part of ``str(err)`` but each piece is also an attribute, and the data layer fills in
    ``source``/``row``/``line`` after a field check raised, so the constructor only needs what is known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.row = row
        self.field = field
        self.line = line
        self.reason = reason or message

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        location = ", ".join(where)
        prefix = ": ".join(p for p in (self.source, location) if p)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only attributes survive pickling (e.g. Dataset.map with num_proc > 1)
        return (_rebuild, (self.message, self.source, self.row, self.field, self.line, self.reason))


def _rebuild(message: str, source: Any, row: Any, field: Any, line: Any, reason: Any) -> DataError:
    return DataError(message, source=source, row=row, field=field, line=line, reason=reason)
