"""Channel-name and payload checks, made before any SQL (unit tier)."""

import pickle

import pytest

from pgpubsub import errors
from pgpubsub.names import check_payload, listen_sql, validate_channel

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name",
    ["x; DROP TABLE users", 'a"b', "Foo", "foo", "é" * 31, "a" * 63, "with space", "$1"],
)
def test_names_postgres_can_hold_are_accepted_unchanged(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a\x00b", "NUL"),
        ("a" * 64, "64 bytes"),
        ("é" * 32, "64 bytes"),
        (None, "str"),
        (b"foo", "str"),
    ],
)
def test_bad_names_raise_a_clear_value_error(name: object, reason: str) -> None:
    with pytest.raises(errors.InvalidChannelName) as info:
        validate_channel(name)
    assert isinstance(info.value, ValueError)
    assert reason.split()[0] in str(info.value)


def test_listen_sql_quotes_every_name_as_an_identifier() -> None:
    text = listen_sql(['a"b', "x; DROP TABLE users"]).as_string(None)
    assert text == 'LISTEN "a""b";LISTEN "x; DROP TABLE users";'


def test_payload_limit_is_counted_in_utf8_bytes() -> None:
    assert check_payload("a" * 7999) == "a" * 7999
    with pytest.raises(errors.PayloadTooLarge, match="8000 bytes"):
        check_payload("a" * 8000)
    with pytest.raises(errors.PayloadTooLarge, match="8000 bytes"):
        check_payload("é" * 4000)
    assert check_payload("é" * 3999)


@pytest.mark.parametrize("bad", ["a\x00b", 42, None])
def test_unsendable_payloads_raise_payload_error(bad: object) -> None:
    with pytest.raises(errors.PayloadError):
        check_payload(bad, "ch")


def test_errors_are_rooted_and_picklable() -> None:
    for cls in (
        errors.InvalidChannelName,
        errors.PayloadTooLarge,
        errors.SchemaMismatch,
        errors.ConnectionLost,
        errors.ChannelNotFound,
        errors.ListenerStateError,
    ):
        err = cls("boom")
        assert isinstance(err, errors.PgPubSubError)
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is cls and str(again) == "boom"
