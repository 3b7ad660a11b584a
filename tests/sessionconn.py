"""Hand-driven sessions for tests that speak to real replicas frame by frame, as an attacker or a
peer holding real keys would: asyncio streams, and a blocking socket for floods from a thread."""

from __future__ import annotations

import asyncio
import socket
import struct

from bft.crypto import Keyring
from bft.runtime.session import Session

LENGTH = struct.Struct("!I")


def framed(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


class StreamSession:
    """A session over asyncio streams, to replica ``replica`` at (host, port)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session) -> None:
        self.reader, self.writer, self.session = reader, writer, session

    @classmethod
    async def open(cls, host: str, port: int, keyring: Keyring, replica: int, encrypt: bool = False) -> StreamSession:
        reader, writer = await asyncio.open_connection(host, port)
        session = Session(keyring, expect=replica, encrypt=encrypt)
        self = cls(reader, writer, session)
        writer.write(framed(session.initiate()))
        accept = await self.read_raw(5)
        assert accept is not None, "the replica did not answer the handshake"
        finish = session.receive_handshake(accept)
        assert finish is not None and session.established
        writer.write(framed(finish))
        await writer.drain()
        if keyring.me[0] == "client":  # as the client library does: tags for this replica
            keyring.use_session_key(session.peer, session.request_key)
        return self

    def send(self, frame: bytes) -> None:
        self.writer.write(framed(self.session.seal(frame)))

    async def read_raw(self, timeout_s: float) -> bytes | None:
        try:
            (size,) = LENGTH.unpack(await asyncio.wait_for(self.reader.readexactly(4), timeout_s))
            return await asyncio.wait_for(self.reader.readexactly(size), timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None

    async def receive(self, timeout_s: float) -> bytes | None:
        data = await self.read_raw(timeout_s)
        return None if data is None else self.session.open(data)

    def close(self) -> None:
        self.writer.close()


def blocking_session(host: str, port: int, keyring: Keyring, replica: int) -> tuple[socket.socket, Session]:
    """The same handshake on a blocking socket."""
    sock = socket.create_connection((host, port), timeout=10)
    session = Session(keyring, expect=replica)
    sock.sendall(framed(session.initiate()))
    (size,) = LENGTH.unpack(_exactly(sock, 4))
    finish = session.receive_handshake(_exactly(sock, size))
    assert finish is not None
    sock.sendall(framed(finish))
    return sock, session


def _exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        out += chunk
    return out
