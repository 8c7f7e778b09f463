"""mailqd for Django: `EMAIL_BACKEND = "mailqd.contrib.django.EmailBackend"` (docs/django.md).

Needs the `django` extra (`pip install mailqd[django]`). This package is the
only part of mailqd that imports Django.
"""

from mailqd.contrib.django.backend import EmailBackend
from mailqd.contrib.django.messages import HEADER_PREFIX, OPTIONS, OPTIONS_ATTRIBUTE, option_header

__all__ = ["HEADER_PREFIX", "OPTIONS", "OPTIONS_ATTRIBUTE", "EmailBackend", "option_header"]
