"""The Django integration, following the django-pgpubsub documents (seeds 000/004).

The project in ``django_project/`` installs ``pgpubsub``, ``pgtrigger`` and the
documented example app ``pgpubsub.tests`` (Author/Post, PostReads,
AuthorTriggerChannel and their listeners, imported by the AppConfig). Django is
set up once for this module, on a database of its own.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import Running, Server, admin_query, wait_until
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgpubsub
from pgpubsub import durable

PROJECT = Path(__file__).parent / "django_project"
LISTENING = "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgpubsub'"


@pytest.fixture(scope="module")
def django_dsn(pg_server: Server) -> Iterator[str]:
    name = f"pgpubsub_django_{os.getpid()}"
    pg_server.admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = pg_server.dsn(name)
    os.environ["PGPUBSUB_DJANGO_DSN"] = dsn
    os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
    sys.path.insert(0, str(PROJECT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    yield dsn
    from django.db import connections

    connections.close_all()
    pg_server.admin_execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    )


@pytest.fixture
def dj(django_dsn: str) -> str:
    """A clean slate in the Django database."""
    from pgpubsub.tests import listeners

    admin_query(
        django_dsn,
        "TRUNCATE tests_post, tests_author, tests_book, tests_media, pgpubsub.message CASCADE",
    )
    listeners.post_reads_per_date_cache.clear()
    for events in (
        listeners.greetings,
        listeners.post_events,
        listeners.book_events,
        listeners.author_renames,
    ):
        events.clear()
    return django_dsn


def worker(*channels: str) -> Running:
    from pgpubsub._djangodb import DjangoSession, django_conninfo
    from pgpubsub.listen import registry

    return Running(
        django_conninfo(), channels=registry.select(list(channels)), session_factory=DjangoSession
    )


def test_migrations_match_the_plain_schema_and_the_model(dj: str, dsn: str) -> None:
    from django.core.management import call_command

    from pgpubsub.models import Notification

    durable.migrate(dsn)
    columns = (
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_schema = 'pgpubsub' AND table_name = 'message' ORDER BY ordinal_position"
    )
    assert admin_query(dj, columns) == admin_query(dsn, columns)
    model_columns = [f.column for f in Notification._meta.fields]
    # All but where the row is stored, which the table's default picks.
    assert model_columns == [r[0] for r in admin_query(dj, columns) if r[0] != "segment"]
    call_command("makemigrations", check=True, dry_run=True, verbosity=0)  # exits if out of date
    durable.migrate(dj)  # `pgpubsub migrate` on a Django database changes nothing


def test_post_reads_cache_is_updated_by_fetch(dj: str) -> None:
    from django.db import transaction

    from pgpubsub.tests.listeners import post_reads_per_date_cache
    from pgpubsub.tests.models import Post

    post = Post.objects.create(content="hello", date=datetime.datetime.now())
    run = worker("pgpubsub.tests.channels.PostReads")
    try:
        Post.fetch(post.pk)
        with transaction.atomic():
            Post.fetch(post.pk)
        with pytest.raises(RuntimeError), transaction.atomic():
            Post.fetch(post.pk)
            raise RuntimeError("rolled back: no notification")
        today = datetime.date.today()
        wait_until(lambda: post_reads_per_date_cache[today].get(post.pk) == 2, timeout=10)
        time.sleep(0.3)
    finally:
        run.stop()
    assert post_reads_per_date_cache == {today: {post.pk: 2}}


def test_post_reads_without_the_optional_date_reach_the_listener_as_none(dj: str) -> None:
    """The example app's ``date: datetime.date = None``: notify without it loses nothing."""
    from pgpubsub.tests.listeners import post_reads_per_date_cache

    run = worker("pgpubsub.tests.channels.PostReads")
    try:
        pgpubsub.notify("pgpubsub.tests.channels.PostReads", model_id=5)
        pgpubsub.notify("pgpubsub.tests.channels.PostReads", model_id=5, date=None)
        wait_until(lambda: post_reads_per_date_cache[None].get(5) == 2, timeout=10)
    finally:
        run.stop()
    assert post_reads_per_date_cache == {None: {5: 2}}


def test_durable_channel_with_a_none_default_under_django(dj: str) -> None:
    from django.db import connection

    from pgpubsub._djangodb import DjangoSession, django_conninfo
    from pgpubsub.listen import Registry
    from pgpubsub.models import Notification
    from pgpubsub.tests.channels import Reads

    @dataclass
    class DurableReads(Reads, name="durable_reads"):
        lock_notifications = True

    registry = Registry()

    def record(model_id: int, model_type: str, date: datetime.date) -> None:
        assert date is None
        with connection.cursor() as cur:  # in the claim transaction
            cur.execute("INSERT INTO tests_media (name) VALUES (%s)", [f"{model_type} {model_id}"])

    registry.add(DurableReads, record)
    pgpubsub.notify(DurableReads, model_id=1, model_type="Post")
    # django-pgpubsub code stores notifications through the model, too:
    Notification.objects.create(
        channel="durable_reads",
        payload='{"model_id": 2, "model_type": "Media"}',
    )
    run = Running(django_conninfo(), registry=registry, session_factory=DjangoSession)
    try:
        wait_until(lambda: not Notification.objects.exists(), timeout=15)
    finally:
        run.stop()
    from pgpubsub.tests.models import Media

    assert sorted(Media.objects.values_list("name", flat=True)) == ["Media 2", "Post 1"]


def test_notification_model_create_takes_the_table_defaults(dj: str) -> None:
    from pgpubsub.models import Notification

    n = Notification.objects.create(channel="some.Channel", payload="{}")
    n.refresh_from_db()
    assert (n.status, n.attempts, n.last_error, n.completed_at) == ("pending", 0, None, None)
    assert n.run_at is not None and n.created_at is not None


def test_custom_notify_trigger_keeps_its_condition(dj: str) -> None:
    """``pgpubsub.triggers.Notify``, django-pgpubsub's trigger class, with a pgtrigger condition."""
    from pgpubsub.tests.listeners import author_renames
    from pgpubsub.tests.models import Author

    author = Author.objects.create(name="Ann")
    run = worker("pgpubsub.tests.channels.AuthorRenamedChannel")
    try:
        Author.objects.filter(pk=author.pk).update(name="Ann")  # not a rename: no event
        Author.objects.filter(pk=author.pk).update(name="Anne")
        Author.objects.create(name="Bo")  # not an update: no event
        wait_until(lambda: author_renames, timeout=10)
        time.sleep(0.3)
    finally:
        run.stop()
    assert author_renames == [("Ann", "Anne")]


def test_notify_trigger_without_a_channel_says_so() -> None:
    import pgtrigger

    from pgpubsub.triggers import Notify

    trigger = Notify(name="lonely", operation=pgtrigger.Insert, when=pgtrigger.After)
    with pytest.raises(pgpubsub.ConfigurationError, match="has no channel"):
        trigger.get_func(None)


def test_notify_joins_the_atomic_block_and_listeners_take_optional_fields(dj: str) -> None:
    from django.db import transaction

    from pgpubsub.tests.listeners import greetings

    run = worker("pgpubsub.tests.channels.Greetings")
    try:
        with transaction.atomic():
            pgpubsub.notify("pgpubsub.tests.channels.Greetings", name="Ada")
            time.sleep(0.3)
            assert greetings == []  # nothing before commit
        pgpubsub.notify("pgpubsub.tests.channels.Greetings", name="Bo", greeting="Hi", times=2)
        wait_until(lambda: len(greetings) == 4, timeout=10)
    finally:
        run.stop()
    assert sorted(greetings) == [
        ("greet", "Ada"),
        ("greet", "Bo"),
        ("greet_politely", "Hello Ada"),
        ("greet_politely", "Hi BoHi Bo"),
    ]


def test_trigger_listeners_get_unsaved_instances_of_their_operation_only(dj: str) -> None:
    from pgpubsub.tests.listeners import post_events
    from pgpubsub.tests.models import Author, Post

    author = Author.objects.create(name="Ann")
    run = worker("pgpubsub.tests.channels.PostTriggerChannel")
    try:
        when = datetime.datetime(2024, 5, 1, 12)
        post = Post.objects.create(content="one", date=when, author=author)
        pk = post.pk
        Post.objects.filter(pk=post.pk).update(content="two")
        post.delete()
        wait_until(lambda: len(post_events) == 3, timeout=10)
        time.sleep(0.3)
    finally:
        run.stop()
    by_op = {op: (old, new) for op, old, new in post_events}  # one listener (thread) per op
    assert sorted(by_op) == ["delete", "insert", "update"]
    (ins_old, ins_new), (upd_old, upd_new), (del_old, del_new) = (
        by_op["insert"],
        by_op["update"],
        by_op["delete"],
    )
    assert ins_old is None and del_new is None
    assert isinstance(ins_new, Post) and ins_new._state.adding  # unsaved
    assert (ins_new.content, ins_new.author_id) == ("one", author.pk)
    assert ins_new.date == datetime.datetime(2024, 5, 1, 12)
    assert (upd_old.content, upd_new.content) == ("one", "two")
    assert del_old.pk == pk and not Post.objects.filter(pk=pk).exists()


def test_trigger_instances_include_parent_model_fields(dj: str) -> None:
    from pgpubsub.tests.listeners import book_events
    from pgpubsub.tests.models import Book

    run = worker("pgpubsub.tests.channels.BookTriggerChannel")
    try:
        Book.objects.create(name="Dune", published=datetime.date(1965, 8, 1), pages=412)
        wait_until(lambda: book_events, timeout=10)
    finally:
        run.stop()
    (book,) = book_events
    assert (book.name, book.published, book.pages) == ("Dune", datetime.date(1965, 8, 1), 412)


def test_locked_trigger_channel_creates_one_post_per_author_in_the_claim_transaction(
    dj: str,
) -> None:
    from django.db import transaction

    from pgpubsub.models import Notification
    from pgpubsub.tests.models import Author, Post

    with transaction.atomic():
        pgpubsub.set_notification_context({"request": "r-7"})  # for this transaction only
        Author.objects.create(name="Stored while nobody listens")
    Author.objects.create(name="No context")
    stored, plain = Notification.objects.all()
    assert stored.status == "pending" and stored.channel.endswith("AuthorTriggerChannel")
    assert (stored.context, plain.context) == ({"request": "r-7"}, None)
    runs = [worker("pgpubsub.tests.channels.AuthorTriggerChannel") for _ in range(2)]
    try:
        Author.objects.bulk_create([Author(name=f"a{i}") for i in range(300)])
        wait_until(lambda: Post.objects.count() == 302, timeout=30)
        time.sleep(0.5)
    finally:
        for run in runs:
            run.stop()
    assert Post.objects.count() == 302
    assert set(Author.objects.values_list("entries__content", flat=True)) == {
        "Welcome! This is your first post"
    }
    assert not Notification.objects.exists()


def test_admin_lists_notifications_and_replays_dead_ones(dj: str) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from pgpubsub.models import Notification

    admin_query(
        dj,
        "INSERT INTO pgpubsub.message (channel, payload, status, attempts, last_error) "
        "VALUES ('c', '{}', 'dead', 5, 'Traceback...\nValueError: boom')",
    )
    user, _ = User.objects.get_or_create(username="admin", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    page = client.get("/admin/pgpubsub/notification/?status__exact=dead")
    assert page.status_code == 200 and b"ValueError: boom" in page.content
    (dead,) = Notification.objects.all()
    response = client.post(
        "/admin/pgpubsub/notification/",
        {"action": "replay", "_selected_action": [dead.pk]},
        follow=True,
    )
    assert b"1 notification(s) will run again" in response.content
    dead.refresh_from_db()
    assert (dead.status, dead.attempts) == ("pending", 0)


def test_admin_replay_runs_again_after_a_serialization_failure(dj: str) -> None:
    """On a database whose transactions are SERIALIZABLE, the admin's replay meets a
    serialization failure when another replay of the message commits first: it runs its
    transaction again and answers, where it answered 500."""
    import threading

    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client

    from pgpubsub import messages
    from pgpubsub.models import Notification

    admin_query(
        dj, "INSERT INTO pgpubsub.message (channel, payload, status) VALUES ('c', '{}', 'dead')"
    )
    (dead,) = Notification.objects.all()
    user, _ = User.objects.get_or_create(username="admin", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    database = sql.Identifier(str(psycopg.conninfo.conninfo_to_dict(dj)["dbname"]))
    admin_query(
        dj,
        sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = 'serializable'")
        .format(database)
        .as_string(),
    )
    answers: list[Any] = []

    def post() -> None:
        try:
            answers.append(
                client.post(
                    "/admin/pgpubsub/notification/",
                    {"action": "replay", "_selected_action": [dead.pk]},
                    follow=True,
                )
            )
        finally:
            connection.close()  # this thread's own

    try:
        with psycopg.connect(dj) as rival:
            assert messages.replay(rival, ids=[dead.pk]).replayed == (dead.pk,)  # uncommitted
            asking = threading.Thread(target=post)
            asking.start()
            wait_until(
                lambda: (
                    admin_query(
                        dj, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    )[0][0]
                    > 0
                )
            )
            rival.commit()
            asking.join(timeout=30)
    finally:
        admin_query(
            dj,
            sql.SQL("ALTER DATABASE {} RESET default_transaction_isolation")
            .format(database)
            .as_string(),
        )
    [response] = answers
    assert response.status_code == 200
    assert b"notification(s) will run again" in response.content
    dead.refresh_from_db()
    assert dead.status == "pending"


def test_admin_links_to_the_dashboard(dj: str) -> None:
    from django.contrib.auth.models import User
    from django.test import Client, override_settings

    user, _ = User.objects.get_or_create(username="admin", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    assert b"Live dashboard" not in client.get("/admin/pgpubsub/notification/").content
    with override_settings(PGPUBSUB_DASHBOARD_URL="/ops/queues/"):
        page = client.get("/admin/pgpubsub/notification/").content.decode()
    assert '<a href="/ops/queues/" class="viewsitelink">Live dashboard</a>' in page


def test_notify_follows_a_psycopg2_connection(dj: str) -> None:
    import psycopg2

    from pgpubsub.tests.channels import AuthorTriggerChannel, PostReads

    with psycopg.connect(dj, autocommit=True) as listener:
        listener.execute('LISTEN "pgpubsub.tests.channels.PostReads"')
        conn = psycopg2.connect(dj)
        try:
            pgpubsub.notify(PostReads, conn=conn, model_id=1, date=datetime.date(2024, 1, 2))
            ids = pgpubsub.notify_many(AuthorTriggerChannel, [{}, {}], conn=conn)
            conn.commit()
        finally:
            conn.close()
        (note,) = list(listener.notifies(timeout=5, stop_after=1))
    assert note.payload == '{"model_id":1,"model_type":"Post","date":"2024-01-02"}'
    assert ids == 2
    assert admin_query(dj, "SELECT count(*) FROM pgpubsub.message") == [(2,)]


@pytest.mark.acceptance
def test_manage_py_listen_two_processes_bulk_create_one_post_per_author(dj: str) -> None:
    from pgpubsub.tests.models import Author, Post

    env = dict(os.environ, PGPUBSUB_DJANGO_DSN=dj, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "listen",
            "--channels",
            "pgpubsub.tests.channels.AuthorTriggerChannel",
            "--processes",
            "2",
            "--recover",
            "--loglevel",
            "warning",
        ],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: len(admin_query(dj, LISTENING)) >= 2,
            timeout=30,
        )
        Author.objects.bulk_create([Author(name=f"author {i}") for i in range(500)])
        wait_until(lambda: Post.objects.count() == 500, timeout=60, interval=0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert Post.objects.count() == 500
    assert sorted(Post.objects.values_list("author_id", flat=True)) == sorted(
        Author.objects.values_list("pk", flat=True)
    )
    assert out.decode().count("Creating first post for") == 500


# pgtrigger's functions do not pin search_path: the trigger bodies qualify operators too.
OPERATOR_TRAPS = """
CREATE FUNCTION public.trap_ne(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('<>', current_user);
    RETURN a OPERATOR(pg_catalog.<>) b;
END $$;
CREATE FUNCTION public.trap_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('=', current_user);
    RETURN a OPERATOR(pg_catalog.=) b;
END $$;
CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.trap_ne);
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.trap_eq);
"""


def test_django_triggers_run_no_hijacking_function_and_a_granted_writer_writes(dj: str) -> None:
    """Under Django too: functions named like built-ins never run; the writer role works."""
    from test_security import TRAP_SQL

    from pgpubsub import cli
    from pgpubsub.tests.models import Post

    admin_query(
        dj,
        "DROP ROLE IF EXISTS dj_writer; DROP ROLE IF EXISTS dj_hostile;"
        "CREATE ROLE dj_writer LOGIN PASSWORD 'pw'; CREATE ROLE dj_hostile LOGIN PASSWORD 'pw';"
        "GRANT INSERT, UPDATE, DELETE, SELECT ON tests_post, tests_author TO dj_writer;"
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO dj_writer;"
        "GRANT CREATE, USAGE ON SCHEMA public TO dj_hostile;",
    )
    try:
        with psycopg.connect(make_conninfo(dj, user="dj_hostile", password="pw")) as hostile:
            hostile.execute(TRAP_SQL)
            hostile.execute(OPERATOR_TRAPS)
        assert cli.main(["grant", "dj_writer", "--django-writer", "--dsn", dj]) == 0
        run = worker(
            "pgpubsub.tests.channels.PostTriggerChannel",
            "pgpubsub.tests.channels.AuthorTriggerChannel",
        )
        try:
            writer_dsn = make_conninfo(dj, user="dj_writer", password="pw")
            with psycopg.connect(writer_dsn, autocommit=True) as writer:
                writer.execute(
                    "INSERT INTO tests_post (content, date) VALUES ('small', now()), (%s, now())",
                    ("w" * 50_000,),
                )
                writer.execute("UPDATE tests_post SET content = %s", ("u" * 50_000,))
                writer.execute(
                    "INSERT INTO tests_author (name) VALUES ('durable'), (%s)", ("a" * 50_000,)
                )
            with psycopg.connect(dj, autocommit=True) as su:  # a superuser, hostile path first
                su.execute("SET search_path = public, pg_catalog")
                su.execute("INSERT INTO tests_author (name) VALUES ('by the superuser')")
                su.execute("DELETE FROM tests_post WHERE content LIKE 'u%'")
            wait_until(lambda: Post.objects.count() == 3, timeout=20)  # one per new author
        finally:
            run.stop()
        assert admin_query(dj, "SELECT fn, by_user FROM public.sprung") == []
    finally:
        admin_query(
            dj,
            "DROP TABLE IF EXISTS public.sprung;"
            "DROP OWNED BY dj_writer, dj_hostile CASCADE;"
            "DROP ROLE dj_writer; DROP ROLE dj_hostile;",
        )


def manage(dj: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py ...`` as a user runs it: the database only in Django's settings."""
    env = {k: v for k, v in os.environ.items() if k != "PGPUBSUB_DSN"}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env={**env, "PGPUBSUB_DJANGO_DSN": dj},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_pgpubsub_command_runs_through_manage_py_on_the_projects_database(dj: str) -> None:
    status = manage(dj, "pgpubsub", "status")
    assert status.returncode == 0, status.stderr
    admin_query(
        dj,
        "INSERT INTO pgpubsub.message (channel, payload, status, last_error) VALUES "
        "('greetings.v1', '{\"name\": \"x\"}', 'dead', 'Traceback (most recent call last):\n"
        "ValueError: no')",
    )
    (mid,) = admin_query(dj, "SELECT id FROM pgpubsub.message")[0]
    listed = manage(dj, "pgpubsub", "messages", "list", "--status", "any", "--settings=settings")
    assert listed.returncode == 0, listed.stderr
    assert f"{mid}\tdead\tgreetings.v1" in listed.stdout
    shown = manage(dj, "pgpubsub", "messages", "show", str(mid), "--database", "default")
    assert "    ValueError: no" in shown.stdout.splitlines(), shown.stdout + shown.stderr
    sent = manage(dj, "pgpubsub", "publish", "pgpubsub.tests.channels.Greetings", '{"name": "a"}')
    assert sent.returncode == 0 and sent.stdout.startswith("sent on channel"), sent.stderr
    stored = manage(dj, "pgpubsub", "publish", "greetings.v1", '{"name": "b"}', "--priority", "3")
    assert stored.stdout.startswith("stored message"), stored.stderr
    assert admin_query(dj, "SELECT count(*) FROM pgpubsub.message WHERE priority = 3") == [(1,)]
    refused = manage(dj, "pgpubsub", "listen")
    assert refused.returncode == 2 and "manage.py listen" in refused.stderr
    dashboard = subprocess.Popen(
        [sys.executable, "manage.py", "pgpubsub", "dashboard", "--port", "0"],
        cwd=PROJECT,
        env={
            **{k: v for k, v in os.environ.items() if k != "PGPUBSUB_DSN"},
            "PGPUBSUB_DJANGO_DSN": dj,
        },  # noqa: E501
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dashboard.stdout is not None
        url = dashboard.stdout.readline().split()[3]
        page = ""
        deadline = time.monotonic() + 20
        while not page:
            try:
                with urllib.request.urlopen(f"{url}message/{mid}", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert "greetings.v1" in page
    finally:
        dashboard.send_signal(signal.SIGTERM)
        dashboard.communicate(timeout=30)


@dataclass
class Member(pgpubsub.Channel, lock_notifications=True, max_attempts=1):
    n: int


@dataclass
class MembersDone(pgpubsub.Channel, lock_notifications=True):
    label: str
    batch: pgpubsub.BatchOutcome | None = None


def test_workers_on_django_settle_a_batch_under_a_repeatable_read_default(dj: str) -> None:
    """Issue 29 review, finding 3: with the database's default_transaction_isolation
    'repeatable read' (Django sets a level only when OPTIONS name one), two workers on
    Django's connections claim and settle a batch's last two members at once: both
    complete, once, and the callback is published once with both done."""
    import threading

    from django.db import connections

    from pgpubsub._djangodb import DjangoSession
    from pgpubsub._processor import ChannelProcessor
    from pgpubsub.channel import spec_of
    from pgpubsub.listen import Registry

    dbname = psycopg.conninfo.conninfo_to_dict(dj)["dbname"]
    admin_query(
        dj, f"ALTER DATABASE \"{dbname}\" SET default_transaction_isolation = 'repeatable read'"
    )
    connections.close_all()
    try:
        for round_ in range(2):
            barrier = threading.Barrier(2, timeout=10)
            registry = Registry()
            registry.add(Member, lambda n, barrier=barrier: barrier.wait())
            with psycopg.connect(dj) as conn:
                pgpubsub.batch(
                    [Member(n=1), Member(n=2)], on_complete=MembersDone(str(round_)), conn=conn
                )
            spec = spec_of(Member)
            procs = [
                ChannelProcessor(DjangoSession(), spec, registry.listeners(spec)) for _ in range(2)
            ]

            def drain(proc: ChannelProcessor) -> None:
                try:
                    proc.session.open()
                    proc.claim_size = 1
                    proc.drain_once()
                finally:
                    connections.close_all()

            threads = [threading.Thread(target=drain, args=(p,)) for p in procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert sorted((p.processed, p.failed) for p in procs) == [(1, 0), (1, 0)]
        got = admin_query(
            dj,
            "SELECT payload::jsonb -> 'batch' ->> 'done' FROM pgpubsub.message "
            "WHERE channel = %s ORDER BY id",
            (spec_of(MembersDone).name,),
        )
        assert got == [("2",), ("2",)]
    finally:
        admin_query(dj, f'ALTER DATABASE "{dbname}" RESET default_transaction_isolation')
        connections.close_all()
