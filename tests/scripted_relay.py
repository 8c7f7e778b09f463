"""A misbehaving SMTP relay on a raw socket: each connection plays a script.

Unlike the aiosmtpd server (tests/smtp_server.py), which always speaks
proper SMTP, this one writes exactly the bytes a script names, when it names
them: replies out of turn, floods, echoed credentials, escape sequences.
It runs on the test's own event loop (`async with ScriptedRelay() as relay`),
so the SMTP transport, or a whole in-process `Worker`, talks to it over a
real socket. Connections take the scripts of `relay.scripts` in order, then
behave (`Script()`).
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Connection", "Script", "ScriptedRelay"]

FLOOD_LIMIT = 256 * 1024 * 1024  # a flood stops here even if nobody hangs up


@dataclass
class Script:
    """How one connection differs from a well-behaved relay.

    `replies` overrides the reply to a step, as raw bytes: "MAIL", "RCPT",
    "DATA" (instead of 354), "DOT" (to the content), "AUTH" (the final
    reply to AUTH, which may use `{plain}`, `{user}`, `{password}` for what
    the client sent), and "IDLE", written once the test sets `relay.poke`
    after the reply to the content. `flood` names a step after whose reply
    `flood_line` is written again and again until the client hangs up.
    """

    replies: dict[str, bytes] = field(default_factory=dict)
    flood: str | None = None
    flood_line: bytes = b"250 2.0.0 ok\r\n"
    pipelining: bool = True
    auth: str | None = None  # "PLAIN" or "LOGIN": offer AUTH with this one method


@dataclass
class Connection:
    """What happened on one connection, as the relay saw it."""

    number: int
    commands: list[bytes] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)
    auth_sent: list[bytes] = field(default_factory=list)  # the base64 the client sent
    flooded: int = 0
    quit: bool = False
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def verbs(self) -> list[str]:
        return [command[:4].decode().upper() for command in self.commands]


class ScriptedRelay:
    """An asyncio SMTP relay on 127.0.0.1 playing `Script`s (see the module docstring)."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts: deque[Script] = deque(scripts)
        self.connections: list[Connection] = []
        self.poke = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.connections:  # a client may still hold one open
            connection.hung_up.set()

    def url(self, userinfo: str = "", **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"starttls": "off", **options}.items())
        at = f"{userinfo}@" if userinfo else ""
        return f"smtp://{at}127.0.0.1:{self.port}?{query}"

    @property
    def received(self) -> list[bytes]:
        """Every message content received, over all connections, in order."""
        return [content for c in self.connections for content in c.contents]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script = self.scripts.popleft() if self.scripts else Script()
        connection = Connection(len(self.connections) + 1)
        self.connections.append(connection)
        try:
            writer.write(b"220 relay.test ESMTP\r\n")
            while line := await reader.readline():
                connection.commands.append(line)
                if not await self._answer(script, connection, line, reader, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            connection.hung_up.set()
            writer.close()

    async def _answer(
        self,
        script: Script,
        connection: Connection,
        line: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one command line; False once the dialogue is over."""
        verb = line[:4].decode().upper()
        if verb in ("EHLO", "HELO"):
            offers = [b"relay.test", b"SIZE 1000000", b"8BITMIME"]
            offers += [b"PIPELINING"] if script.pipelining else []
            offers += [b"AUTH " + script.auth.encode()] if script.auth else []
            writer.write(b"".join(b"250-" + o + b"\r\n" for o in offers[:-1]))
            writer.write(b"250 " + offers[-1] + b"\r\n")
        elif verb == "AUTH":
            await self._auth(script, connection, line, reader, writer)
        elif verb in ("MAIL", "RCPT"):
            await self._say(script, verb, b"250 2.1.0 ok\r\n", connection, writer)
        elif verb == "DATA":
            await self._say(script, "DATA", b"354 go ahead\r\n", connection, writer)
            connection.contents.append(await reader.readuntil(b"\r\n.\r\n"))
            await self._say(script, "DOT", b"250 2.0.0 queued\r\n", connection, writer)
            if "IDLE" in script.replies or script.flood == "IDLE":
                await self.poke.wait()
                await self._say(script, "IDLE", b"", connection, writer)
        elif verb == "QUIT":
            connection.quit = True
            writer.write(b"221 2.0.0 bye\r\n")
            return False
        else:
            writer.write(b"250 2.0.0 ok\r\n")
        return True

    async def _say(
        self,
        script: Script,
        step: str,
        default: bytes,
        connection: Connection,
        writer: asyncio.StreamWriter,
    ) -> None:
        writer.write(script.replies.get(step, default))
        await writer.drain()
        if script.flood == step:
            chunk = script.flood_line * (65536 // len(script.flood_line))
            while connection.flooded < FLOOD_LIMIT:
                writer.write(chunk)
                connection.flooded += len(chunk)
                await writer.drain()  # raises once the client has hung up

    async def _auth(
        self,
        script: Script,
        connection: Connection,
        line: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        words = line.split()
        sent = words[2:]
        if words[1].upper() == b"LOGIN":
            if not sent:
                writer.write(b"334 VXNlcm5hbWU6\r\n")
                sent.append((await reader.readline()).strip())
            writer.write(b"334 UGFzc3dvcmQ6\r\n")
            sent.append((await reader.readline()).strip())
        connection.auth_sent.extend(sent)
        if "AUTH" not in script.replies:
            writer.write(b"235 2.7.0 authenticated\r\n")
            return
        decoded = [base64.b64decode(word) for word in sent]
        parts = decoded[0].split(b"\0") if len(decoded) == 1 else decoded
        fields = {
            "plain": b" ".join(sent),
            "user": parts[-2],
            "password": parts[-1],
        }
        reply = script.replies["AUTH"]
        for name, value in fields.items():
            reply = reply.replace(b"{" + name.encode() + b"}", value)
        writer.write(reply)
