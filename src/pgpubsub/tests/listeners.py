import datetime
from collections import defaultdict
from typing import Optional

import pgtrigger

import pgpubsub
from pgpubsub.tests.channels import (
    AuthorRenamedChannel,
    AuthorTriggerChannel,
    BookTriggerChannel,
    Greetings,
    PostReads,
    PostTriggerChannel,
)
from pgpubsub.tests.models import Author, Post
from pgpubsub.triggers import Notify

# Simple cache for illustrative purposes only
post_reads_per_date_cache = defaultdict(dict)
author_reads_cache = dict()
greetings = []
post_events = []
book_events = []
author_renames = []


@pgpubsub.listener(PostReads)
def update_post_reads_per_date_cache(model_id: int, date: datetime.date):
    print(f"Processing update_post_reads_per_date with args {model_id}, {date}")
    print(f"Cache before: {post_reads_per_date_cache}")
    current_count = post_reads_per_date_cache[date].get(model_id, 0)
    post_reads_per_date_cache[date][model_id] = current_count + 1
    print(f"Cache after: {post_reads_per_date_cache}")


@pgpubsub.post_insert_listener(AuthorTriggerChannel)
def create_first_post_for_author(old: Author, new: Author):
    print(f"Creating first post for {new.name}")
    Post.objects.create(
        author_id=new.pk,
        content="Welcome! This is your first post",
        date=datetime.date.today(),
    )


@pgpubsub.listener(Greetings)
def greet(name: str):
    greetings.append(("greet", name))


@pgpubsub.listener(Greetings)
def greet_politely(name: str, greeting: Optional[str] = None, times: int = 1):
    greetings.append(("greet_politely", f"{greeting or 'Hello'} {name}" * times))


@pgpubsub.post_insert_listener(PostTriggerChannel)
def post_inserted(old: Post, new: Post):
    post_events.append(("insert", old, new))


@pgpubsub.post_update_listener(PostTriggerChannel)
def post_updated(old: Post, new: Post):
    post_events.append(("update", old, new))


@pgpubsub.pre_delete_listener(PostTriggerChannel)
def post_deleted(old: Post, new: Post):
    post_events.append(("delete", old, new))


@pgpubsub.post_save_listener(BookTriggerChannel)
def book_saved(old, new):
    book_events.append(new)


@pgpubsub.trigger_listener(
    AuthorRenamedChannel,
    Notify(
        name="author_renamed",
        operation=pgtrigger.Update,
        when=pgtrigger.After,
        condition=pgtrigger.Q(old__name__df=pgtrigger.F("new__name")),
    ),
)
def author_renamed(old: Author, new: Author):
    author_renames.append((old.name, new.name))
