"""How make_plan picks what to remove besides plain ranking order: no two neighbouring blocks (no_adjacent),
attention/MLP branches by their own scores, the best contiguous span (angular distance), and the check that
a ratio is reachable under the protection rule. Lower score = removed first."""
from __future__ import annotations

from typing import Optional, Sequence

from shortllm.errors import PlanError
from shortllm.pruning.sizes import blocks_for_ratio, count_params
from shortllm.scoring.scores import Scores


def adjacent_pairs(indices: Sequence[int]) -> list[tuple[int, int]]:
    s = sorted(set(int(i) for i in indices))
    return [(a, b) for a, b in zip(s, s[1:]) if b == a + 1]


def _room(taken: set[int], lo: int, hi: int) -> int:
    """How many more blocks in [lo, hi) can be taken without neighbouring each other or `taken`: each free run
    of m positions between taken blocks (and their neighbours) holds ceil(m / 2)."""
    room, run = 0, 0
    for i in range(lo, hi):
        if i in taken or (i - 1) in taken or (i + 1) in taken:
            room += (run + 1) // 2
            run = 0
        else:
            run += 1
    return room + (run + 1) // 2


def non_adjacent(order: Sequence[int], remove: Optional[int], ratio: Optional[float], unit_params: Sequence[int],
                  total: int, first: int, last: int, L: int, what: str) -> list[int]:
    """Blocks from `order` (least important first), never two neighbours. remove=K: a pick is skipped when it
    would leave no non-adjacent room for the rest of the K, so the result exists whenever K fits at all.
    ratio=r: the greedy non-adjacent pick order, cut where the removed parameter share is closest to r."""
    lo, hi = first, L - last
    most = _room(set(), lo, hi)
    want = remove
    if ratio is not None:
        greedy: list[int] = []
        for i in order:
            if i - 1 not in greedy and i + 1 not in greedy:
                greedy.append(i)
        need = blocks_for_ratio(float(ratio), list(order), unit_params, total)
        if need > len(greedy):
            best = sum(unit_params[i] for i in greedy) / total
            raise PlanError(f"ratio={ratio} needs about {need} {what}, but no two may neighbour each other "
                            f"(no_adjacent): the greedy pick holds {len(greedy)}, {best:.4f} of the parameters; "
                            f"ask for ratio <= {best:.4f} or drop no_adjacent")
        return sorted(greedy[:blocks_for_ratio(float(ratio), greedy, unit_params, total)])
    assert want is not None, "remove or ratio is given"
    if want > most:
        raise PlanError(f"cannot remove {want} {what} without two neighbours (no_adjacent): the removable range "
                        f"{lo}..{hi - 1} (protect=({first}, {last})) holds at most {most}; ask for remove <= {most} "
                        "or drop no_adjacent")
    taken: set[int] = set()
    for i in order:
        if len(taken) == want:
            break
        if i - 1 in taken or i + 1 in taken:
            continue
        if _room(taken | {i}, lo, hi) >= want - len(taken) - 1:
            taken.add(i)
    assert len(taken) == want, f"non-adjacent selection found {len(taken)} of {want}"
    return sorted(taken)


def branch_selection(scores: Scores, metric: str, kind: str, adapter, remove: Optional[int], ratio: Optional[float],
                      first: int, last: int, L: int, total: int, no_adjacent: bool) -> list[tuple[str, int]]:
    """The `kind` branches ("attn"/"mlp") with the lowest `metric` scores, as (kind, block) pairs."""
    blocks_mod = adapter.blocks()
    branch_params = [count_params(adapter.branch(b, kind)) for b in blocks_mod]
    order = [i for i in scores.ranking(metric) if first <= i < L - last]
    if no_adjacent:
        picked = non_adjacent(order, remove, ratio, branch_params, total, first, last, L, f"{kind} branches")
        return [(kind, i) for i in picked]
    if remove is not None:
        if remove > len(order):
            raise PlanError(f"cannot remove {remove} {kind} branches: with protect=({first}, {last}) only "
                            f"{len(order)} of {L} blocks' {kind} branches are removable; ask for fewer")
        k = remove
    else:
        most = sum(branch_params[i] for i in order) / total
        if float(ratio) > most:
            raise PlanError(f"ratio={ratio} is more than all removable {kind} branches hold ({most:.4f} of the "
                            f"parameters); ask for ratio <= {most:.4f}, or remove whole blocks (another metric)")
        k = blocks_for_ratio(float(ratio), order, branch_params, total)
    return [(kind, i) for i in sorted(order[:k])]


def check_ratio_reachable(ratio: float, ranking: Sequence[int], order: Sequence[int], block_params: Sequence[int],
                           total: int, first: int, last: int, L: int) -> None:
    """PlanError when the protection rule, not the ratio, would decide the plan: without protection the
    ratio needs more blocks than the protected model has removable (SPEC: never a silent different drop)."""
    need = blocks_for_ratio(ratio, ranking, block_params, total)
    if need > len(order):
        best = sum(block_params[i] for i in order) / total
        raise PlanError(f"ratio={ratio} needs about {need} blocks, but with protect=({first}, {last}) only "
                        f"{len(order)} of {L} blocks are removable: the largest ratio possible is {best:.4f}; ask for "
                        f"ratio <= {best:.4f} or lower protect")


def best_span(scores: Scores, n: Optional[int], ratio: Optional[float], first: int, last: int, L: int,
          block_params: Sequence[int], total: int) -> list[int]:
    if "angular" not in scores.values or scores.values["angular"].dim() != 2:
        raise PlanError("span=True needs the angular distance matrix; score with metrics including 'angular'")
    ang = scores.values["angular"]
    n_max = ang.shape[0]
    if n is None:
        # spans of n blocks: blocks are uniform in every supported architecture, so use the mean block size
        per = sum(block_params) / L
        n = max(1, min(L - 1, round(float(ratio) * total / per)))
    if n > n_max:
        raise PlanError(f"a span of {n} blocks is longer than the scored n_max={n_max}; re-score with "
                        f"n_max >= {n} or ask for a shorter span")
    starts = list(range(first, L - last - n + 1))
    if not starts:
        raise PlanError(f"no span of {n} blocks fits between the protected first {first} and last {last} of "
                        f"{L} blocks; ask for a shorter span or lower protect")
    row = ang[n - 1]
    best = min(starts, key=lambda s: (float("inf") if row[s].isnan() else float(row[s]), s))
    return list(range(best, best + n))
