"""mailqd: a durable email delivery daemon. Applications queue mail with `Client`."""

from mailqd.client import AsyncClient, Client
from mailqd.errors import MailqError

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "MailqError", "__version__"]
