import datetime

from django.contrib.auth.models import User
from django.db import models

import pgpubsub


class Author(models.Model):
    user = models.ForeignKey(User, on_delete=models.PROTECT, null=True)
    name = models.TextField()


class Post(models.Model):
    content = models.TextField()
    date = models.DateTimeField()
    author = models.ForeignKey(Author, null=True, on_delete=models.SET_NULL, related_name="entries")

    @classmethod
    def fetch(cls, post_id):
        post = cls.objects.get(pk=post_id)
        pgpubsub.notify(
            "pgpubsub.tests.channels.PostReads",
            model_id=post_id,
            date=datetime.date.today(),
        )
        return post


class Media(models.Model):
    """A parent model: trigger listeners on its children get its fields too."""

    name = models.TextField()
    published = models.DateField(null=True)


class Book(Media):
    pages = models.IntegerField()
