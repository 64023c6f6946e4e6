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
