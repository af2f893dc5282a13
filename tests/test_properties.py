"""Properties over channel names and payloads, against a real server.

Any valid name and payload round-trips byte-exact; any invalid one raises the
documented error before any SQL runs (shown by calling on a closed connection:
had SQL run, the error would be ConnectionLost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgpubsub
from pgpubsub import Channel, errors
from pgpubsub.channel import spec_of
from pgpubsub.names import MAX_NAME_BYTES, MAX_PAYLOAD_BYTES

TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
NAMES = TEXT.filter(lambda s: 0 < len(s.encode()) <= MAX_NAME_BYTES)
PAYLOADS = TEXT.filter(lambda s: len(s.encode()) <= MAX_PAYLOAD_BYTES)
BAD_NAMES = st.one_of(
    st.just(""),
    TEXT.map(lambda s: s + "\x00"),
    TEXT.filter(lambda s: len(s.encode()) > MAX_NAME_BYTES),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=10),
)
BAD_PAYLOADS = st.one_of(
    TEXT.map(lambda s: "\x00" + s),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=10),
    st.integers(1, 4000).map(lambda n: "€" * (MAX_PAYLOAD_BYTES // 3 + n)),
)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclasses.dataclass
class Text(Channel, name="properties.text"):
    text: str


@pytest.fixture
def pubsub(dsn: str) -> Iterator[pgpubsub.PubSub]:
    with pgpubsub.connect(dsn) as ps:
        yield ps


def next_event(ps: pgpubsub.PubSub) -> Any:
    return next(e for e in ps.events(select_timeout=5, yield_timeouts=True))


@SETTINGS
@given(name=NAMES, payload=PAYLOADS)
def test_connection_level_round_trips_any_valid_name_and_payload(
    pubsub: pgpubsub.PubSub, name: str, payload: str
) -> None:
    pubsub.listen(name)
    pubsub.notify(name, payload)
    event = next_event(pubsub)
    pubsub.unlisten(name)
    assert (event.channel, event.payload) == (name, payload)


@SETTINGS
@given(text=TEXT.filter(lambda s: len(s.encode()) <= 2000))
def test_typed_channel_round_trips_any_text(pubsub: pgpubsub.PubSub, text: str) -> None:
    pubsub.listen("properties.text")
    pgpubsub.notify(Text, conn=pubsub.conn, text=text)
    event = next_event(pubsub)
    assert spec_of(Text).decode(event.payload) == Text(text)


@SETTINGS
@given(name=BAD_NAMES)
def test_invalid_names_are_refused_before_any_sql(dsn: str, name: str) -> None:
    closed = pgpubsub.connect(dsn)
    closed.close()
    for call in (closed.listen, closed.unlisten, lambda n: closed.notify(n, "x")):
        with pytest.raises(errors.InvalidChannelName):
            call(name)


@SETTINGS
@given(payload=BAD_PAYLOADS)
def test_invalid_payloads_are_refused_before_any_sql(dsn: str, payload: str) -> None:
    closed = pgpubsub.connect(dsn)
    closed.close()
    with pytest.raises(errors.PayloadError):
        closed.notify("fine", payload)
    if "\x00" not in payload:  # JSON escapes NUL: only the raw level refuses it
        with pytest.raises(errors.PayloadError):
            pgpubsub.notify(Text, conn=closed.conn, text=payload)
