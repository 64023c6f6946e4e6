import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/data_fixtures.py
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")



@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny CPU batches: one intra-op thread is faster and steadier than two fighting over 2 cores
    (and the DDP tests' worker processes need the cores too)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cifar_dir(tmp_path_factory):
    from data_fixtures import write_cifar10
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, n_train=80, n_test=24)
    return root


@pytest.fixture
def offline(monkeypatch):
    """No network, as on our offline machines, whatever the machine running the tests: every DNS lookup
    fails at once. Records the events that make an offline failure slow instead of wall-clock time:
    ``lookups`` (each host a download tried) and ``sleeps`` (each ``time.sleep`` of the test's own
    thread: a retry back-off; recorded, not slept)."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    events = SimpleNamespace(lookups=[], sleeps=[])
    main, real_sleep = threading.get_ident(), time.sleep

    def fail(host, *args, **kwargs):
        events.lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    def sleep(seconds):
        if threading.get_ident() != main:
            return real_sleep(seconds)
        events.sleeps.append(seconds)

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(time, "sleep", sleep)
    return events
