"""A soft-label cache: each frozen source's logits for every (image, view), paid once.

What is exact: the entries. A run looks up the very (image array, index, view) it draws, and every
answer, hit or miss, is the stored row, so a cold and a warm run agree bit for bit. The values are
the online logits up to the storage layout's rounding (``fp16``: relative error <= 2^-11 per logit;
``topk``: see ``store.Layout.decode``), so a cached run is not bit for bit an online one, also at
``trainer.precision=32-true``.

``store.py``  the on-disk store (layouts, atomic creation, crash-safe commits, concurrent writers)
``keys.py``   what a store is keyed by; opening a run's stores and attaching them to its SourceBank
``__main__``  ``python -m sskt_lightning.cache build|info|clear``

Nothing is imported here, so ``python -m sskt_lightning.cache info`` starts without torch.
"""
