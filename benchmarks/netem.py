"""An emulated network link between two network namespaces: shaped TUN devices and a delay line.

Why it exists: ``benchmarks.link_speed`` times training steps over slow links, and this
kernel has no ``netem`` qdisc (``tc qdisc add … netem`` answers "unknown qdisc kind") but
has the token-bucket shaper ``tbf``. Each namespace gets a point-to-point TUN device
(10.77.0.1 ↔ 10.77.0.2, addresses that exist only inside the two namespaces); ``tc tbf``
shapes each device's egress in the kernel (the bandwidth, a 1 s queue), and a delay line
thread moves every packet from one device to the other after RTT/2, so TCP sees the real
RTT (slow start, ACK clocking and the queue behave as on a real path). Needs root.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import select
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator

EDGE_IP, CLOUD_IP, TUN = "10.77.0.1", "10.77.0.2", "sftls0"
QUEUE_S = 1.0  # tbf queue: a second of traffic at the link's rate


@dataclass(frozen=True)
class Link:
    """An emulated link: bandwidth each way (None: unshaped) and round-trip time."""

    mbit: float | None
    rtt_ms: float

    @property
    def label(self) -> str:
        return "unshaped (compute)" if self.mbit is None else f"{self.mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT"

UNSHAPED = Link(None, 0.0)

_LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x40000000, 0x400454CA, 0x0001, 0x1000


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _open_tun(namespace: str) -> int:
    """Attach to the TUN device of ``namespace`` (the calling thread moves into that namespace)."""
    ns = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _LIBC.setns(ns, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    finally:
        os.close(ns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TUN.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class DelayLine(threading.Thread):
    """Moves every packet between the two TUN devices, each after ``delay`` seconds (RTT/2)."""

    def __init__(self, edge_ns: str, cloud_ns: str) -> None:
        super().__init__(daemon=True, name="delay-line")
        self.namespaces = (edge_ns, cloud_ns)
        self.delay = 0.0
        self.opened = threading.Event()
        self.stopping = threading.Event()
        self.packets = 0

    def run(self) -> None:
        edge, cloud = (_open_tun(ns) for ns in self.namespaces)  # this thread ends up in the cloud namespace
        self.opened.set()
        other = {edge: cloud, cloud: edge}
        queue: list[tuple[float, int, int, bytes]] = []
        while not self.stopping.is_set():
            timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.05
            ready, _, _ = select.select([edge, cloud], [], [], timeout)
            now = time.monotonic()
            for fd in ready:
                for packet in _drain(fd):
                    self.packets += 1
                    heapq.heappush(queue, (now + self.delay, self.packets, other[fd], packet))
            while queue and queue[0][0] <= time.monotonic():
                _, _, fd, packet = heapq.heappop(queue)
                os.write(fd, packet)
        os.close(edge)
        os.close(cloud)


def _drain(fd: int) -> Iterator[bytes]:
    while True:
        try:
            yield os.read(fd, 65536)
        except BlockingIOError:
            return


class EmulatedLink:
    """Two network namespaces joined by shaped TUN devices and a delay line; ``set`` changes the link."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.edge_ns, self.cloud_ns = f"sftls-edge-{tag}", f"sftls-cloud-{tag}"
        self.delay_line = DelayLine(self.edge_ns, self.cloud_ns)

    def __enter__(self) -> "EmulatedLink":
        try:
            for ns, mine, peer in ((self.edge_ns, EDGE_IP, CLOUD_IP), (self.cloud_ns, CLOUD_IP, EDGE_IP)):
                _run("ip", "netns", "add", ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "tuntap", "add", "dev", TUN, "mode", "tun")
                _run("ip", "-n", ns, "addr", "add", mine, "peer", peer, "dev", TUN)
                _run("ip", "-n", ns, "link", "set", TUN, "up")
            self.delay_line.start()
            if not self.delay_line.opened.wait(10):
                raise RuntimeError("the delay line could not open the TUN devices")
            self.set(UNSHAPED)
        except BaseException:
            self.__exit__()
            raise
        return self

    def set(self, link: Link) -> None:
        """Shape both directions: ``tbf`` at the link's rate (or a plain FIFO) and RTT/2 of delay each way."""
        for ns in (self.edge_ns, self.cloud_ns):
            if link.mbit is None:
                shaper = ["pfifo", "limit", "10000"]
            else:
                burst = max(3000, int(link.mbit * 1e6 / 8 * 0.002))  # 2 ms of traffic, at least two packets
                shaper = ["tbf", "rate", f"{link.mbit:g}mbit", "burst", str(burst), "latency", f"{QUEUE_S * 1000:g}ms"]
            _run("tc", "-n", ns, "qdisc", "replace", "dev", TUN, "root", *shaper)
        self.delay_line.delay = link.rtt_ms / 2000

    def exec_in(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def __exit__(self, *exc: object) -> None:
        self.delay_line.stopping.set()
        if self.delay_line.is_alive():
            self.delay_line.join(5)
        for ns in (self.edge_ns, self.cloud_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
