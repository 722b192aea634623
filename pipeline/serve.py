"""A loopback HTTP server for a folder of files (a source stage serves its pool with it during a run).

It serves the pool's files from one directory, bound to 127.0.0.1 only. URLs under `/slow/` are
answered after a delay, to exercise download timeouts.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"


class _PoolRequestHandler(SimpleHTTPRequestHandler):
    slow_seconds: float = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
            self.path = "/" + self.path[len("/slow/") :]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Silence per-request logging: thousands of lines would hide the pipeline's output."""


class PoolServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections from img2dataset's many threads,
    # which then wait a full SYN retransmit (1 s) or time out.
    request_queue_size = 1024


@contextmanager
def serve_directory(directory: Path, port: int = 0, slow_seconds: float = 0.0) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1:`port` (0 = any free port); yield the base URL."""
    handler = type("PoolHandler", (_PoolRequestHandler,), {"slow_seconds": slow_seconds})
    try:
        server = PoolServer((LOOPBACK, port), functools.partial(handler, directory=str(directory)))
    except OSError as err:
        raise RuntimeError(f"cannot start the loopback file server on {LOOPBACK}:{port}: {err.strerror}") from err
    thread = threading.Thread(target=server.serve_forever, name="loopback-file-server", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
