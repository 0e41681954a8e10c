"""docs/federated.md's production deployment against the installed Flower: the API paths the proxy filters,
the flags the commands use, and the fact that makes the proxy necessary (the Control API answers on the
Fleet API's port without credentials)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "federated.md").read_text(encoding="utf-8")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_the_proxy_passes_exactly_flowers_fleet_api():
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet

    assert fleet.prefix == "/v1/fleet" and control.prefix == "/v1/control"
    assert f"location {fleet.prefix}/ {{" in DOC and "location / { return 404; }" in DOC
    client_paths = set(re.findall(r'path="(/v1/[a-z-]+/[a-z-]+)"',
                                  (Path(sys.modules["flwr"].__file__).parent / "supernode" / "fleet_http_client.py").read_text()))
    assert client_paths and all(path.startswith(fleet.prefix + "/") for path in client_paths)  # a SuperNode needs nothing else


@pytest.mark.parametrize("command, flags", [
    (["flower-superlink"], ["--host", "--port", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                            "--disable-runtime-dependency-installation", "--database"]),
    (["flower-supernode"], ["--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config"]),
    (["flwr", "supernode", "register"], ["PUBLIC_KEY", "SUPERLINK", "--name"]),
])
def test_the_documented_flags_exist(command, flags):
    result = subprocess.run([_bin(command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=120, check=False)
    text = result.stdout + result.stderr
    for flag in flags:
        assert flag in text, (command, flag)
        if flag.startswith("--"):
            assert flag in DOC, flag


@pytest.mark.slow
def test_the_control_api_answers_on_the_fleet_port_without_credentials(tmp_path):
    """Why devices must reach the SuperLink only through a proxy that passes /v1/fleet/: the SuperLink's one
    port (loopback by default) also serves the Control API, which lists nodes for anyone who asks."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen([_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                "--database", ":flwr-in-memory:", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        status = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and status is None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/control/list-nodes", data=b"", method="POST",
                                             headers={"content-type": "application/protobuf"})
            try:
                status = urllib.request.urlopen(request, timeout=5).status
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert process.poll() is None, "the SuperLink exited"
                time.sleep(0.5)
        assert status == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
