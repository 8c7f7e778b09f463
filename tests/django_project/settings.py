"""Settings of the Django project the mailqd email backend is tested in.

The database is a PostgreSQL database of the test run, migrated for mailqd;
`tests/test_django_backend.py` creates it and names it in
`MAILQD_TEST_DJANGO_DATABASE_URL` before `django.setup()`. Tests change
`MAILQD` with `override_settings`.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ["MAILQD_TEST_DJANGO_DATABASE_URL"])

SECRET_KEY = "mailqd tests only"
USE_TZ = True
INSTALLED_APPS: list[str] = []

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(_url.path.lstrip("/")),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
    },
    # Not for mailqd's jobs: the backend must refuse to write through it.
    "local": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}

EMAIL_BACKEND = "mailqd.contrib.django.EmailBackend"
MAILQD = {"USE_DJANGO_CONNECTION": True}

DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"
SERVER_EMAIL = "server@example.com"
ADMINS = [("Ops", "ops@example.com")]
EMAIL_SUBJECT_PREFIX = "[shop] "
