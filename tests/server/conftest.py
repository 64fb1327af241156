"""Fixtures: one real `lowbit serve` (default model, CPU) for the session, and clients of it."""
from __future__ import annotations

import pytest

from live_server import API_KEY, Server, httpx


@pytest.fixture(scope="session")
def server():
    """One server for the session: API key required, small context and pool, block-manager checks on."""
    s = Server("--api-key", API_KEY, "--max-model-len", "512", "--max-num-seqs", "8",
               "--max-request-bytes", "100000", "--check-invariants")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server):
    """Raw HTTP with the key (for what the openai client will not send)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c
