"""deeplab2's TensorFlow Hungarian solver, ported to PyTorch decision for decision, in float32.

Described in docs/deeplab2.md#matching (the `loss.matcher` switch).

deeplab2 (`model/loss/matchers_ops.py`, `hungarian_matching`) minimises square float32 costs with a
loop-based Hungarian method: shift rows and columns to a zero minimum, match greedily on the zeros,
grow the matching by augmenting paths and, while it is not perfect, move the zeros with a Koenig
vertex cover. `model/loss/max_deeplab_loss.py` gives it `-similarity` in deeplab2's 181-row layout
with void rows and padding at +-999 (`nonsquare_hungarian_matching`). Shifting by a -999 minimum
turns a cost c in [-1, 0] into `999 + c`, where float32 values are 2^-14 ~ 6.1e-5 apart: similarity
differences below that are rounded away, and the solver returns an optimum of the *rounded* costs,
ties broken by its own search order. On weak or ambiguous predictions (early training, similarities
of 1e-4 and below) that is often not the exact optimum that `models/matching.py` finds by default.

This port keeps every decision of deeplab2's algorithm, so that on the same float32 input it returns
the same permutation:
- the float32 arithmetic on the costs in deeplab2's order (row then column shift, cover updates);
- the greedy start (row by row, each row's lowest free zero);
- the breadth-first alternating-path search from all free workers at once, where a newly reached
  job keeps the largest free-worker id among the current workers reaching it and the lowest-index
  worker carrying that id (TensorFlow's argmax takes the first maximum); one augmenting path per
  search, ending at the lowest-index free job reached; Koenig's cover from the last search.
Only the bookkeeping differs. deeplab2 runs the integer steps as dense S x S tensor operations in
`tf.while_loop`s over the batch; here they run per image on bitsets (a Python int per row of
zeros), the same search in far fewer operations, while the costs stay a float32 tensor. Solving the
images one by one changes nothing: an image whose matching is complete is left unchanged by the
batch's extra iterations (its cover holds every row, so no entry is uncovered or doubly covered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# deeplab2 `max_deeplab_loss.py`: `_MATCHING_NEGATIVE_CONSTANT` (padding; void rows when there are
# at least as many slots as GT columns) and `_MATCHING_POSITIVE_CONSTANT` (void rows otherwise).
MATCHING_NEGATIVE_CONSTANT = -999.0
MATCHING_POSITIVE_CONSTANT = 999.0
# Speed only: above this many set bits, numpy lists a bitset's positions faster than a Python loop.
_UNPACK_ABOVE = 24


@dataclass
class _Assignment:
    """A partial matching of workers (rows) to jobs (columns): index lists (-1 = free) and the
    bitsets of the matched workers and jobs."""

    job_of: list[int]
    worker_of: list[int]
    matched_workers: int = 0
    matched_jobs: int = 0


@dataclass
class _Search:
    """What one alternating-path search found (deeplab2's search `state`).

    Attributes:
        reached_jobs: bitset of the reached jobs (`jobs > 0`); complete when `new_jobs` is empty.
            The reached workers (`workers > 0`) are the free ones and the holders of reached jobs.
        claims: (worker, bitset of the jobs it reached first) in search order; the predecessor of
            a job on its path (`jobs_from_worker`) is the worker that claimed it.
        new_jobs: bitset of the reached jobs that are free, where augmenting paths end (after an
            early stop, only the lowest-index free job).
    """

    reached_jobs: int
    claims: list[tuple[int, int]]
    new_jobs: int


def _lowest(bits: int) -> int:
    """The position of the lowest set bit of a non-zero bitset."""
    return (bits & -bits).bit_length() - 1


def _positions(bits: int, size: int) -> list[int]:
    """The positions of the set bits of a bitset of `size` bits, lowest first."""
    if bits.bit_count() > _UNPACK_ABOVE:
        data = np.frombuffer(bits.to_bytes((size + 7) // 8, "little"), dtype=np.uint8)
        return np.flatnonzero(np.unpackbits(data, bitorder="little")).tolist()
    positions = []
    while bits:
        lowest = bits & -bits
        positions.append(lowest.bit_length() - 1)
        bits ^= lowest
    return positions


def _flags(bits: int, size: int) -> torch.Tensor:
    """A bitset as a bool tensor of `size` entries."""
    data = np.frombuffer(bits.to_bytes((size + 7) // 8, "little"), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(data, bitorder="little")[:size].astype(bool))


def _prepare(weights: torch.Tensor) -> torch.Tensor:
    """Subtract each row's minimum, then each column's (deeplab2 `_prepare`); S x S float32."""
    weights = weights - weights.amin(dim=1, keepdim=True)
    return weights - weights.amin(dim=0, keepdim=True)


def _zero_rows(weights: torch.Tensor) -> list[int]:
    """The zeros of each row (deeplab2's `adj_matrix`) as bitsets: bit j of row i is
    `weights[i, j] == 0`."""
    packed = np.packbits((weights == 0).numpy(), axis=1, bitorder="little")  # S x bytes
    data, width = packed.tobytes(), packed.shape[1]
    return [int.from_bytes(data[i * width : (i + 1) * width], "little") for i in range(len(packed))]


def _greedy_assignment(zero_rows: list[int]) -> _Assignment:
    """Row by row, give each worker its lowest zero whose job is still free (deeplab2
    `_greedy_assignment`: an argmax over the candidates, i.e. the first one)."""
    S = len(zero_rows)
    assignment = _Assignment([-1] * S, [-1] * S)
    for worker, zeros in enumerate(zero_rows):
        candidates = zeros & ~assignment.matched_jobs
        if candidates:
            job = _lowest(candidates)
            assignment.job_of[worker], assignment.worker_of[job] = job, worker
            assignment.matched_jobs |= 1 << job
            assignment.matched_workers |= 1 << worker
    return assignment


def _find_augmenting_path(zero_rows: list[int], assignment: _Assignment) -> _Search:
    """Breadth-first search of alternating paths from every free worker at once (deeplab2
    `_find_augmenting_path`).

    Each step, the current workers reach the jobs of their zeros not reached before, and each such
    job leads back over its matched entry to its worker, a current worker of the next step. deeplab2
    gives a newly reached job the largest id of a free worker (path origin) among the current
    workers reaching it, and as predecessor the lowest-index worker carrying that id; visiting the
    current workers by decreasing origin, then increasing index, and letting each claim the jobs not
    claimed yet gives exactly that. deeplab2 searches the unmatched zeros only; including the
    matched ones changes nothing, as a current matched worker's own job is already reached.

    deeplab2 always completes the search, then augments towards the lowest-index free job reached.
    Once the lowest-index free job of all is reached, that choice and its path are settled, so the
    search stops there; a search that reaches no free job, the one the cover is built from, runs to
    the end.
    """
    S = len(zero_rows)
    worker_of = assignment.worker_of
    every = (1 << S) - 1
    unmatched = every & ~assignment.matched_workers
    free_jobs = every & ~assignment.matched_jobs
    first_free = free_jobs & -free_jobs  # the lowest-index free job, as a bitset
    reached_jobs = 0
    claims = []
    current = [(-worker, worker) for worker in _positions(unmatched, S)]  # (-origin, worker)
    while current:
        reach = 0
        for _, worker in current:
            reach |= zero_rows[worker]
        if not reach & ~reached_jobs:  # often: no current worker reaches a new job
            break
        current.sort()
        following: list[tuple[int, int]] = []
        for negative_origin, worker in current:
            jobs = zero_rows[worker] & ~reached_jobs
            if jobs:
                reached_jobs |= jobs
                claims.append((worker, jobs))
                if jobs & first_free:
                    return _Search(reached_jobs, claims, first_free)
                held = _positions(jobs & assignment.matched_jobs, S)
                following.extend((negative_origin, worker_of[job]) for job in held)
        current = following
    return _Search(reached_jobs, claims, reached_jobs & free_jobs)


def _improve_assignment(assignment: _Assignment, search: _Search) -> None:
    """Flip the entries of one augmenting path, in place (deeplab2 `_improve_assignment`).

    The path ends at the lowest-index free job that the search reached and is walked back to a free
    worker, from a job to its predecessor worker and from a worker to its matched job; each worker
    on it takes the job the walk came from.
    """
    job = _lowest(search.new_jobs)
    assignment.matched_jobs |= 1 << job
    while job >= 0:
        worker = next(w for w, jobs in search.claims if jobs >> job & 1)
        previous = assignment.job_of[worker]  # -1: a free worker, where the path starts
        assignment.job_of[worker], assignment.worker_of[job] = job, worker
        job = previous
    assignment.matched_workers |= 1 << worker


def _maximum_bipartite_matching(zero_rows: list[int], assignment: _Assignment) -> _Search:
    """Augment one path at a time until no free job can be reached, in place (deeplab2
    `_maximum_bipartite_matching`); returns the last search."""
    search = _find_augmenting_path(zero_rows, assignment)
    while search.new_jobs:
        _improve_assignment(assignment, search)
        search = _find_augmenting_path(zero_rows, assignment)
    return search


def _compute_cover(search: _Search, assignment: _Assignment) -> tuple[int, int]:
    """Koenig's minimum vertex cover from the last search (deeplab2 `_compute_cover`).

    Returns:
        Bitsets of the covered workers (matched, not reached: their job was not reached) and jobs
        (matched and reached).
    """
    S = len(assignment.job_of)
    unreached_held = assignment.matched_jobs & ~search.reached_jobs
    workers_cover = sum(1 << assignment.worker_of[job] for job in _positions(unreached_held, S))
    return workers_cover, assignment.matched_jobs & search.reached_jobs


def _update_weights_using_cover(
    weights: torch.Tensor, workers_cover: int, jobs_cover: int
) -> torch.Tensor:
    """Subtract the smallest uncovered weight m from the uncovered entries and add it to the doubly
    covered ones (deeplab2 `_update_weights_using_cover`), bit for bit.

    deeplab2 takes m over the entries with the covered ones set to the batch maximum (the same m,
    as some entry is uncovered while the cover is incomplete) and computes `(w + add) - subtract`
    with `add`, `subtract` in {0, m}; `w + (r_i m + (c_j - 1) m)`, the bracket being exactly m, 0 or
    -m, rounds identically.
    """
    S = weights.shape[0]
    rows, cols = _flags(workers_cover, S), _flags(jobs_cover, S)
    min_weight = torch.where(rows.unsqueeze(1) | cols.unsqueeze(0), torch.inf, weights).amin()
    row_part = torch.where(rows, min_weight, 0.0).unsqueeze(1)  # S x 1
    col_part = torch.where(cols, 0.0, -min_weight).unsqueeze(0)  # 1 x S
    return weights + (row_part + col_part)


def _solve(weights: torch.Tensor) -> list[int]:
    """deeplab2's `hungarian_matching` on one S x S float32 cost matrix: the job of each worker."""
    S = weights.shape[0]
    weights = _prepare(weights)
    zero_rows = _zero_rows(weights)
    assignment = _greedy_assignment(zero_rows)
    search = _maximum_bipartite_matching(zero_rows, assignment)
    workers_cover, jobs_cover = _compute_cover(search, assignment)
    while workers_cover.bit_count() + jobs_cover.bit_count() < S:
        weights = _update_weights_using_cover(weights, workers_cover, jobs_cover)
        zero_rows = _zero_rows(weights)
        search = _maximum_bipartite_matching(zero_rows, assignment)
        workers_cover, jobs_cover = _compute_cover(search, assignment)
    return assignment.job_of


def _solve_batch(weights: torch.Tensor) -> torch.Tensor:
    """weights: B x S x S -> B x S int64, the job (column) of each worker (row)."""
    if weights.ndim != 3 or weights.shape[1] != weights.shape[2]:
        raise ValueError(
            f"deeplab2's Hungarian solver needs B x S x S costs, got {tuple(weights.shape)}"
        )
    weights = weights.detach().to(device="cpu", dtype=torch.float32)
    return torch.tensor([_solve(image) for image in weights], dtype=torch.long).reshape(
        weights.shape[:2]
    )


def deeplab2_hungarian(weights: torch.Tensor) -> torch.Tensor:
    """deeplab2's `hungarian_matching`: a minimum-cost perfect matching of square float32 costs.

    Args:
        weights: B x S x S costs (any float dtype and device; solved in float32 on the CPU).

    Returns:
        B x S x S bool permutation matrices on the CPU (row = worker, column = job).

    Raises:
        ValueError: the costs are not a batch of square matrices.
    """
    job_of = _solve_batch(weights)
    return torch.nn.functional.one_hot(job_of, job_of.shape[1]).bool()


def deeplab2_match(
    similarity: torch.Tensor,
    mask_valid: torch.Tensor,
    mask_columns: torch.Tensor,
    *,
    num_columns: int,
) -> torch.Tensor:
    """Match as deeplab2's loss does: its row layout, its +-999 fill and padding, its solver.

    deeplab2 (`max_deeplab_loss.py`) solves one `num_columns` x N problem per image (181 x 128 on
    COCO): row c is GT column c (thing id, then stuff class) with costs `-similarity`, void rows
    cost +999 when there are fewer slots than rows and -999 otherwise, and
    `nonsquare_hungarian_matching` pads the matrix to square with -999. Row order and padding both
    steer the solver's tie-breaking, so they are rebuilt here from the compact rows. Non-finite
    similarities (a diverged model) count as 0, as in `matching.hungarian_match`.

    Args:
        similarity: B x M x N, the PQ-style similarity of each compact GT mask and slot.
        mask_valid: B x M bool, compact rows that are real masks.
        mask_columns: B x M int64, deeplab2's column of each compact row (-1 on padding).
        num_columns: deeplab2's number of GT columns, max_thing_id + number of stuff classes.

    Returns:
        mask_slot: B x M int64 on the device of `similarity`, the slot of each valid mask; -1 for
            padding rows and for masks that deeplab2 puts on a padded slot (more masks than slots).
    """
    B, M, num_slots = similarity.shape
    sim = torch.nan_to_num(similarity.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).cpu()
    valid = mask_valid.cpu()
    rows = torch.where(valid, mask_columns.cpu(), num_columns)  # padding rows: a dropped row
    full_sim = torch.zeros(B, num_columns + 1, num_slots)
    full_sim.scatter_(1, rows.unsqueeze(2).expand(B, M, num_slots), sim)
    full_valid = torch.zeros(B, num_columns + 1)
    full_valid.scatter_(1, rows, valid.float())
    full_sim, full_valid = full_sim[:, :num_columns], full_valid[:, :num_columns].unsqueeze(2)
    fewer_slots = num_slots < num_columns
    void_cost = MATCHING_POSITIVE_CONSTANT if fewer_slots else MATCHING_NEGATIVE_CONSTANT
    costs = -full_sim * full_valid + (1 - full_valid) * void_cost  # deeplab2's expression
    size = max(num_columns, num_slots)
    costs = torch.nn.functional.pad(
        costs, (0, size - num_slots, 0, size - num_columns), value=MATCHING_NEGATIVE_CONSTANT
    )
    slot = _solve_batch(costs)[:, :num_columns]  # B x num_columns; >= num_slots: padding
    slot = torch.where(slot < num_slots, slot, -1)
    mask_slot = torch.where(valid, slot.gather(1, rows.clamp(max=num_columns - 1)), -1)
    return mask_slot.to(similarity.device)
