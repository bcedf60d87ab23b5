"""Fewer system calls per MQTT packet on paho's plain TCP socket: buffered reads, joined writes.

paho reads every packet with at least three `recv` calls (the command byte, each byte of the
remaining length, then the body), and aiomqtt calls `loop_read()` once per readiness event, which
reads one packet when nothing of ours is in flight: a burst of 2,000 terminal reports costs 6,000
`recv` calls and 2,000 turns of the event loop. On the way out, paho writes every queued packet with
its own `send`: the PUBACK of each of those reports is one more call.

- `BufferedSocket` is the connected socket with a read buffer: one `recv` of up to `READ_BYTES`
  serves paho's small reads from memory. It answers `pending()` with the bytes it holds, which is
  how aiomqtt already keeps calling `loop_read()` for TLS sockets that hold decrypted bytes, so a
  buffered packet is read in the same turn, never left waiting for the next byte off the wire;
  under a flood it ends the turn after `TURN_READS` reads, since the socket is still readable.
- `join_head()` joins the run of whole packets at the head of paho's output queue into one, so one
  `send` writes them all. It stops at a packet paho must act on once written (a QoS 0 PUBLISH, whose
  `on_publish` fires then, and DISCONNECT, after which paho closes the socket), at one already half
  written, and at `MAX_JOINED_BYTES`.

`install()` puts both on one paho client; it refuses (returns False, and the caller logs it) when
this paho version does not keep them where it looks, so an upgrade of paho can make ebcd slower,
never wrong. TLS connections keep paho's own path: the SSL layer reads the socket itself.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

READ_BYTES = 64 * 1024  # one recv: a burst of ~600 reports
TURN_READS = 2  # reads from the wire in one turn of the event loop while more waits on the socket
MAX_JOINED_BYTES = 64 * 1024  # one send at most this big, unless a single packet is bigger

_PUBLISH, _PUBACK, _DISCONNECT = 0x30, 0x40, 0xE0


class BufferedSocket(socket.socket):
    """A connected socket whose `recv` reads ahead into a buffer; `pending()` says what it holds."""

    __slots__ = ("_ahead", "_at", "_reads")
    _ahead: bytes  # read from the wire, handed out from `_at` on
    _at: int
    _reads: int  # reads from the wire since `pending()` last said 0: one turn of the caller's loop

    @classmethod
    def adopt(cls, sock: socket.socket) -> BufferedSocket:
        """Take over `sock` (same descriptor, same timeout); `sock` is left detached."""
        timeout = sock.gettimeout()
        adopted = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        adopted.settimeout(timeout)
        adopted._ahead, adopted._at, adopted._reads = b"", 0, 0
        return adopted

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to `bufsize` bytes: from the buffer while it holds any, else from one large read."""
        ahead, at = self._ahead, self._at
        if at < len(ahead):
            end = at + bufsize
            if end >= len(ahead):
                self._ahead, self._at = b"", 0
                return ahead[at:]
            self._at = end
            return ahead[at:end]
        if flags:
            return super().recv(bufsize, flags)
        data = super().recv(max(bufsize, READ_BYTES))
        self._reads += 1
        if len(data) <= bufsize:
            return data
        self._ahead, self._at = data, bufsize
        return data[:bufsize]

    def pending(self) -> int:
        """Bytes read from the wire and not yet handed to the caller, which goes on reading while
        this is not 0. After `TURN_READS` reads from the wire it says 0 if more bytes wait on the
        socket, so a flood (a broker handing over a kept session's backlog) cannot hold the event
        loop in one callback: the socket stays readable and the loop calls again, after the
        publishers and keepalive have had their turn. With nothing more on the socket it says what
        it holds, so no packet is left waiting in the buffer for bytes that may never come."""
        held = len(self._ahead) - self._at
        if held and self._reads >= TURN_READS and self._more_on_the_wire():
            held = 0
        if not held:
            self._reads = 0
        return held

    def _more_on_the_wire(self) -> bool:
        try:
            return bool(super().recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # BlockingIOError: nothing waiting; other errors show at the next read
            return False


def join_head(out: deque[Any]) -> int:
    """Join the run of whole packets at the head of paho's output queue; how many were joined."""
    parts: list[bytes] = []
    size = 0
    try:
        for packet in out:
            command = packet["command"] & 0xF0
            if packet["pos"] or command == _DISCONNECT or (command == _PUBLISH and packet["qos"] == 0):
                break
            if parts and size + packet["to_process"] > MAX_JOINED_BYTES:
                break
            parts.append(bytes(packet["packet"]))
            size += packet["to_process"]
    except RuntimeError:  # queued to from another thread meanwhile: write as paho would
        return 0
    if len(parts) < 2:
        return 0
    for _ in parts:
        out.popleft()
    # a PUBACK-typed packet: once written, paho does nothing more with it (it only looks at QoS 0
    # PUBLISH and DISCONNECT); a QoS 1 PUBLISH inside completes when its PUBACK comes back, as before
    joined = b"".join(parts)
    whole = {"command": _PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": len(joined), "info": None}
    out.appendleft({**whole, "packet": joined})
    return len(parts)


def install(paho: Any) -> bool:
    """Buffered reads and joined writes on `paho` (a paho `Client`); False if this paho has no hooks."""
    connect = getattr(paho, "_create_socket_connection", None)
    write = getattr(paho, "_packet_write", None)
    if connect is None or write is None or not isinstance(getattr(paho, "_out_packet", None), deque):
        return False

    def buffered_connection() -> socket.socket:
        sock = connect()
        return BufferedSocket.adopt(sock) if type(sock) is socket.socket else sock

    def joined_write() -> Any:
        join_head(paho._out_packet)
        return write()

    paho._create_socket_connection = buffered_connection
    paho._packet_write = joined_write
    return True
