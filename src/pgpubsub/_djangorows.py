"""Trigger rows as Django model instances (``TriggerChannel.model``).

A trigger sends ``to_jsonb(row)``: the columns of the model's own table. The
listener gets an unsaved instance of the model with every concrete field set,
converted by the field itself (dates, decimals, UUIDs, foreign keys, JSON;
datetimes as Django reads them: UTC when ``USE_TZ``, else naive local);
fields of parent models (multi-table inheritance) live in other tables and are
read from the database when the row has a primary key that still exists there.
"""

from __future__ import annotations

import datetime
from typing import Any

__all__ = ["instance_from_row"]


def _value(field: Any, raw: Any) -> Any:
    from django.conf import settings
    from django.db import models
    from django.utils import timezone

    if raw is None:
        return None
    if isinstance(field, models.BinaryField) and isinstance(raw, str) and raw.startswith("\\x"):
        return bytes.fromhex(raw[2:])
    value = field.to_python(raw)
    if isinstance(field, models.DateTimeField) and timezone.is_aware(value):
        # As Django reads them: UTC when USE_TZ, else naive in TIME_ZONE.
        if settings.USE_TZ:
            return value.astimezone(datetime.timezone.utc)
        return timezone.make_naive(value, timezone.get_default_timezone())
    return value


def instance_from_row(model: Any, row: Any) -> Any:
    """An unsaved ``model`` instance from a row dict (None stays None; instances pass)."""
    if row is None or isinstance(row, model):
        return row
    if not isinstance(row, dict):
        raise TypeError(f"a {model.__name__} row must be a JSON object, not {type(row).__name__}")
    fields = model._meta.concrete_fields
    values = {f.attname: _value(f, row[f.column]) for f in fields if f.column in row}
    missing = [f.attname for f in fields if f.column not in row]
    pk = values.get(model._meta.pk.attname)
    if missing and pk is not None:
        stored = model._base_manager.filter(pk=pk).values(*missing).first()
        values.update(stored or {})
    return model(**values)
