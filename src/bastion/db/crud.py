"""Small generic helpers over Core tables: insert, fetch, versioned update, delete, cursor pages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.domain import ids
from bastion.errors import Conflict, NotFound, ValidationFailed, VersionMismatch

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(last_id: str) -> str:
    """A page's position: the last id it showed (ids are ordered, and public in every answer)."""
    return last_id


def decode_cursor(cursor: str) -> str:
    if not ids.ID_RE.fullmatch(cursor):
        raise ValidationFailed("cursor is not one this API returned", field="cursor")
    return cursor


def _conflict(exc: IntegrityError, what: str, unique_field: str) -> Conflict:
    return Conflict(f"a {what} with this {unique_field} already exists", field=unique_field)


async def insert(
    conn: AsyncConnection, table: sa.Table, values: Mapping[str, Any], *, what: str, unique_field: str
) -> None:
    try:
        async with conn.begin_nested():
            await conn.execute(table.insert().values(**values))
    except IntegrityError as exc:
        raise _conflict(exc, what, unique_field) from None


async def fetch_one(
    conn: AsyncConnection, table: sa.Table, *where: sa.ColumnElement[bool], what: str, ref: str | None = None
) -> sa.Row[Any]:
    """The one row matching ``where``; NotFound names ``ref`` (what the caller typed) when given."""
    row = (await conn.execute(sa.select(table).where(*where))).first()
    if row is None:
        raise NotFound(f"no such {what} {ref!r}" if ref is not None else f"no such {what}")
    return row


async def update_versioned(
    conn: AsyncConnection,
    table: sa.Table,
    row_id: str,
    expected_version: int | None,
    values: Mapping[str, Any],
    *,
    what: str,
    unique_field: str = "name",
) -> int:
    """Update one row and bump its version; ``expected_version`` (from If-Match) must still hold."""
    current = (await conn.execute(sa.select(table.c.version).where(table.c.id == row_id))).scalar_one_or_none()
    if current is None:
        raise NotFound(f"no such {what}")
    if expected_version is not None and expected_version != current:
        raise VersionMismatch(f"the {what} changed since you read it (version {current}, you sent {expected_version})")
    try:
        async with conn.begin_nested():
            result = await conn.execute(
                table.update()
                .where(table.c.id == row_id, table.c.version == current)
                .values(**values, version=current + 1)
            )
    except IntegrityError as exc:
        raise _conflict(exc, what, unique_field) from None
    if result.rowcount != 1:
        raise VersionMismatch(f"the {what} changed while you were updating it; read it again")
    return current + 1


async def delete(
    conn: AsyncConnection, table: sa.Table, row_id: str, *, what: str, in_use: str = "it is still in use"
) -> None:
    try:
        async with conn.begin_nested():
            result = await conn.execute(table.delete().where(table.c.id == row_id))
    except IntegrityError:
        raise Conflict(f"cannot delete this {what}: {in_use}") from None
    if result.rowcount != 1:
        raise NotFound(f"no such {what}")


async def page(
    conn: AsyncConnection,
    table: sa.Table,
    where: Sequence[sa.ColumnElement[bool]],
    *,
    cursor: str | None,
    limit: int | None,
) -> tuple[list[sa.Row[Any]], str | None]:
    size = DEFAULT_PAGE_SIZE if limit is None else limit
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ValidationFailed(f"limit must be between 1 and {MAX_PAGE_SIZE}", field="limit")
    query = sa.select(table).where(*where)
    if cursor is not None:
        query = query.where(table.c.id > decode_cursor(cursor))
    rows = list((await conn.execute(query.order_by(table.c.id).limit(size + 1))).all())
    if len(rows) > size:
        return rows[:size], encode_cursor(rows[size - 1].id)
    return rows, None
