"""A real HTTP server on 127.0.0.1 standing in for huggingface.co and github.com in tests.

Hub: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with the headers huggingface_hub reads
(X-Repo-Commit, ETag = sha256 for weights / git blob id for config.json, Content-Length, Range).
GitHub: ``GET /{repo}/raw/{commit}/{file}`` redirects to ``/raw.githubusercontent.com/...`` like the
real site. Files are copies of the published weights (../shared/weights); ``taef2.safetensors`` is
built from the two taef2 .pth files with diffusers' keys (decoder index - 1), written here by hand so
that the code under test is not its own oracle. ``faults[path]`` breaks one file on purpose;
``requests`` lists every (method, path) received.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAULTS = ("truncate", "corrupt", "drop", "drop_once", "swap")


def combined_taef2(weights: Path) -> bytes:
    from safetensors.torch import save
    tensors = {}
    for part in ("encoder", "decoder"):
        sd = torch.load(weights / f"taef2_{part}.pth", map_location="cpu", weights_only=True)
        for key, t in sd.items():
            index, rest = key.split(".", 1)
            tensors[f"{part}.layers.{int(index) - (part == 'decoder')}.{rest}"] = t.contiguous()
    return save(tensors, metadata={"format": "pt"})


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    def __init__(self, weights: Path, github_commit: str):
        self.files: dict[str, bytes] = {}       # URL path -> bytes as published
        self.faults: dict[str, str | bytes] = {}   # URL path -> fault name, or bytes served instead
        self.requests: list[tuple[str, str]] = []
        self.github_commit = github_commit
        self.add_hub("madebyollin/taef2", "taef2.safetensors", combined_taef2(weights))
        for name in ("taef2_encoder.pth", "taef2_decoder.pth", "taesana_encoder.pth"):
            self.add_github("madebyollin/taesd", name, (weights / name).read_bytes())
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- content
    def add_hub(self, repo: str, name: str, data: bytes) -> str:
        path = f"/{repo}/resolve/main/{name}"
        self.files[path] = data
        return path

    def add_github(self, repo: str, name: str, data: bytes, commit: str | None = None) -> str:
        path = f"/{repo}/raw/{commit or self.github_commit}/{name}"
        self.files[path] = data
        return path

    def add_diffusers_folder(self, repo: str, folder: Path) -> None:
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            self.add_hub(repo, name, (folder / name).read_bytes())

    def hub_path(self, repo: str, name: str) -> str:
        return f"/{repo}/resolve/main/{name}"

    def github_path(self, name: str, repo: str = "madebyollin/taesd", commit: str | None = None) -> str:
        return f"/{repo}/raw/{commit or self.github_commit}/{name}"

    def count(self, contains: str = "") -> int:
        with self._lock:
            return sum(contains in p for _, p in self.requests)

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- serving
    def _lookup(self, path: str) -> str | None:
        if path in self.files:
            return path
        parts = path.split("/")   # a pinned hub revision serves the same files as main
        if len(parts) > 5 and parts[3] == "resolve" and parts[4] == HUB_COMMIT:
            parts[4] = "main"
            alias = "/".join(parts)
            return alias if alias in self.files else None
        return None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                with hub._lock:
                    hub.requests.append((self.command, self.path))
                if self.path.startswith("/raw.githubusercontent.com/"):
                    owner, repo, commit, name = self.path.split("/")[2:6]
                    key = f"/{owner}/{repo}/raw/{commit}/{name}"
                elif "/raw/" in self.path:
                    owner, repo, _, commit, name = self.path.split("/")[1:6]
                    target = f"/raw.githubusercontent.com/{owner}/{repo}/{commit}/{name}"
                    return self._send(302, b"", {"Location": target}, body)
                else:
                    key = hub._lookup(self.path)
                if key is None or key not in hub.files:
                    return self._send(404, b"Not Found", {"X-Error-Code": "EntryNotFound"}, body)
                published = hub.files[key]
                data, fault = self._faulty(key, published)
                headers = {"Accept-Ranges": "bytes"}
                if "/resolve/" in key:   # what huggingface_hub reads from its HEAD request
                    lfs = not key.endswith(".json")   # weights are LFS files (sha256), config.json is git
                    etag = hashlib.sha256(published).hexdigest() if lfs else git_blob_id(published)
                    headers.update({"X-Repo-Commit": HUB_COMMIT, "ETag": f'"{etag}"'})
                start = self._range_start()
                if start and fault != "drop":
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, data[start:], headers, body)
                if body and fault in ("drop", "drop_once"):
                    return self._drop(data, headers)
                self._send(200, data, headers, body)

            def _faulty(self, key: str, data: bytes) -> tuple[bytes, str | None]:
                fault = hub.faults.get(key)
                if isinstance(fault, bytes):
                    return fault, "swap"
                if fault == "truncate":
                    return data[: len(data) // 2], fault
                if fault == "corrupt":
                    mid = len(data) // 2
                    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:], fault
                if fault == "drop_once" and self.command == "GET":
                    hub.faults.pop(key)   # the next request is served whole
                return data, fault

            def _range_start(self) -> int:
                value = self.headers.get("Range", "")
                if value.startswith("bytes=") and value.endswith("-"):
                    return int(value[6:-1])
                return 0

            def _drop(self, data: bytes, headers: dict) -> None:
                """Promise the whole file, send half, close the connection."""
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler


def main() -> None:
    """Serve from the command line (for trying run.sh by hand): python tests/loopback_hub.py WEIGHTS."""
    import sys

    from taesd.registry import TAESD_GITHUB_COMMIT
    hub = LoopbackHub(Path(sys.argv[1]), TAESD_GITHUB_COMMIT).start()
    print(json.dumps({"HF_ENDPOINT": hub.url, "TAESD_GITHUB_URL": hub.url}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
