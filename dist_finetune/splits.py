"""Source-independent checks of a train/val split: the seeded stratified split that keeps identical
images together, groups of byte-identical images (leakage, duplicates), class counts, imbalance
and class weights. Items are plain strings and images are known by their content hash only.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from .errors import DataError

IMBALANCE_RATIO = 10  # warn when the smallest class has under 1/10 of the largest's train images
SHOWN = 5  # items listed in a warning before "... and N more"
TABLE_CLASSES = 30  # class counts are a table up to this many classes, a summary above


def stratified_split(labels: Sequence[int], fraction: float, seed: int,
                     groups: Sequence | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class to val, at least one, seeded.

    ``groups``: one key per sample (its content hash); samples with equal keys go to the same side,
    counted in the class of the group's first sample, so a duplicated image never sits in both (unless
    all of a class's images are identical). Without duplicates the split is the plain per-sample one.
    """
    generator = torch.Generator().manual_seed(seed)
    members: dict = {}
    for index, key in enumerate(groups if groups is not None else range(len(labels))):
        members.setdefault(key, []).append(index)
    by_class: dict[int, list[list[int]]] = {}
    for group in members.values():
        by_class.setdefault(labels[group[0]], []).append(group)
    train, val = [], []
    for label in sorted(by_class):
        class_groups = by_class[label]
        size = sum(len(group) for group in class_groups)
        if size < 2:
            raise DataError(f"class {label} has {size} image(s): a val split needs at least 2 per class")
        if len(class_groups) < 2:  # all its images identical: split them anyway (check_images reports the leak)
            class_groups = [[index] for index in class_groups[0]]
        order = torch.randperm(len(class_groups), generator=generator).tolist()
        n_val, taken = min(size - 1, max(1, round(size * fraction))), 0
        for position, group in enumerate(class_groups[i] for i in order):
            if taken < n_val and position < len(order) - 1:
                val += group
                taken += len(group)
            else:
                train += group
    return sorted(train), sorted(val)


def identical_groups(items: Sequence[str], digests: dict[str, str]) -> list[list[str]]:
    """Groups (2 or more, in ``items`` order) of items whose bytes are identical."""
    known = list(map(digests.get, items))
    repeated = {digest for digest, count in Counter(known).items() if count > 1 and digest is not None}
    by_digest: dict[str, list[str]] = {}
    for item, digest in zip(items, known) if repeated else ():
        if digest in repeated:
            by_digest.setdefault(digest, []).append(item)
    return list(by_digest.values())


def first_listings(role: str, items: Sequence[str], labels: Sequence[int],
                   classes: Sequence[str]) -> tuple[list[int], str | None]:
    """Indices of each item's first listing in one split, and a warning naming the items listed more than once.

    The same file listed twice is not a duplicate image but one image: it is kept once. Listed with two
    labels, it is refused (which one is meant cannot be guessed).
    """
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        earlier = first.setdefault(item, index)
        if labels[earlier] != labels[index]:
            raise DataError(f"{role} lists {item} twice, as {classes[labels[earlier]]} and as "
                            f"{classes[labels[index]]}: keep the row with the right label")
    counts = Counter(items)
    repeated = [f"{item} ({count} times)" for item, count in counts.items() if count > 1]
    line = (f"warning: {role} lists {len(repeated)} file(s) more than once, kept once each: {_listing(repeated)}"
            if repeated else None)
    return sorted(first.values()), line


def later_duplicates(groups: list[list[str]], train_items: set[str]) -> tuple[set[str], set[str]]:
    """What deduplication drops (from train, from val): every member of each group but its first, so exactly
    one copy of each image stays. Groups list train before val, so the train copy is kept; a file listed in
    both splits is in its group twice, its train listing first."""
    from_train: set[str] = set()
    from_val: set[str] = set()
    for group in groups:
        seen: set[str] = set()
        for position, item in enumerate(group):
            on_train = item in train_items and item not in seen
            seen.add(item)
            if position:
                (from_train if on_train else from_val).add(item)
    return from_train, from_val


def _listing(pairs: list[str]) -> str:
    more = f", ... and {len(pairs) - SHOWN} more" if len(pairs) > SHOWN else ""
    return ", ".join(pairs[:SHOWN]) + more


def duplicate_report(groups: list[list[str]], train_items: set[str], val_items: set[str], labels: dict[str, str],
                     dedupe: bool) -> list[str]:
    """Lines about leakage across train/val (the same file in both, then byte-identical images), duplicates
    within a split, and identical images with conflicting labels.

    ``groups`` list train items before val items (a file in both splits twice); ``dedupe``: all but each
    group's first were dropped.
    """
    lines = []
    shared = sorted(train_items & val_items)
    if shared:
        fix = "dropped from val (dedupe)" if dedupe else "remove them from one side (--dedupe drops them from val)"
        lines.append(f"warning: {len(shared)} file(s) listed in both train and val (leakage: validation overstates "
                     f"accuracy); {fix}: {_listing(shared)}")
    copies = [list(dict.fromkeys(group)) for group in groups if len(set(group)) > 1]  # other files, same bytes
    leaks = [group for group in copies if val_items & set(group) and train_items & set(group)]
    if leaks:
        pairs = [" = ".join(group) for group in leaks]
        fix = ("dropped from val (dedupe)" if dedupe else
               "drop them with dedupe=True (--dedupe), or remove them from one side")
        leaked = sum(len(val_items & set(group)) for group in leaks)
        lines.append(f"warning: {leaked} image(s) in val are byte-identical to train images (leakage: "
                     f"validation overstates accuracy); {fix}: {_listing(pairs)}")
    within = [group for group in copies if group not in leaks]
    if within:
        action = "dropped all but the first (dedupe)" if dedupe else "kept (--dedupe drops all but the first)"
        lines.append(f"{len(within)} group(s) of byte-identical images within a split, {action}: "
                     f"{_listing([' = '.join(group) for group in within])}")
    conflicting = [group for group in copies if len({labels[item] for item in group}) > 1]
    if conflicting:
        pairs = [" = ".join(f"{item} ({labels[item]})" for item in group) for group in conflicting]
        lines.append(f"warning: {len(conflicting)} group(s) of identical images carry different labels: "
                     f"{_listing(pairs)}")
    return lines


def class_count_lines(classes: list[str], train: Sequence[int], val: Sequence[int]) -> list[str]:
    """Images per class in train and val: one line per class up to TABLE_CLASSES classes, else min / median /
    max with the smallest classes named (a table of 1,000 lines is read by nobody)."""
    train_counts, val_counts = Counter(train), Counter(val)
    lines = [f"images per class (train / val), {len(train)} / {len(val)} in all:"]
    if len(classes) <= TABLE_CLASSES:
        width = max(len(name) for name in classes)
        return lines + [f"  {name:<{width}}  {train_counts[i]:>6} / {val_counts[i]}" for i, name in enumerate(classes)]
    for role, counts in (("train", train_counts), ("val", val_counts)):
        ordered = sorted(range(len(classes)), key=lambda c: (counts[c], c))
        values = [counts[c] for c in ordered]
        smallest = ", ".join(f"{classes[c]} ({counts[c]})" for c in ordered[:SHOWN])
        lines.append(f"  {role}: {len(classes)} classes, min {values[0]} / median {values[len(values) // 2]} / "
                     f"max {values[-1]} images; smallest: {smallest}")
    return lines


def imbalance_warning(classes: list[str], train: Sequence[int]) -> str | None:
    """A warning when the smallest class has under 1/IMBALANCE_RATIO of the largest's train images."""
    counts = Counter(train)
    smallest = min(range(len(classes)), key=lambda c: counts[c])
    largest = max(range(len(classes)), key=lambda c: counts[c])
    if counts[smallest] * IMBALANCE_RATIO >= counts[largest]:
        return None
    return (f"warning: class imbalance: {classes[smallest]} has {counts[smallest]} train images, under "
            f"1/{IMBALANCE_RATIO} of {classes[largest]} ({counts[largest]}); consider class_weights='auto' "
            "(--class-weights auto) or balanced_sampler=True (--balanced-sampler)")


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """Inverse-frequency loss weights N / (C * n_c) (scikit-learn's "balanced"); every class must occur."""
    counts = Counter(labels)
    return [len(labels) / (num_classes * counts[c]) for c in range(num_classes)]
