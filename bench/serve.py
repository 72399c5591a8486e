"""Serve the API (``api.app:create_app``, settings from ``GRAFT_*``) under uvicorn, keeping TCP_NODELAY with workers.

``uvicorn --workers N`` (N > 1) binds its listening socket with protocol 0. Accepted connections inherit it, and
asyncio turns TCP_NODELAY on only for sockets that report IPPROTO_TCP, so Nagle's algorithm stays on and every
keep-alive response after a connection's first waits for the client's delayed ACK: about 40 ms on Linux
(Kludex/uvicorn#3149, open; uvicorn 0.54 has it). One worker is not affected: uvicorn then lets asyncio bind
from ``getaddrinfo``, which says IPPROTO_TCP. This binds the socket with IPPROTO_TCP itself and hands it to
uvicorn's own supervisor, so N workers behave as a deployment with the fix (or behind a proxy) would.

Used by ``bench.api``. Usage::

    python -m bench.serve --port 8000 --workers 2
"""

from __future__ import annotations

import argparse
import socket

import uvicorn
from uvicorn.supervisors import Multiprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    config = uvicorn.Config(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
    )
    if args.workers == 1:
        uvicorn.Server(config).run()
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    main()
