"""Shared test fixtures: offline (outgoing connections fail), seeded, CPU, small threads."""
from __future__ import annotations

import socket

import pytest
import torch


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any outgoing connection (a hidden download) fails the test that makes it.

    Unix-domain sockets (used by torch.distributed's local rendezvous and multiprocessing) stay allowed,
    as do loopback addresses (gloo / TCPStore for the 2-process DDP tests)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def _allowed(address) -> bool:
        if isinstance(address, (str, bytes)):
            return True  # AF_UNIX path
        host = address[0] if isinstance(address, tuple) and address else ""
        return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0") or str(host).startswith("127.")

    def guarded_connect(self, address):
        if not _allowed(address):
            raise NetworkBlocked(f"test tried to open a network connection to {address!r}")
        return real_connect(self, address)

    def guarded_connect_ex(self, address):
        if not _allowed(address):
            raise NetworkBlocked(f"test tried to open a network connection to {address!r}")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (then the previous count): tiny models step several times faster than
    with 2 threads on a shared 2-core machine, where a second thread busy-waits for a busy core. Modules that
    train opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where no CUDA device is present (make gpu-check runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
