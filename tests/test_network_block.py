"""The offline guarantee rests on the network block: prove it refuses and reports."""

import socket
import sys
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
    import subprocess

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
