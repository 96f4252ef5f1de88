"""A free localhost port for servers and `torchrun` rendezvous started by tests (never a fixed number:
several test runs may share a machine)."""

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
