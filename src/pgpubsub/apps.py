"""pgpubsub as a Django app: ``INSTALLED_APPS += ["pgpubsub", "pgtrigger"]``.

It brings the ``Notification`` model (the stored messages of durable channels,
:mod:`pgpubsub.models`) with its migration, an admin for it, and
``manage.py listen``. Under Django, ``pgpubsub.notify`` publishes on Django's
connection, so a message joins the surrounding ``transaction.atomic()``;
durable listeners run in a claim transaction on Django's connection, so their
ORM writes commit with the message's completion.
"""

from __future__ import annotations

from django.apps import AppConfig


class PgPubSubConfig(AppConfig):
    name = "pgpubsub"
    verbose_name = "pgpubsub"
    default_auto_field = "django.db.models.BigAutoField"
