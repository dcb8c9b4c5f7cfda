"""Budgets from a sensitivity scan: how many weights to prune in each layer (or how many tokens to drop at each
selector location) so that the total is exactly a given count and the predicted accuracy damage is least.

The model of damage. A scan measured, for each unit u (a layer's weights, or the tokens at a selector location) on
its own, the top-1 drop d_u(s) at a few sparsities s. Between the measured points the drop is linear; it starts at
(0, 0), is made non-decreasing (a measured drop below an earlier one is noise), and ends where the whole unit is gone
with the drop to chance (`worst`). The predicted damage of an allocation is the sum of the units' drops (additive:
the layers' damages are taken as independent, which a scan of one layer at a time cannot check).

The allocation. Each unit's curve is replaced by its lower convex hull; the hull segments of all units are sorted by
their cost per pruned weight (slope) and taken in that order until the budget is spent, the last one partially.
On convex curves this greedy water-filling is optimal, and since one sorted order serves every budget, a larger
budget prunes everything a smaller one prunes: the rounds of IMP, each with the allocation of its own level, only
ever add to the masks. Ties go by unit order (the model order), so the result is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from spkprune.errors import SpkpruneError
from spkprune.models.selector import cumulative_keep, tokens_kept
from spkprune.store import Artifact, Store, format_ref

OVER = ("layers", "structures", "locations")


@dataclass(frozen=True)
class Curve:
    """The predicted drop of one unit against how many of its `size` entries are pruned (at most `cap`)."""

    size: int
    cap: int  # the most that may go (a layer keeps one weight, a location one token)
    points: tuple[tuple[int, float], ...]  # (count, drop), counts increasing from (0, 0) to (cap, worst)

    @classmethod
    def of(cls, size: int, measured: Sequence[tuple[float, float]], worst: float, cap: int | None = None) -> "Curve":
        """From measured (sparsity, drop) pairs; `worst` is the drop when the whole unit is gone."""
        cap = size - 1 if cap is None else cap
        points, highest = [(0, 0.0)], 0.0
        for sparsity, drop in sorted(measured):
            count = min(round(sparsity * size), cap)
            highest = max(highest, float(drop))
            if count > points[-1][0]:
                points.append((count, highest))
        if cap > points[-1][0]:
            points.append((cap, max(highest, float(worst))))
        return cls(size, cap, tuple(points))

    def drop(self, count: int) -> float:
        """The predicted drop with `count` pruned (linear between points)."""
        for (c0, d0), (c1, d1) in zip(self.points, self.points[1:]):
            if count <= c1:
                return d0 + (d1 - d0) * (count - c0) / (c1 - c0)
        return self.points[-1][1]

    def hull(self) -> list[tuple[int, float]]:
        """The lower convex hull of the points (the cheapest way down each curve)."""
        hull: list[tuple[int, float]] = []
        for point in self.points:
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
                hull.pop()
            hull.append(point)
        return hull


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def allocate(curves: Mapping[str, Curve], budget: int) -> dict[str, int]:
    """How many entries of each unit to prune: exactly `budget` in all, least predicted damage (module docstring)."""
    room = sum(curve.cap for curve in curves.values())
    if not 0 <= budget <= room:
        raise SpkpruneError(f"cannot prune {budget} entries: the scanned units allow at most {room}")
    segments = []
    for order, (unit, curve) in enumerate(curves.items()):
        hull = curve.hull()
        for (c0, d0), (c1, d1) in zip(hull, hull[1:]):
            segments.append(((d1 - d0) / (c1 - c0), order, c0, c1 - c0, unit))
    counts = {unit: 0 for unit in curves}
    left = budget
    for _slope, _order, _start, length, unit in sorted(segments):
        if left == 0:
            break
        take = min(length, left)
        counts[unit] += take
        left -= take
    return counts


def predicted_drop(curves: Mapping[str, Curve], counts: Mapping[str, int]) -> float:
    return sum(curve.drop(counts[unit]) for unit, curve in curves.items())


def non_decreasing(counts: Sequence[int]) -> list[int]:
    """The closest non-decreasing integers with the same sum (pool adjacent violators): tokens dropped before a
    selector stay dropped at every later one, so cumulative drops cannot fall from one location to the next."""
    blocks: list[list[int]] = []  # [total, members]
    for count in counts:
        blocks.append([count, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, members = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += members
    out = []
    for total, members in blocks:
        base, extra = divmod(total, members)
        out += [base] * (members - extra) + [base + 1] * extra
    return sorted(out)  # only a rounding step can be out of order between pooled blocks


# ------------------------------------------------------------------------------------------------- the stored scan
def scan_tag(tag: str, over: str) -> str:
    """Where the scan of NAME@TAG over `over` is stored: NAME@sensitivity-OVER (TAG main), else
    NAME@TAG.sensitivity-OVER."""
    return f"sensitivity-{over}" if tag == "main" else f"{tag}.sensitivity-{over}"


def stored_scan(store: Store | None, art: Artifact | None, over: str, what: str) -> dict:
    """The scan of `art` over `over`, as `spkprune sensitivity` stored it; one line naming the command to run when
    there is none (`what` is the option that needs it)."""
    found = store.get(art.name, scan_tag(art.tag, over)) if store is not None and art is not None else None
    if found is None:
        ref = art.ref if art is not None else "REF"
        raise SpkpruneError(f"{what} needs a sensitivity scan of {ref} over {over}: run spkprune sensitivity {ref} "
                            f"--over {over} first")
    return found.meta["sensitivity"]


def curves_of(scan: dict) -> dict[str, Curve]:
    """The drop curve of every unit of a stored scan, in the scan's order."""
    measured: dict[str, list[tuple[float, float]]] = {}
    sizes, caps = {}, {}
    for row in scan["rows"]:
        measured.setdefault(row["unit"], []).append((row["sparsity"], row["drop"]))
        sizes[row["unit"]], caps[row["unit"]] = row["size"], row["cap"]
    worst = max(scan["base_top1"] - scan["chance"], 0.0)
    return {unit: Curve.of(sizes[unit], points, worst, caps[unit]) for unit, points in measured.items()}


def scan_ref(art: Artifact, over: str) -> str:
    return format_ref(art.name, scan_tag(art.tag, over))


def location_keep(scan: dict, keep: float | list[float], locations: Sequence[int]) -> list[float]:
    """Cumulative keep ratios for selectors at `locations` that drop as many tokens in all as `keep` does uniformly
    (rho, rho^2, ... or the given list), spread with the least predicted damage, and non-increasing from one
    location to the next."""
    curves = curves_of(scan)
    units = [f"block {location}" for location in locations]
    missing = [unit for unit in units if unit not in curves]
    if missing:
        raise SpkpruneError(f"the sensitivity scan of {scan['source']} has no {missing[0]}; run spkprune sensitivity "
                            f"{scan['source']} --over locations again")
    tokens = curves[units[0]].size
    budget = sum(tokens - tokens_kept(tokens, ratio) for ratio in cumulative_keep(keep, list(locations)))
    counts = allocate({unit: curves[unit] for unit in units}, budget)
    return [(tokens - dropped) / tokens for dropped in non_decreasing([counts[unit] for unit in units])]
