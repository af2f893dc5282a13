# -- pgpubsub (added at the end of mysite/settings.py) --
import os  # noqa: E402

INSTALLED_APPS += ["pgtrigger", "pgpubsub", "shop.apps.ShopConfig"]  # noqa: F821

# PostgreSQL: host, port, user and password from libpq's environment
# (PGHOST, PGPORT, PGUSER, PGPASSWORD), the database's name from PGDATABASE.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "shop"),
    }
}
