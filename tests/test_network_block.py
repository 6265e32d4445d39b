"""The offline guarantee rests on the network block: prove it refuses and reports."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import NETBLOCK_DIR, child_env


def test_block_refuses_a_public_host_in_this_process(network_guard):
    network_guard.expect_attempts()
    with pytest.raises(OSError):
        urllib.request.urlopen("https://pypi.org/simple/", timeout=5)
    assert any("pypi.org" in line for line in network_guard.attempts())


def test_block_refuses_a_public_ip_in_this_process(network_guard):
    network_guard.expect_attempts()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        sock.connect(("1.1.1.1", 443))
    sock.close()
    assert any("1.1.1.1" in line for line in network_guard.attempts())


def test_block_refuses_and_reports_inside_a_child_process(network_guard, tmp_path):
    network_guard.expect_attempts()
    code = (
        "import urllib.request\n"
        "try:\n"
        "    urllib.request.urlopen('https://huggingface.co/api/models', timeout=5)\n"
        "except OSError as e:\n"
        "    print('refused:', type(e).__name__)\n"
        "else:\n"
        "    print('REACHED')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert "refused" in proc.stdout, proc.stdout + proc.stderr
    assert any("huggingface.co" in line for line in network_guard.attempts())
    # the child reported under its own pid, not ours
    assert all(line.startswith("pid ") for line in network_guard.attempts())
    assert (NETBLOCK_DIR / "sitecustomize.py").exists()


def test_loopback_stays_open(network_guard):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(("localhost", server.getsockname()[1]), timeout=5)
    conn, _ = server.accept()
    client.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    for s in (client, conn, server):
        s.close()
    assert network_guard.attempts() == []


class RecordingProxy:
    """A TCP server on loopback standing in for a developer's local proxy: it counts who calls."""

    def __init__(self):
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.server.close()


@pytest.fixture
def proxy():
    fake = RecordingProxy()
    yield fake
    fake.close()


def proxy_env(url: str) -> dict:
    return {name: url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY")}


def test_a_proxy_variable_given_to_a_child_does_not_open_a_way_out(network_guard, proxy):
    network_guard.expect_attempts()
    code = (
        "import os, urllib.request\n"
        "print('proxy vars left:', sorted(k for k in os.environ if k.lower().endswith('_proxy')))\n"
        "try:\n"
        "    urllib.request.urlopen('https://pypi.org/simple/', timeout=5)\n"
        "except OSError as e:\n"
        "    print('refused:', type(e).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(proxy_env(proxy.url)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "proxy vars left: []" in proc.stdout and "refused" in proc.stdout, proc.stderr
    assert proxy.connections == 0  # nothing went through the proxy...
    assert any("pypi.org" in line for line in network_guard.attempts())  # ...nor around it


def test_the_guard_clears_the_proxy_variables_of_the_developers_environment(proxy, tmp_path):
    """A pytest session started with proxy variables set: its tests still cannot leave."""
    shutil.copy(NETBLOCK_DIR.parent / "conftest.py", tmp_path / "conftest.py")
    shutil.copytree(NETBLOCK_DIR, tmp_path / "netblock")
    (tmp_path / "test_inner.py").write_text(
        "import os, urllib.request\n"
        "import pytest\n\n\n"
        "def test_inner(network_guard):\n"
        "    network_guard.expect_attempts()\n"
        "    assert not [k for k in os.environ if k.lower().endswith('_proxy')]\n"
        "    with pytest.raises(OSError):\n"
        "        urllib.request.urlopen('https://example.com/', timeout=5)\n"
        "    assert any('example.com' in line for line in network_guard.attempts())\n"
    )
    # No sitecustomize in this session's own interpreter: only the fixture stands guard.
    env = {k: v for k, v in os.environ.items() if k not in ("NETBLOCK_LOG", "PYTHONPATH")}
    env.update(proxy_env(proxy.url))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proxy.connections == 0
