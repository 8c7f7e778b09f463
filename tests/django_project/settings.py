"""Settings of the Django project the mailqd email backend is tested in.

The database is a PostgreSQL database of the test run, migrated for mailqd;
`tests/test_django_backend.py` creates it and names it in
`MAILQD_TEST_DJANGO_DATABASE_URL` before `django.setup()` (and an empty one
in `MAILQD_TEST_DJANGO_UNMIGRATED_URL`). Tests change
`MAILQD` with `override_settings`.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit


def _postgresql(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


SECRET_KEY = "mailqd tests only"
USE_TZ = True
INSTALLED_APPS: list[str] = []

DATABASES = {
    "default": _postgresql(os.environ["MAILQD_TEST_DJANGO_DATABASE_URL"]),
    # A database without mailqd's tables (`mailqctl migrate` never run).
    "unmigrated": _postgresql(os.environ["MAILQD_TEST_DJANGO_UNMIGRATED_URL"]),
    # Not for mailqd's jobs: the backend must refuse to write through it.
    "local": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}

EMAIL_BACKEND = "mailqd.contrib.django.EmailBackend"
MAILQD = {"USE_DJANGO_CONNECTION": True}

DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"
SERVER_EMAIL = "server@example.com"
ADMINS = [("Ops", "ops@example.com")]
EMAIL_SUBJECT_PREFIX = "[shop] "
