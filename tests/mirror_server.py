"""A local HTTP server that plays good and bad dataset mirrors, for the download tests."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MirrorServer:
    """Serves ``files`` (name -> bytes) at ``http://127.0.0.1:PORT/<mode>/<name>``.

    Modes: ``good``; ``missing`` answers 404; ``corrupt`` serves the file with one
    byte changed; ``hang`` says nothing for ``hang_seconds``; ``truncated``
    announces the full length, sends half and closes the connection.
    """

    def __init__(self, files: dict[str, bytes], hang_seconds: float = 5.0) -> None:
        self.files = files
        self.hang_seconds = hang_seconds
        self.requests: list[str] = []
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, mode: str) -> str:
        """The base URL of a mirror that behaves as ``mode``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/{mode}/"

    def __enter__(self) -> MirrorServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                mode, _, name = self.path.strip("/").partition("/")
                if mode == "hang":
                    mirror._release.wait(mirror.hang_seconds)
                    return
                body = mirror.files.get(name)
                if mode == "missing" or body is None:
                    self.send_error(404)
                    return
                if mode == "corrupt":
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)

            def log_message(self, format: str, *args: object) -> None:
                """Keep the test output quiet."""

        return Handler
