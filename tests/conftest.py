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


def pytest_configure(config):
    torch.set_num_threads(2)
