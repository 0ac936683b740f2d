"""What the attack tests send without any key: stock rpcudp datagrams (what an outsider speaks) and
well-formed handshake openers of the authenticated wire, from sockets on 127.0.0.1, paced and bounded.

Only the standard library, umsgpack and psutil, so the same floods can be aimed at any node
process (the figures in docs/dht.md were taken with them against the code before and after).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import psutil
import umsgpack

MARKER = "MRN4711_Jane_Doe"  # text an attacker puts in datagrams: must never reach a log


def request(name: str, *args: object, pad_to: int = 0, msg_id: bytes | None = None) -> bytes:
    body = umsgpack.packb([name, list(args)])
    return b"\x00" + (msg_id or os.urandom(20)) + body + bytes(max(0, pad_to - len(body)))


def reply(body: object, msg_id: bytes | None = None) -> bytes:
    return b"\x01" + (msg_id or os.urandom(20)) + umsgpack.packb(body)


def junk_mix(i: int) -> bytes:
    """Tiny, unknown-type, malformed, unknown-RPC (carrying MARKER), unsolicited-reply and
    wrong-arity datagrams, in turn."""
    kind = i % 7
    if kind == 0:
        return os.urandom(5)
    if kind == 1:
        return b"\x02" + os.urandom(40)
    if kind == 2:
        return b"\x00" + os.urandom(20) + b"\xc1\xc1\xc1"
    if kind == 3:
        return request(MARKER, MARKER)
    if kind == 4:
        return reply([MARKER])
    if kind == 5:
        return request("ping", MARKER, MARKER, MARKER)
    return request("find_node", os.urandom(20), MARKER.encode())


def fresh_ping(i: int) -> bytes:
    """A well-formed ping from a node id nobody has seen."""
    return request("ping", os.urandom(20))


def hello(i: int) -> bytes:
    """A well-formed handshake HELLO (the one message a node answers without a cookie)."""
    return (b"\x51" + i.to_bytes(4, "big") + os.urandom(32)).ljust(128, b"\0")


def flood(target: tuple[str, int], make: Callable[[int], bytes], count: int, rate: float, *,
          sources: int = 1, bind: str = "127.0.0.1", deadline: float = 60.0,
          on_reply: Callable[[socket.socket, bytes, tuple], None] | None = None) -> dict:
    """Send ``count`` datagrams ``make(i)`` to ``target`` at ``rate`` per second from ``sources``
    sockets in turn; a thread reads what comes back (``on_reply`` may answer it). Returns bytes and
    datagrams sent and received and the seconds it took."""
    socks = []
    for _ in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((bind, 0))
        s.setblocking(False)
        socks.append(s)
    got = {"datagrams": 0, "bytes": 0}
    stop = threading.Event()

    def read() -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.05):
                try:
                    data, addr = key.fileobj.recvfrom(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                got["datagrams"] += 1
                got["bytes"] += len(data)
                if on_reply is not None:
                    on_reply(key.fileobj, data, addr)
        sel.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = sent_bytes = 0
    started = time.monotonic()
    end = started + deadline
    try:
        for i in range(count):
            if i % 100 == 0:  # pace in steps of 100 datagrams
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                if time.monotonic() > end:
                    break
            data = make(i)
            try:
                socks[i % sources].sendto(data, target)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            sent += 1
            sent_bytes += len(data)
        elapsed = time.monotonic() - started
        # replies still in flight: wait until none came for 0.5 s (bounded)
        last, settle_end = got["datagrams"], time.monotonic() + 5
        while time.monotonic() < settle_end:
            time.sleep(0.5)
            if got["datagrams"] == last:
                break
            last = got["datagrams"]
    finally:
        stop.set()
        reader.join(timeout=5)
        for s in socks:
            s.close()
    return {"sent": sent, "sent_bytes": sent_bytes, "received": got["datagrams"], "received_bytes": got["bytes"],
            "seconds": elapsed, "rate": sent / elapsed if elapsed else 0.0}


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system
