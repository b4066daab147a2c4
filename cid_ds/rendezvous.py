"""The rendezvous the ranks meet at, listening only where the job says.

torch's ``env://`` rendezvous starts rank 0's TCPStore server on every interface (``::`` port
MASTER_PORT), whatever MASTER_ADDR is. Here rank 0 binds the listening socket itself, to MASTER_ADDR
(127.0.0.1 for a single-node run; node 0's configured address for several), and hands it to the
TCPStore. When MASTER_ADDR is a loopback address every rank is on this machine, so gloo's and NCCL's own
sockets are put on the loopback interface too, unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME choose one.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from typing import Iterator

import psutil
from torch.distributed import Store, TCPStore
from torch.distributed.constants import default_pg_timeout
from torch.distributed.rendezvous import register_rendezvous_handler

INIT_METHOD = "bound://"


def _master_address() -> tuple[str, int, socket.AddressFamily, tuple]:
    """MASTER_ADDR, MASTER_PORT and the socket address they resolve to here."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return host, port, family, sockaddr


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _listen(host: str, port: int, family: socket.AddressFamily, sockaddr: tuple) -> socket.socket:
    if ipaddress.ip_address(sockaddr[0]).is_loopback and int(os.environ.get("CROSS_SIZE", "1")) > 1 \
            and not _is_ip_literal(host) and host != "localhost":
        # e.g. a Debian /etc/hosts line "127.0.1.1 <hostname>": the other nodes could never connect
        raise RuntimeError(f"rendezvous: MASTER_ADDR {host} resolves to the loopback address {sockaddr[0]} on "
                           "node 0, which the other nodes cannot reach: set MASTER_ADDR to its network address")
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT connections
    try:
        listener.bind(sockaddr)
    except OSError as e:
        listener.close()
        raise OSError(e.errno, f"rendezvous: cannot listen on MASTER_ADDR {host} ({sockaddr[0]}) port {port}: "
                               f"{e.strerror}") from None
    listener.listen(socket.SOMAXCONN)
    return listener


def _bound_rendezvous(url: str, timeout: timedelta = default_pg_timeout, **kwargs) -> Iterator[tuple[Store, int, int]]:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port, family, sockaddr = _master_address()
    listen_fd = _listen(host, port, family, sockaddr).detach() if rank == 0 else None  # the store owns it
    def store_on(use_libuv: bool) -> TCPStore:
        return TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, master_listen_fd=listen_fd,
                        use_libuv=use_libuv)
    try:
        store = store_on(use_libuv=True)
    except NotImplementedError:  # an older torch's libuv store (2.5's) takes no listening socket; its legacy one does
        store = store_on(use_libuv=False)
    yield store, rank, world_size
    raise RuntimeError(f"{INIT_METHOD} rendezvous: a process group cannot rendezvous again")


def loopback_interface() -> str:
    return next(name for name, addresses in psutil.net_if_addrs().items()
                if any(a.family == socket.AF_INET and ipaddress.ip_address(a.address).is_loopback for a in addresses))


def bound_init_method() -> str:
    """The ``init_method`` for ``deepspeed.init_distributed`` (MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE
    set); on one machine it also keeps the collectives' sockets on the loopback interface."""
    if ipaddress.ip_address(_master_address()[3][0]).is_loopback:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, loopback_interface())
    return INIT_METHOD


register_rendezvous_handler(INIT_METHOD.rstrip(":/"), _bound_rendezvous)
