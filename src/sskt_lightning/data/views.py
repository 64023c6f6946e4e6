"""Task views: which images and labels a run sees, as index arrays into the full split arrays.

Applied in this order, all deterministic:
  a. `classes`   keep only these original classes (train and test);
  b. `label_map` original class id -> new class id (train and test);
  c. `train_part` [k, n]: keep part k of n disjoint parts of the training images (fixed seed,
     so parts are disjoint across runs whatever the run seed);
  d. `val_size`  hold out a validation set (count or fraction), drawn with `split_seed`; or
     `val_per_class` N validation images of every class, drawn with the run `seed` (it replaces
     `val_size`: a few-label task is selected on a validation set of its own scale);
  e. `labels_per_class` keep N labelled images per class, drawn with the run `seed`; the rest
     of the training images form the unlabeled pool.
Validation, labelled and unlabeled images are disjoint. A seed fixes the validation subset (with
`val_per_class`) and the labelled subset, whatever the method.
Multi-label data (N×K multi-hot labels, e.g. VOC 2007) takes only c and d (`val_size`): a, b, e,
`val_per_class` (and `class_names`) are single-label notions and raise ConfigError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sskt_lightning.errors import ConfigError

PART_SEED = 0  # fixed on purpose: train_part parts must not depend on the run seed
VAL_SEED_OFFSET = 1_000_003  # val_per_class draws with seed + this: a stream apart from the labels'


@dataclass
class TaskSplit:
    """Index arrays (int64, sorted) into the full train / test arrays, plus the task's labels."""

    train_labels: torch.Tensor  # new class id per full-train image, -1 where dropped (multi-label: N×K 0/1)
    test_labels: torch.Tensor  # same for the test split
    class_names: list[str]
    train: torch.Tensor  # labelled training images
    val: torch.Tensor  # held-out validation images (from the train split)
    unlabeled: torch.Tensor  # pool left by labels_per_class (empty without it)
    test: torch.Tensor  # test images of the kept classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_class_ids(ids: Sequence[int], n: int, option: str) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ConfigError(f"data.{option} has class ids {bad} outside 0..{n - 1}.")
    return ids


def class_lookup(names: Sequence[str], classes: Sequence[int] | None = None,
                 label_map: Sequence[int | None] | None = None,
                 class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Map every original class id to its new id (-1 = dropped); return (lookup, new names).

    Without `label_map`, the kept classes are numbered in the order `classes` lists them.
    `label_map` has one entry per original class (None or -1 drops it); kept classes must map
    onto 0..K-1 with no gaps. New names default to the joined original names ("a+b").
    """
    n = len(names)
    keep = list(range(n)) if classes is None else _check_class_ids(classes, n, "classes")
    if not keep or len(set(keep)) != len(keep):
        raise ConfigError(f"data.classes must list distinct class ids, got {list(classes or [])}.")
    lookup = torch.full((n,), -1, dtype=torch.int64)
    if label_map is None:
        lookup[keep] = torch.arange(len(keep))
    else:
        if len(label_map) != n:
            raise ConfigError(f"data.label_map needs one entry per original class ({n}), got {len(label_map)}.")
        for c in keep:
            lookup[c] = -1 if label_map[c] is None else int(label_map[c])
    used = sorted(set(lookup[lookup >= 0].tolist()))
    if not used or used != list(range(len(used))):
        raise ConfigError(f"data.label_map must map the kept classes onto 0..K-1 without gaps, got ids {used}.")
    new_names = [_joined_name(names, lookup, k) for k in used]
    if class_names is not None:
        if len(class_names) != len(used):
            raise ConfigError(f"data.class_names has {len(class_names)} names for {len(used)} classes.")
        new_names = [str(c) for c in class_names]
    return lookup, new_names


def _joined_name(names: Sequence[str], lookup: torch.Tensor, new_id: int) -> str:
    return "+".join(names[c] for c in (lookup == new_id).nonzero().flatten().tolist())


def relabel(labels: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """New label per image; -1 for dropped classes and for unknown (-1) labels."""
    out = torch.full_like(labels, -1)
    known = labels >= 0
    out[known] = lookup[labels[known]]
    return out


def take_part(indices: torch.Tensor, part: Sequence[int] | None, seed: int = PART_SEED) -> torch.Tensor:
    """Part k of n disjoint, covering parts of `indices` (`part` = [k, n]), by a seeded permutation."""
    if part is None:
        return indices
    if len(part) != 2:
        raise ConfigError(f"data.train_part must be [k, n], got {list(part)}.")
    k, n = (int(v) for v in part)
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"data.train_part [k, n] needs 0 <= k < n, got [{k}, {n}].")
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    return indices[perm].tensor_split(n)[k].sort().values


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"data.val_size must be a count or a fraction in (0, 1), got {val_size!r}.")
    if isinstance(val_size, float) and not val_size.is_integer():
        if not 0 < val_size < 1:
            raise ConfigError(f"data.val_size fraction must be in (0, 1), got {val_size}.")
        count = max(1, round(val_size * n))
    else:
        count = int(val_size)
    if not 0 < count < n:
        raise ConfigError(f"data.val_size={val_size} must leave 1..{n - 1} validation images out of the "
                          f"{n} training images (a validation set is required).")
    return count


def split_val(indices: torch.Tensor, val_size: int | float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (train, val) split of `indices` with `val_size` images (count or fraction) in val."""
    count = _val_count(val_size, len(indices))
    perm = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))]
    return perm[count:].sort().values, perm[:count].sort().values


def pick_per_class(indices: torch.Tensor, labels: torch.Tensor, n: int | None, num_classes: int,
                   seed: int = 0, option: str = "labels_per_class") -> tuple[torch.Tensor, torch.Tensor]:
    """(picked, rest): `n` random images of each class from `indices`, the others as rest."""
    if n is None:
        return indices, indices[:0]
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ConfigError(f"data.{option} must be an integer >= 1 (or null), got {n!r}.")
    n = int(n)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        of_class = indices[labels[indices] == c]
        if len(of_class) < n:
            where = ("in the training pool" if option == "val_per_class"
                     else "left after the validation split")
            raise ConfigError(f"data.{option}={n}, but class {c} has only {len(of_class)} training "
                              f"images {where}; lower data.{option} (or data.val_size / "
                              f"data.val_per_class).")
        chosen.append(of_class[torch.randperm(len(of_class), generator=gen)[:n]])
    labelled = torch.cat(chosen).sort().values
    rest = indices[~torch.isin(indices, labelled)]
    return labelled, rest


def check_multi_label_views(name: str, **views: object) -> None:
    """ConfigError when any single-label view (classes, label_map, ...) is set for multi-label data."""
    used = [k for k, v in views.items() if v is not None]
    if used:
        raise ConfigError(f"{', '.join('data.' + k for k in used)} cannot be used with {name}: its images carry "
                          f"several labels each, so class subsets, relabelling, renaming and N labels per class "
                          f"are undefined. Leave them null (data.train_part and data.val_size still apply).")


def _multi_label_split(train_labels: torch.Tensor, test_labels: torch.Tensor, names: Sequence[str],
                       train_part: Sequence[int] | None, val_size: int | float, split_seed: int) -> TaskSplit:
    """Steps c and d only; labels stay the multi-hot rows, every test image is kept."""
    pool = take_part(torch.arange(len(train_labels)), train_part)
    train, val = split_val(pool, val_size, split_seed)
    return TaskSplit(train_labels=train_labels, test_labels=test_labels, class_names=list(names), train=train,
                     val=val, unlabeled=train[:0], test=torch.arange(len(test_labels)))


def make_task_split(train_labels: torch.Tensor, test_labels: torch.Tensor, names: Sequence[str], *,
                    classes: Sequence[int] | None = None, label_map: Sequence[int | None] | None = None,
                    class_names: Sequence[str] | None = None, train_part: Sequence[int] | None = None,
                    val_size: int | float = 5000, split_seed: int = 0, labels_per_class: int | None = None,
                    seed: int = 0, val_per_class: int | None = None) -> TaskSplit:
    """Apply steps a-e to the original labels of the train and test splits (multi-hot: c, d)."""
    if train_labels.ndim == 2:
        check_multi_label_views("multi-label data", classes=classes, label_map=label_map, class_names=class_names,
                                labels_per_class=labels_per_class, val_per_class=val_per_class)
        return _multi_label_split(train_labels, test_labels, names, train_part, val_size, split_seed)
    lookup, new_names = class_lookup(names, classes, label_map, class_names)
    train_new, test_new = relabel(train_labels, lookup), relabel(test_labels, lookup)
    pool = take_part((train_new >= 0).nonzero().flatten(), train_part)
    if val_per_class is None:
        train, val = split_val(pool, val_size, split_seed)
    else:
        val, train = pick_per_class(pool, train_new, val_per_class, len(new_names), seed + VAL_SEED_OFFSET,
                                    option="val_per_class")
        if len(train) == 0:
            raise ConfigError(f"data.val_per_class={val_per_class} takes every training image; lower it.")
    train, unlabeled = pick_per_class(train, train_new, labels_per_class, len(new_names), seed)
    return TaskSplit(train_labels=train_new, test_labels=test_new, class_names=new_names, train=train, val=val,
                     unlabeled=unlabeled, test=(test_new >= 0).nonzero().flatten())
