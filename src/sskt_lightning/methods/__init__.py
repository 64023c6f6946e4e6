"""Transfer methods, each selected with ``method=<name>`` (``conf/method/<name>.yaml``)."""
from sskt_lightning.methods.base import Method
from sskt_lightning.methods.dml import DML
from sskt_lightning.methods.kd import KD
from sskt_lightning.methods.maxl import MAXL
from sskt_lightning.methods.scratch import Scratch
from sskt_lightning.methods.sskt import SSKT

__all__ = ["Method", "Scratch", "SSKT", "KD", "DML", "MAXL"]
