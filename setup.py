"""Only what pyproject.toml cannot say: the package list is every package found under src/ PLUS
``sskt_lightning.conf``, which is the repository's top-level conf/ mapped into the package
(pyproject.toml's package-dir), so the Hydra configs ship in the wheel and resolve in editable installs."""
from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "sskt_lightning.conf"])
