"""mailqd: a durable email delivery daemon. Applications queue mail with `Client`.

`Client` and `AsyncClient` are imported on first use (module `__getattr__`),
so `import mailqd` and the command lines that only need a submodule do not
load SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailqd.errors import MailqError

if TYPE_CHECKING:
    from mailqd.attachments import Attachment
    from mailqd.client import AsyncClient, Client

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Attachment", "Client", "MailqError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("AsyncClient", "Client"):
        from mailqd import client

        return getattr(client, name)
    if name == "Attachment":
        from mailqd.attachments import Attachment

        return Attachment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
