"""Row events of trigger channels: which exist, how each fires, what its trigger is called.

Shared by the installer without Django (:mod:`pgpubsub.triggers`) and the
django-pgtrigger triggers (:mod:`pgpubsub._djangotriggers`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from .channel import ChannelSpec

WHENS = ("BEFORE", "AFTER")
OPERATIONS = ("INSERT", "UPDATE", "DELETE")
# AFTER INSERT and AFTER DELETE triggers fire once per statement and read its
# rows from a transition table (side, name): one set-based call, not one per row.
TRANSITION = {"AFTER INSERT": ("NEW", "pgpubsub_new"), "AFTER DELETE": ("OLD", "pgpubsub_old")}


def channel_hash(spec: ChannelSpec) -> str:
    return hashlib.blake2b(spec.name.encode(), digest_size=4).hexdigest()


def trigger_name(spec: ChannelSpec, event: str) -> str:
    when, op = event.split()
    return f"pgpubsub_{when}_{op}_{channel_hash(spec)}".lower()


def model_of(spec: ChannelSpec) -> Any:
    """The Django model a trigger channel is bound to, or None."""
    return getattr(spec.cls, "model", None)
