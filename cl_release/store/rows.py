"""Reading records with their latest feedback: :meth:`FeedbackStore.rows` returns a
:class:`StoreRows`, which streams row dicts or, for a large read (the data build), the same
records as tuples of the columns a caller names.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, Iterator, Sequence

from .queries import LATEST, SELECT_ROWS, SINCE, row_dict, size_hint
from .values import bound

if TYPE_CHECKING:
    from .sqlite import FeedbackStore


def select_rows(
    store: "FeedbackStore",
    *,
    since: str | datetime | date | None = None,
    until: str | datetime | date | None = None,
    model_version: str | None = None,
    has_feedback: bool | None = None,
    unused_by: Iterable[str] | None = None,
    after: tuple[str, str] | None = None,
    limit: int | None = None,
) -> "StoreRows":
    """:meth:`FeedbackStore.rows` (see there) of ``store``."""
    where, params = [], []
    s = u = None
    if since is not None:
        s = bound(since, "since")
        where.append(SINCE)
        params += [s, s]
    if until is not None:
        u = bound(until, "until")
        where.append("r.created_at < ?")
        params.append(u)
    if model_version is not None:
        where.append("r.model_version = ?")
        params.append(model_version)
    if has_feedback is not None:
        where.append(("" if has_feedback else "NOT ") + "EXISTS (SELECT 1 FROM feedback f3 WHERE f3.request_id = r.id)")
    if unused_by is not None:
        vs = list(unused_by)
        if vs:
            where.append("NOT EXISTS (SELECT 1 FROM release_usage u WHERE u.request_id = r.id"
                         f" AND u.version IN ({', '.join('?' * len(vs))})"
                         " AND (u.read_at IS NULL OR f.created_at IS NULL OR f.created_at < u.read_at))")
            params += vs
    if after is not None:
        where.append("(r.created_at, r.id) > (?, ?)")
        params += list(after)
    return StoreRows(store, " AND ".join(where), params, None if limit is None else int(limit), (s, u))


class StoreRows:
    """What :meth:`FeedbackStore.rows` returns: an iterator over the row dicts (keys
    :data:`ROW_KEYS`, oldest first), which also holds its query.

    The dicts cost most of a large read (every column, ``input`` and ``metadata`` parsed, a
    dict per row, and the sort): :meth:`select` reads the same records as tuples of the
    columns a caller names, unordered, at a fraction of that.
    """

    def __init__(self, store: "FeedbackStore", where: str, params: list[Any], limit: int | None,
                 window: tuple[str | None, str | None] = (None, None)):
        self.store = store
        self._window = window  # (since, until) as given to rows(), normalized
        self._where = where  # the filters, joined with AND ("" for none)
        self._params = params
        self._limit = limit
        self._dicts: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._dicts is None:
            self._dicts = self._read()
        return self._dicts  # the generator itself: no Python call per row on top

    def __next__(self) -> dict[str, Any]:
        return next(iter(self))

    def close(self) -> None:
        """Stop early: closes the read connection (as closing a generator would)."""
        if self._dicts is None:
            self._dicts = iter(())
        else:
            self._dicts.close()

    def _read(self) -> Iterator[dict[str, Any]]:
        sql = SELECT_ROWS + (f" WHERE {self._where}" if self._where else "") + " ORDER BY r.created_at, r.id"
        if self._limit is not None:
            sql += f" LIMIT {self._limit}"
        conn = self.store.reader()
        try:
            cur = conn.execute(sql, self._params)
            while True:
                chunk = cur.fetchmany(1000)
                if not chunk:
                    break
                for t in chunk:
                    yield row_dict(t)
        finally:
            conn.close()

    def select(
        self,
        columns: str,
        params: Sequence[Any] = (),
        *,
        keep: tuple[str, Sequence[Any], Callable[[Any], Any]] | None = None,
        created: tuple[str | None, str | None] = (None, None),
        ordered: bool = False,
    ) -> Generator[list[tuple], None, None] | None:
        """The same records as tuples of ``columns``, in chunks, in no particular order (unless ``ordered``).

        ``columns`` is an SQL select list over ``r`` (the ``records`` row) and ``f`` (its
        latest ``feedback`` row, as in :meth:`FeedbackStore.rows`; all NULL when it has
        none); ``params`` fill its ``?`` placeholders. Nothing is parsed: ``r.input`` is its
        JSON text.

        ``keep``: ``(expression, its params, fn)``: only the records for which ``fn`` of the
        expression's value is true come back. ``fn`` is called exactly once for each record
        the query selects (the filters are checked first, whatever order SQLite evaluates
        its WHERE terms in), so it can count what it drops: a Python call costs less than a
        row sent back.

        ``created``: ``(low, high)``: only the records created at or after ``low`` and
        before ``high`` (None: no bound). Consecutive ranges (see :meth:`created_bounds`)
        split a selection into disjoint parts that several processes can read at once
        (``extract.build`` does). ``ordered``: in ``rows()``'s order, (created_at, id), sorted
        by SQLite after the filters (a sort of what comes back, not a walk of an index).

        None where this would not be the same set of records: with a ``limit`` (which takes
        the oldest), or once the dicts have been read from. Each call is a read of its own
        (and leaves the dicts unread).
        """
        if not self.selectable:
            return None
        where, where_params = self._where, list(self._params)
        low, high = created
        if high is not None:  # unary +: still a scan of the table, not of created_at's index
            where, where_params = "+r.created_at < ?" + (f" AND {where}" if where else ""), [high, *where_params]
        if low is not None:
            where, where_params = "+r.created_at >= ?" + (f" AND {where}" if where else ""), [low, *where_params]
        sql = f"SELECT {columns} FROM records r LEFT JOIN {LATEST}"
        args = [*params]
        if where:
            sql += f" WHERE {where}"
            args += where_params
        if keep is not None:
            expr, expr_params, fn = keep
            if where:  # fn only sees rows that pass the filters
                sql += f" AND CASE WHEN {where} THEN cl_keep({expr}) END"
                args += where_params
            else:
                sql += f" WHERE cl_keep({expr})"
            args += expr_params
        if ordered:  # unary +: SQLite sorts the rows it selected instead of walking an index
            sql += " ORDER BY +r.created_at, r.id"
        return self._select(sql, args, None if keep is None else keep[2])

    @property
    def selectable(self) -> bool:
        """Whether :meth:`select` reads the same records (no ``limit``, dicts not read)."""
        return self._limit is None and self._dicts is None

    def size_hint(self) -> int:
        """At most how many records the selection holds (the table's largest rowid; instant)."""
        return size_hint(self.store.conn)

    def created_bounds(self, parts: int) -> list[str]:
        """``parts - 1`` created_at values that split the records created in the selection's
        ``since``/``until`` window into ``parts`` ranges of about equal size (ascending; equal
        values where many records share one time). From created_at's index: milliseconds."""
        since, until = self._window
        where = " AND ".join(c for c, v in (("created_at >= ?", since), ("created_at < ?", until)) if v is not None)
        args = [v for v in (since, until) if v is not None]
        where = f" WHERE {where}" if where else ""
        conn = self.store.conn
        total = conn.execute(f"SELECT count(*) FROM records{where}", args).fetchone()[0]
        bounds = []
        for k in range(1, parts):
            row = conn.execute(f"SELECT created_at FROM records{where} ORDER BY created_at LIMIT 1 OFFSET ?",
                               [*args, total * k // parts]).fetchone()
            if row is None:
                break
            bounds.append(row[0])
        return bounds

    def _select(
        self, sql: str, params: list[Any], keep: Callable[[Any], Any] | None
    ) -> Generator[list[tuple], None, None]:
        conn = self.store.reader()
        try:
            if keep is not None:
                conn.create_function("cl_keep", 1, keep)
            cur = conn.execute(sql, params)
            while True:
                chunk = cur.fetchmany(2000)
                if not chunk:
                    break
                yield chunk
        finally:
            conn.close()
