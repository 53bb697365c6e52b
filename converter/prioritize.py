"""Order a layer's members so the files a workload reads first come first.

eStargz readers prefetch everything before `.prefetch.landmark` in one ranged read at mount
time. So the listed files (in the listed order) go first, each preceded by the entries it needs
to exist when extracted in order: its parent directories and, for a hardlink, its target. Then
the landmark, then every other member in its original order. With no list, the layer starts
with `.no.prefetch.landmark`, which tells readers not to prefetch.

Duplicate names (a later entry replacing an earlier one) move together, in their original
relative order, so extraction still ends with the last one.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from converter.tarinput import Member
from lazyfs.format.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from lazyfs.format.toc import clean_name


@dataclass
class Ordering:
    members: list[Member]  # prioritized members, in order
    rest: list[Member]  # everything else, in input order
    landmark: str  # the landmark file to put between the two
    missing: list[str]  # listed paths not present in this layer


def prioritize(members: list[Member], listed_paths: list[str]) -> Ordering:
    by_path: dict[str, list[int]] = {}
    for index, member in enumerate(members):
        by_path.setdefault(clean_name(member.info.name), []).append(index)

    moved: list[int] = []
    taken: set[int] = set()
    missing: list[str] = []

    def take(path: str, depth: int = 0) -> None:
        # Depth bounds the recursion for hardlink chains; a chain longer than the entry count
        # is a cycle, which the layer's own extraction would fail on too.
        if depth > len(members):
            return
        if path:
            take(posixpath.dirname(path), depth + 1)
        for index in by_path.get(path, ()):
            if index in taken:
                continue
            taken.add(index)
            info = members[index].info
            if info.islnk():
                take(clean_name(info.linkname), depth + 1)
            moved.append(index)

    for listed in listed_paths:
        path = clean_name(listed)
        if path not in by_path:
            missing.append(listed)
            continue
        take(path)

    if not moved:
        return Ordering([], list(members), NO_PREFETCH_LANDMARK, missing)
    rest = [m for i, m in enumerate(members) if i not in taken]
    return Ordering([members[i] for i in moved], rest, PREFETCH_LANDMARK, missing)
