"""Nothing in the foundation reaches the network: assets, tokenizer and checkpoint loading are local."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys

import pytest


class NetworkBlocked(OSError):
    pass


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need a DNS look-up


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach a non-loopback address is recorded and refused."""
    attempts: list = []
    real_connect, real_connect_ex, real_create = (socket.socket.connect, socket.socket.connect_ex,
                                                  socket.create_connection)

    def connect(self, address):
        if not _is_local(address):
            attempts.append(address)
            raise NetworkBlocked(f"network access in a test: {address!r}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            attempts.append(address)
            raise NetworkBlocked(f"network access in a test: {address!r}")
        return real_connect_ex(self, address)

    def create_connection(address, *args, **kwargs):
        if not _is_local(address):
            attempts.append(address)
            raise NetworkBlocked(f"network access in a test: {address!r}")
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def test_the_network_guard_works(no_network):
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with socket.socket() as s, pytest.raises(NetworkBlocked):
        s.connect(("huggingface.co", 443))
    assert len(no_network) == 2
    no_network.clear()


def test_assets_tokenizer_and_checkpoint_load_offline(no_network, tiny_checkpoint):
    from transformers import AutoTokenizer

    from grmserve.training.core import assets
    from grmserve.training.core.checkpoint import load_grm

    folder = assets.tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token == assets.PAD_TOKEN and tok.pad_token_id == 0
    loaded = load_grm(tiny_checkpoint)
    assert loaded.tokenizer is not None and loaded.format == "grm"
    assert no_network == []  # nothing tried (and had its error swallowed)


def test_importing_env_switches_hugging_face_offline():
    import grmserve.training.core.env  # noqa: F401

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # In a fresh interpreter without any of the variables set, importing the package sets them.
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    code = ("import os, grmserve.training.core.env; "
            "print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'], "
            "os.environ['HF_DATASETS_OFFLINE'])")
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]


def test_model_module_sets_offline_before_transformers_loads():
    """Importing the model module alone (as the server does) is enough to be offline."""
    clean = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import sys, os; import grmserve.training.core.model; "
            "import huggingface_hub.constants as c; print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"]
