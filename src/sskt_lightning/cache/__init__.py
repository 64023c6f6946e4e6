"""An exact soft-label cache: each frozen source's logits for every (image, view), paid once.

``store.py``  the on-disk store (layouts, atomic creation, crash-safe commits, concurrent writers)
``keys.py``   what a store is keyed by; opening a run's stores and attaching them to its SourceBank
``__main__``  ``python -m sskt_lightning.cache build|info|clear``

Nothing is imported here, so ``python -m sskt_lightning.cache info`` starts without torch.
"""
