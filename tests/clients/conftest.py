"""The client tests run against a real reward server on a loopback port (tests/server/conftest.py)."""

from ..server.conftest import make_server, server  # noqa: F401  (fixtures)
