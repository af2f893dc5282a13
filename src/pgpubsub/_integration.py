"""How the core finds Django, without importing it.

The core never imports Django; these helpers look at ``sys.modules`` so that a
Django project gets Django's connection (and its transaction) by default.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["django_connection"]


def django_connection() -> Any:
    """Django's default connection if Django is set up with pgpubsub installed, else None."""
    if "django" not in sys.modules:
        return None
    from django.apps import apps
    from django.conf import settings

    if not settings.configured or not apps.ready or not apps.is_installed("pgpubsub"):
        return None
    from django.db import connection

    return connection
