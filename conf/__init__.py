"""The Hydra configs, edited here (the repository's conf/) and installed as the package
``sskt_lightning.conf`` (see pyproject.toml): ``pkg://sskt_lightning.conf`` in Hydra's search path."""
