import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/data_fixtures.py
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def cifar_dir(tmp_path_factory):
    from data_fixtures import write_cifar10
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, n_train=80, n_test=24)
    return root
