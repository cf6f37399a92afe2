"""Time, in one place: what now is, how times are parsed, and the two forms they are written in.

- The feedback store's form: ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, microseconds; string order
  is time order): :func:`store_now`, :func:`timestamp`, :func:`store_time`.
- The registry's form: ``YYYY-MM-DDTHH:MM:SSZ``: :func:`registry_now`, :func:`registry_time`.
- Aware UTC datetimes for arithmetic: :func:`utc`, :func:`parse_time`.

Naive values are UTC unless a time zone says otherwise (:func:`time_zone`: an IANA name,
``local`` or ``UTC``). Functions that take ``now`` let tests drive the clock.
"""

from __future__ import annotations

import datetime as _dt
import re
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import FieldValueError, UserError

_CANONICAL_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?(Z|\+00:00)?", re.ASCII).fullmatch
_fromisoformat = datetime.fromisoformat


# ---------------------------------------------------------------- now


def utc(now: _dt.datetime | None = None) -> _dt.datetime:
    """``now`` as an aware UTC datetime (naive is taken as UTC); None: the real clock."""
    if now is None:
        return _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=_dt.timezone.utc)
    return now.astimezone(_dt.timezone.utc)


def store_now() -> str:
    """Now, in the feedback store's form (microseconds)."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def registry_now() -> str:
    """Now, in the registry's form (seconds)."""
    return registry_time(utc())


# ---------------------------------------------------------------- formats


def store_time(t: _dt.datetime) -> str:
    """The store's form of ``t`` (``YYYY-MM-DDTHH:MM:SS.ffffffZ``, sorts as time)."""
    return utc(t).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def registry_time(t: _dt.datetime) -> str:
    """The registry's form of ``t`` (``YYYY-MM-DDTHH:MM:SSZ``)."""
    return utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> _dt.datetime:
    """A registry or store timestamp ('...Z') as an aware UTC datetime."""
    return utc(_dt.datetime.fromisoformat(text.replace("Z", "+00:00")))


# ---------------------------------------------------------------- parsing what users and logs give


def timestamp(value: Any, *, field: str = "created_at", tz: tzinfo | None = None) -> str:
    """Normalize a datetime, date, ISO-8601 string or epoch seconds to the store's form.

    Naive datetimes, dates and strings without an offset are read in ``tz`` (None: UTC); a
    value with an offset is converted exactly. ``None`` means now. A value that is no time is
    a :class:`~cl_release.errors.FieldValueError` naming ``field``.
    """
    return utc_time(value, field=field, tz=tz)[0]


def utc_time(value: Any, *, field: str = "created_at", tz: tzinfo | None = None) -> tuple[str, bool]:
    """:func:`timestamp`, and whether ``value`` was naive (a time without a UTC offset)."""
    if value is None:
        return store_now(), False
    if isinstance(value, str):
        # Fast path for the canonical UTC shapes (YYYY-MM-DDTHH:MM:SS[.ffffff][Z|+00:00]): the
        # string already is the result; fromisoformat still validates the field ranges.
        m = _CANONICAL_TS(value)
        if m is not None and (tz is None or m[2]):
            try:
                _fromisoformat(value)
            except ValueError:
                raise FieldValueError(f"not an ISO-8601 date or time: {value!r}", field) from None
            return value[:19] + (m[1] or ".000000") + "Z", not m[2]
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise FieldValueError(f"not an ISO-8601 date or time: {value!r}", field) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise FieldValueError(f"epoch timestamp out of range: {value!r}", field) from None
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise FieldValueError(f"expected a timestamp, got {type(value).__name__}", field)
    naive = value.tzinfo is None
    if naive and tz is not None:
        value = value.replace(tzinfo=tz)
    if value.tzinfo is not None:
        try:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:
            raise FieldValueError(f"out of range in UTC: {value.isoformat()}", field) from None
    return value.isoformat(timespec="microseconds") + "Z", naive


def normalize_time(value: str | _dt.datetime | _dt.date) -> str:
    """A date or ISO time typed by a user (``--since``) -> the store's form; naive is UTC. A bad
    value is a :class:`UserError` with the forms that work."""
    try:
        return timestamp(value.strip() if isinstance(value, str) else value)
    except FieldValueError:
        raise UserError(f"invalid date or time {value!r}",
                        hint="use YYYY-MM-DD or an ISO time like 2026-01-31T12:00:00Z") from None


def time_zone(name: str | None) -> tzinfo | None:
    """How to read naive times: ``None``/``"UTC"`` (None), ``"local"`` (this machine's zone)
    or an IANA name such as ``Europe/Athens``. An unknown name is a :class:`UserError`."""
    if name is None or name.upper() in ("UTC", "Z"):
        return None
    if name == "local":
        return _LocalZone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"unknown time zone {name!r}",
                        hint="use an IANA name such as Europe/Athens, 'local' or 'UTC'") from None


class _LocalZone(tzinfo):
    """This machine's time zone, with its daylight-saving rules (what ``datetime.now()`` wrote)."""

    def _offset(self, dt: datetime) -> timedelta:
        return dt.replace(tzinfo=None).astimezone().utcoffset()  # naive.astimezone(): local rules

    def utcoffset(self, dt: datetime | None) -> timedelta:
        return self._offset(dt) if dt is not None else datetime.now().astimezone().utcoffset()

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "local"

    def __repr__(self) -> str:
        return "local"
