"""Which source? Transferability scores of candidate source networks on a target's labelled images.

``scores``   LEEP, NCE and LogME as pure functions of arrays (float64), and a seeded bootstrap
             interval over images
``sskt_lightning.rank``  the command: ``python -m sskt_lightning.rank data=<target> source=[a,b]``

Formulas: ``docs/ranking.md``. Nothing heavy is imported here.
"""
