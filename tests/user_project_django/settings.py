"""Settings of the users' Django project; the database is ``$SHOP_DSN`` (a libpq conninfo)."""

import os

from psycopg.conninfo import conninfo_to_dict

_db = conninfo_to_dict(os.environ["SHOP_DSN"])

SECRET_KEY = "shop-tests"
USE_TZ = True
INSTALLED_APPS = ["pgtrigger", "pgpubsub", "shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname", ""),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
