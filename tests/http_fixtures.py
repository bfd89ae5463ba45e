"""
A local HTTP server whose answers a test scripts, for every test of code that downloads
(nanochat.download and its callers: shards, the eval bundle, task data files); and a free port.
"""

import http.server
import io
import socket
import threading
import time
import zipfile
from pathlib import Path


class ScriptedServer:
    """
    A local HTTP server on a random port. bodies maps a file name (the URL path without its
    leading "/") to its bytes; any other name gets 404. script[name] lists what to answer to the
    successive requests for that file: an HTTP status, "ok" (the full body), "cut" (a full
    Content-Length, half the body, then the connection closes) or "stall" (a full Content-Length,
    half the body, then silence for a second, longer than the tests' read timeouts). Once the
    script runs out, every request gets "ok". hits lists the names asked for, in order.
    """

    def __init__(self, bodies: dict[str, bytes], script: dict[str, list] | None = None):
        self.bodies, self.script, self.hits = bodies, script or {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.hits.append(name)
                steps = server.script.get(name, [])
                action = steps.pop(0) if steps else "ok"
                if name not in server.bodies:
                    action = 404
                if isinstance(action, int):
                    self.send_error(action)
                    return
                body = server.bodies[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action in ("cut", "stall"):
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if action == "stall":
                        time.sleep(1.0)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (a server's, or MASTER_PORT for one spawn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_url(name: str = "") -> str:
    """A URL on a port that was free a moment ago: connections to it are refused, as offline."""
    return f"http://127.0.0.1:{free_port()}/{name}"


def bundle_zip_bytes() -> bytes:
    """The bundled CORE sample zipped as eval_bundle.zip is laid out: one eval_bundle/ folder."""
    sample_dir = Path(__file__).resolve().parent.parent / "nanochat" / "samples" / "eval_bundle"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sample_dir.rglob("*"):
            if path.is_file():
                archive.write(path, "eval_bundle/" + path.relative_to(sample_dir).as_posix())
    return buffer.getvalue()
