"""Partition search: the contiguous split of the layers into stages that optimises a stage cost, exactly.

`min_max_partition` (auto, auto-compute, auto-latency) is a dynamic program over (stage, end layer) minimising
the largest stage cost, ties broken by the smallest sum of squared stage costs. `capacity_partition`
(auto-capacity) is exact too: the stages agree on the number of running requests (the minimum of each
stage's), which sets the state pool and so the tokens every stage holds; for each possible agreed value R it
maximises the minimum capacity over splits whose smallest stage value is exactly R (a dynamic program with
one flag), and keeps the best R. Both read their split back with the one `_backtrack`."""

from __future__ import annotations

from collections.abc import Sequence

from tandem.parallel.partition import uniform_partition
from tandem.runtime.planning.sizing import PoolSettings, stage_capacity, stage_requests, stage_sums, token_cap
from tandem.runtime.planning.stage_costs import ModelCosts


def min_max_partition(layer_costs: Sequence[float], pp_size: int,
                      stage_extra: Sequence[float] | None = None) -> list[int]:
    """Contiguous split of the layers into pp_size stages of >= 1 layer each that minimises the largest
    stage cost, where stage k costs sum(layer_costs in it) + stage_extra[k]. Exact (dynamic programming,
    O(pp_size * L^2)); among optimal splits it returns the one with the smallest sum of squared stage costs,
    then the lexicographically smallest."""
    L = len(layer_costs)
    uniform_partition(L, pp_size)  # validates pp_size against L
    extra = list(stage_extra) if stage_extra is not None else [0] * pp_size
    if len(extra) != pp_size:
        raise ValueError(f"stage_extra has {len(extra)} entries for {pp_size} stages")
    prefix = [0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(k: int, i: int, j: int):
        return prefix[j] - prefix[i] + extra[k]

    inf = float("inf")
    # best[k][j]: smallest possible max cost of stages 0..k covering layers [0, j)
    best = [[inf] * (L + 1) for _ in range(pp_size)]
    for j in range(1, L - pp_size + 2):
        best[0][j] = cost(0, 0, j)
    for k in range(1, pp_size):
        for j in range(k + 1, L - (pp_size - 1 - k) + 1):
            best[k][j] = min(max(best[k - 1][i], cost(k, i, j)) for i in range(k, j))
    limit = best[pp_size - 1][L]
    if isinstance(limit, float):
        limit = limit * (1 + 1e-12) + 1e-9  # float costs: tolerate rounding in the sums
    # second pass: among splits whose stages all cost <= limit, the smallest sum of squares
    sq: list[list] = [[None] * (L + 1) for _ in range(pp_size)]
    choice = [[[None] for _ in range(L + 1)] for _ in range(pp_size)]
    for j in range(1, L - pp_size + 2):
        c = cost(0, 0, j)
        if c <= limit:
            sq[0][j] = c * c
    for k in range(1, pp_size):
        for j in range(k + 1, L - (pp_size - 1 - k) + 1):
            for i in range(k, j):
                c = cost(k, i, j)
                if sq[k - 1][i] is None or c > limit:
                    continue
                value = sq[k - 1][i] + c * c
                if sq[k][j] is None or value < sq[k][j]:
                    sq[k][j], choice[k][j][0] = value, (i, 0)
    return _backtrack(choice, pp_size, L, 0)


def _backtrack(choice: list[list[list]], pp_size: int, num_layers: int, state: int) -> list[int]:
    """Layers per stage from a dynamic program's choices: `choice[k][j][state] = (i, previous)` says the best
    stages 0..k covering [0, j) in `state` end with stage k = [i, j), stages 0..k-1 being in state `previous`
    (`min_max_partition` has one state, `_capacity_dp` two)."""
    counts, j = [], num_layers
    for k in range(pp_size - 1, 0, -1):
        i, state = choice[k][j][state]
        counts.append(j - i)
        j = i
    counts.append(j)
    return counts[::-1]


def stage_extras(values: dict, pp_size: int) -> list:
    return [values[ModelCosts.position(k, pp_size)] for k in range(pp_size)]


def capacity_partition(costs: ModelCosts, pp_size: int, settings: PoolSettings) -> list[int]:
    """The split maximising the engine's KV capacity (see the module docstring). Exact; among splits of equal
    capacity it prefers a larger agreed request count, then the one found first."""
    L = costs.num_layers
    uniform_partition(L, pp_size)
    positions = {k: ModelCosts.position(k, pp_size) for k in range(pp_size)}
    sums = {(p, i, j): stage_sums(costs, i, j, p, settings)
            for p in set(positions.values()) for i in range(L) for j in range(i + 1, L + 1)}
    requests = {key: stage_requests(s, settings) for key, s in sums.items()}
    given = settings.max_running_requests is not None
    candidates = [settings.max_running_requests] if given else sorted({r for r in requests.values() if r >= 1})
    best_value, best_counts = None, None
    for agreed in candidates:  # ascending: a larger agreed count lowers what every stage's memory holds
        value, counts, bound = _capacity_dp(sums, requests, positions, L, pp_size, settings, agreed, exact=not given)
        if best_value is not None and bound < best_value and bound < token_cap(settings, agreed):
            break  # no split agreeing on `agreed` or more requests can do better (more requests raise the cap,
            # so only a bound below it, set by memory alone, also bounds them)
        if counts is not None and (best_value is None or value >= best_value):
            best_value, best_counts = value, counts
    if best_counts is None:  # nothing fits (the plan says so): the split that misses by the least
        relaxed = {key: max(r, 1) for key, r in requests.items()}
        _, best_counts, _ = _capacity_dp(sums, relaxed, positions, L, pp_size, settings, 1, exact=False)
    return best_counts


def _capacity_dp(sums, requests, positions, L: int, pp_size: int, settings: PoolSettings, agreed: int,
                 exact: bool) -> tuple[float, list[int] | None, float]:
    """Max over splits of the minimum stage capacity with state for `agreed` requests, over splits whose stages
    all allow `agreed` requests and (exact) one of them allows exactly that many: (value, split, bound). The
    bound drops the `exactly` condition: no split agreeing on `agreed` or more requests holds more than it
    (those splits are among these, and more requests leave each stage less room)."""
    inf = float("inf")
    value = {key: (_none_is_inf(stage_capacity(s, settings, agreed)), requests[key] == agreed or not exact)
             for key, s in sums.items() if requests[key] >= agreed}
    # best[k][j][flag]: the best minimum capacity of stages 0..k covering [0, j); flag: a stage allows exactly
    # `agreed` requests (always true when not exact)
    best = [[[None, None] for _ in range(L + 1)] for _ in range(pp_size)]
    choice = [[[None, None] for _ in range(L + 1)] for _ in range(pp_size)]
    for j in range(1, L - pp_size + 2):
        v = value.get((positions[0], 0, j))
        if v is not None:
            best[0][j][int(v[1])] = v[0]
    for k in range(1, pp_size):
        for j in range(k + 1, L - (pp_size - 1 - k) + 1):
            for i in range(k, j):
                v = value.get((positions[k], i, j))
                if v is None:
                    continue
                for flag in (0, 1):
                    prev = best[k - 1][i][flag]
                    if prev is None:
                        continue
                    new_flag, candidate = flag | int(v[1]), min(prev, v[0])
                    if best[k][j][new_flag] is None or candidate > best[k][j][new_flag]:
                        best[k][j][new_flag], choice[k][j][new_flag] = candidate, (i, flag)
    ends = [v for v in best[pp_size - 1][L] if v is not None]
    bound = max(ends) if ends else -inf
    final = best[pp_size - 1][L][1]
    if final is None:
        return -inf, None, bound
    return final, _backtrack(choice, pp_size, L, 1), bound


def _none_is_inf(tokens: int | None) -> float:
    return float("inf") if tokens is None else tokens
