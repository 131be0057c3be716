"""Improved precision and recall (Kynkaanniemi et al.), as ADM's evaluator computes them, exactly.

Squared Euclidean distances; the radius of a point is its distance to the k-th nearest point of its
own set with itself included (k = 3: the 4th smallest, self being 0); a point is inside the other
manifold if its distance to some point there is <= that point's radius.

`distance="fp32"` (the default) decides every comparison on the float64 distance sum((u - v)^2) of
the pair, a function of the pair alone, so the result is the same at any block size and worker
count. It runs at float32 speed: distances come from one float32 GEMM per block together with a
rigorous bound on their rounding error, and only the pairs the bound cannot decide (a radius within
the error of a distance: about one in a thousand) are recomputed in float64.
`distance="fp16"` reproduces ADM's fp16 distance arithmetic, for matching published numbers.
"""

import functools

import numpy as np
import torch

from .strict_fp32 import strict_fp32

# |float32 distance - exact| <= GAMMA * (|u| + |v|)^2 <= 2 GAMMA (|u|^2 + |v|^2): the float32 dot product of
# length K errs by at most K * eps * |u||v| (any summation order), the norms, the final sum and the
# float32 comparisons with the margin folded in add a few eps more (16 covers them).
EPS32 = 2.0 ** -24
K_NEAREST = 3  # ADM's evaluator's k: a radius is the 4th smallest distance in its set, self (0) included


def _gamma(dim: int) -> float:
    # (+3: the rows are shifted by a mean and rounded to float32 first, which moves a distance by at most
    # 2.02 eps (|u'| + |v'|)^2 from the exact one of the rows as given)
    return 1.01 * (dim + 19) * EPS32


def _sum_rows(host: torch.Tensor) -> torch.Tensor:
    return sum((c.double().sum(0) for c in host.split(4096)), torch.zeros(host.shape[1], dtype=torch.float64))


class _Points:
    """A feature set on the device: float32 rows and norms, and each row's share of the error bound; and
    the rows on the CPU as given, where the undecided pairs' float64 distances are summed in one order on any
    device. The device rows are shifted by `center` (the set's mean unless given; two sets compared with each
    other share one): distances do not change, but the error bound scales with the rows' norms, and from
    the mean those are small where samples are near-duplicates (a collapsed snapshot's), whose every pair
    would otherwise be undecided (n^2 float64 sums, hours and hundreds of GB at 50k)."""

    def __init__(self, features, device, center: torch.Tensor | None = None):
        self.host = torch.as_tensor(np.asarray(features), dtype=torch.float32).contiguous()
        center = _sum_rows(self.host) / len(self.host) if center is None else center
        shifted = torch.cat([(c.double() - center).float() for c in self.host.split(4096)])
        self.f32 = shifted.to(device)
        norm2 = torch.cat([(c.double() ** 2).sum(1) for c in shifted.split(512)]).to(device)  # cache-sized pieces
        self.n32 = norm2.float()
        self.half_n32 = self.n32 * -0.5  # exact: the GEMM's bias (see _approx)
        self.err = (2 * _gamma(self.f32.shape[1]) * norm2).float()  # bound(i, j) = err_i + err_j

    def __len__(self):
        return len(self.f32)


def _approx(a: _Points, rows: slice, b: _Points, cols: slice) -> torch.Tensor:
    """float32 distances of a[rows] x b[cols], each within a.err[i] + b.err[j] of the exact one (so they
    may dip below 0; they are only ever compared with their bounds). One GEMM with -|v|^2 / 2 as its bias,
    then |u|^2 - 2 x that, one pass: the same rounding as |u|^2 + (|v|^2 - 2 u.v), scaling by 2 being exact."""
    g = _gemm_bias(a.f32[rows], b.f32[cols], b.half_n32[cols])
    return torch.add(a.n32[rows, None], g, alpha=-2, out=g)


def _gemm_bias(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ y.T + bias in true float32 (no TF32, no bf16). On a CPU through oneDNN when it computes in float32
    there (checked once): 15-35% faster than the default BLAS on the CPUs we measured (bench/RESULTS.md)."""
    if x.device.type == "cpu" and _onednn_float32():
        return torch.ops.mkldnn._linear_pointwise(x, y, bias, "none", [], "")
    return torch.addmm(bias[None], x, y.T)


@functools.cache
def _onednn_float32() -> bool:
    """Does oneDNN's linear exist here and keep float32 products? 1 + 2^-13 survives float32 but not the
    bf16 or TF32 inputs some builds switch to; 64 of them sum exactly (20 bits) in any order."""
    try:
        x = torch.full((64, 64), 1 + 2.0 ** -13)
        out = torch.ops.mkldnn._linear_pointwise(x, torch.ones(64, 64), torch.zeros(64), "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool((out == 64 * (1 + 2.0 ** -13)).all())


def _exact(a: _Points, i: torch.Tensor, b: _Points, j: torch.Tensor) -> torch.Tensor:
    """float64 sum((u - v)^2) of the pairs (a[i], b[j]), row by row: a function of each pair only, on the
    CPU (a GPU's reduction order depends on the launch shape). In chunks that stay in cache (memory-bound)."""
    i, j = i.cpu(), j.cpu()
    out = torch.empty(len(i), dtype=torch.float64)
    for s in range(0, len(i), 512):
        diff = a.host[i[s:s + 512]].double().sub_(b.host[j[s:s + 512]].double())
        out[s:s + 512] = (diff * diff).sum(1)
    return out.to(a.f32.device)


def _capped(features: np.ndarray, k: int) -> tuple[np.ndarray | slice, np.ndarray | slice]:
    """(kept, copy): the row indices that keep at most k+1 copies of each distinct row, and for every row
    the position in `kept` of an identical kept row. The (k+1)-th smallest of a multiset sees at most k+1
    copies of any value, so every radius is the same on the kept rows, a dropped row's radius and memberships
    are its kept twin's, and a ball repeated adds nothing to a manifold. Identical rows come from degenerate
    samples (a diverged snapshot's all-black images): all pairs of them would be undecided (n^2 exact sums)."""
    n = len(features)
    rows = np.ascontiguousarray(features).reshape(n, -1)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()  # bytes: -0.0 != 0.0 (safe)
    _, group, counts = np.unique(keys, return_inverse=True, return_counts=True)
    group = group.ravel()
    if counts.max() <= k + 1:
        return slice(None), slice(None)  # nothing to drop: views, no copy
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nth = np.empty(n, dtype=np.int64)
    nth[order] = np.arange(n) - starts[group[order]]  # each row's occurrence number among its copies
    kept = np.flatnonzero(nth <= k)
    position = np.full(n, -1)
    position[kept] = np.arange(len(kept))
    first = position[order[starts]]  # per group (in group order), its first occurrence: always kept
    return kept, first[group]


def radii(features: np.ndarray, k: int = 3, block: int = 2048, distance: str = "fp32", device="cpu",
          comm=None) -> np.ndarray:
    """k-NN radius (squared) of every point against its own set; comm (eval.comm) splits the work over
    workers, each of which returns all the radii."""
    _check_size(features, k)
    comm = comm or _single()
    if distance == "fp16":
        return _gathered(comm, lambda rows: _radii_fp16(features, k, block, device, rows), len(features))
    kept, copy = _capped(features, k)
    with strict_fp32():  # the error bound assumes true float32 products
        return _radii(_Points(features[kept], device), k, block, comm)[copy]


def _single():
    from .comm import Single
    return Single()


def _gathered(comm, fn, n: int) -> np.ndarray:
    """fn(rows) of each worker's share of n rows, concatenated in row order on every worker."""
    return np.concatenate(comm.allgather(fn(comm.rows(n))))


def _check_size(features, k):
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(features)}")


def _limits(t, err_row, max_err):
    """(limit, loose) per row, t being the (k+1)-th smallest approximate distance of k+1 of the row's pairs.
    The row's exact radius is at most t + err_row + max_err, and a pair's approximate distance is at most
    err_row + err_col below its exact one, so a pair can be within the radius only if d - err_col <= limit
    (_candidate), and only if d <= loose: one comparison per row selects a superset first."""
    limit = t + 2 * err_row + max_err
    return limit, limit + max_err


def _candidate(d, err_col, limit):
    return d - err_col <= limit


def _kth(r: torch.Tensor, exact: torch.Tensor, nrows: int, k: int) -> np.ndarray:
    """The (k+1)-th smallest exact distance per row among candidate pairs (row indices r)."""
    order = torch.argsort(exact, stable=True)
    order = order[torch.argsort(r[order], stable=True)]  # by row, then by exact distance
    starts = torch.searchsorted(r[order], torch.arange(nrows, device=r.device))
    return exact[order][starts + k].cpu().numpy()


def _radii(pts: _Points, k: int, block: int, comm) -> np.ndarray:
    """All radii from the upper-triangle blocks only (distances are symmetric): half the GEMM work, the blocks
    dealt out over the workers. Each row's k+1 smallest approximate distances so far (`best`) start from its
    own diagonal block (shared by all workers) and only fall. A block's pairs within the loose limit of their
    row's or their column's `best` are kept; they hold every value that can still enter `best` (so it is
    updated from them alone, with no pass over the block) and a superset of the final candidates, which the
    final limit then filters. A pair of an off-diagonal block is a candidate for its row and, swapped, for its
    column. Every worker's `best` bounds the radii from above; the smallest bound is the final limit."""
    n, dev = len(pts), pts.f32.device
    best = torch.full((n, k + 1), float("inf"), device=dev)
    max_err = pts.err.max()
    kept_r, kept_c, kept_d, kept_off = [], [], [], []

    def loose(idx):
        return _limits(best[idx, k], pts.err[idx], max_err)[1]

    def keep(r, c, d, off):
        kept_r.append(r), kept_c.append(c), kept_d.append(d)
        kept_off.append(torch.full_like(r, off, dtype=torch.bool))

    nothing = torch.empty(0, dtype=torch.long, device=dev)
    keep(nothing, nothing, best[:0, 0], False)  # a worker may get no block at all
    blocks = [slice(s, min(s + block, n)) for s in range(0, n, block)]
    for rows in blocks[comm.rank::comm.size]:
        d = _approx(pts, rows, pts, rows)
        m = min(k + 1, d.shape[1])
        best[rows, :m] = torch.topk(d, m, dim=1, largest=False).values
        r, c = torch.nonzero(d <= loose(rows)[:, None], as_tuple=True)  # both orders of each pair
        keep(r + rows.start, c + rows.start, d[r, c], False)
    if comm.size > 1:  # every worker starts from every diagonal block's k+1 smallest
        parts = comm.allgather([best[rows].cpu() for rows in blocks[comm.rank::comm.size]])
        for w, part in enumerate(parts):
            for rows, seed in zip(blocks[w::comm.size], part):
                best[rows] = seed.to(dev)
    pairs = [(rows, cols) for i, rows in enumerate(blocks) for cols in blocks[i + 1:]]
    for rows, cols in pairs[comm.rank::comm.size]:
        d = _approx(pts, rows, pts, cols)
        r, c = torch.nonzero((d <= loose(rows)[:, None]) | (d <= loose(cols)[None, :]), as_tuple=True)
        r, c, v = r + rows.start, c + cols.start, d[r, c]
        _merge_smallest(best, torch.cat([r, c]), torch.cat([v, v]))
        keep(r, c, v, True)
    t = best[:, k]
    if comm.size > 1:
        t = torch.as_tensor(np.min(comm.allgather(t.cpu().numpy()), axis=0), device=dev)
    r, c, d, off = torch.cat(kept_r), torch.cat(kept_c), torch.cat(kept_d), torch.cat(kept_off)
    limit, _ = _limits(t, pts.err, max_err)
    fwd = _candidate(d, pts.err[c], limit[r])
    bwd = off & _candidate(d, pts.err[r], limit[c])
    r, c = torch.cat([r[fwd], c[bwd]]), torch.cat([c[fwd], r[bwd]])
    exact = _exact(pts, r, pts, c)
    if comm.size > 1:  # each pair was a candidate on one worker only
        parts = comm.allgather((r.cpu(), exact.cpu()))
        r, exact = (torch.cat([p[i] for p in parts]).to(dev) for i in (0, 1))
    return _kth(r, exact, n, k)


def _merge_smallest(best: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """best[i] <- the best.shape[1] smallest of best[i] and the values given for row i (idx)."""
    if not len(idx):
        return
    rows, inv = torch.unique(idx, return_inverse=True)
    m = best.shape[1]
    ids = torch.cat([torch.arange(len(rows), device=idx.device).repeat_interleave(m), inv])
    vals = torch.cat([best[rows].flatten(), values])
    order = torch.argsort(vals, stable=True)
    order = order[torch.argsort(ids[order], stable=True)]  # by row, then by value; each row has >= m
    starts = torch.searchsorted(ids[order], torch.arange(len(rows), device=idx.device))
    best[rows] = vals[order][starts[:, None] + torch.arange(m, device=idx.device)]


def _cross(a: _Points, a_rows: slice, b: _Points, r_a: torch.Tensor, r_b: torch.Tensor, block: int):
    """For the rows of `a` given: is each inside b's manifold (some D(a_i, b_j) <= r_b[j])? And for every
    point of b: is it inside the manifold of these rows of a (some D(a_i, b_j) <= r_a[i])? One pass over
    the distance matrix answers both (precision and recall share it, as in ADM's evaluator). Per block,
    one comparison per row and per column picks the few pairs near or inside a ball; only those are
    looked at pair by pair."""
    idx = range(*a_rows.indices(len(a)))
    r_a32, r_b32 = r_a.float(), r_b.float()
    near_b = r_b32 + b.err + a.err.max()  # D(a_i, b_j) <= r_b[j] is possible only if d_ij <= near_b[j]
    near_a = r_a32 + a.err + b.err.max()
    a_in = torch.zeros(len(idx), dtype=torch.bool, device=a.f32.device)
    b_in = torch.zeros(len(b), dtype=torch.bool, device=a.f32.device)
    for s in range(0, len(idx), block):
        rows = slice(idx.start + s, min(idx.start + s + block, idx.stop))
        for t in range(0, len(b), block):
            cols = slice(t, min(t + block, len(b)))
            d = _approx(a, rows, b, cols)
            i, j = torch.nonzero((d <= near_b[None, cols]) | (d <= near_a[rows, None]), as_tuple=True)
            if not len(i):
                continue
            d, gi, gj = d[i, j], i + rows.start, j + cols.start
            e = a.err[gi] + b.err[gj]
            a_sure, b_sure = d + e <= r_b32[gj], d + e <= r_a32[gi]  # certainly inside (float32 suffices)
            a_in[i[a_sure] + s] = True
            b_in[gj[b_sure]] = True
            # undecided pairs: a radius within the error bound of the distance, the point not yet inside
            undecided = ((d - e <= r_b32[gj]) & ~a_in[i + s]) | ((d - e <= r_a32[gi]) & ~b_in[gj])
            if undecided.any():
                i, gi, gj = i[undecided], gi[undecided], gj[undecided]
                exact = _exact(a, gi, b, gj)
                a_in[i[exact <= r_b[gj]] + s] = True
                b_in[gj[exact <= r_a[gi]]] = True
    return a_in.cpu().numpy(), b_in.cpu().numpy()


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = K_NEAREST, block: int = 2048,
                     distance: str = "fp32", device="cpu", comm=None) -> tuple[float, float]:
    """comm (eval.comm): the work split over workers (the radii's blocks, the memberships' rows), the pieces
    gathered, so that the result is the same at any worker count."""
    if reference.shape[1:] != samples.shape[1:]:
        raise ValueError(f"feature dimensions differ: reference {reference.shape[1:]} vs samples {samples.shape[1:]}")
    comm = comm or _single()
    if distance == "fp16":
        r_ref = radii(reference, k, block, distance, device, comm)
        r_sample = radii(samples, k, block, distance, device, comm)
        precision = _gathered(comm, lambda rows: _inside_fp16(samples[rows], reference, r_ref, block, device),
                              len(samples))
        recall = _gathered(comm, lambda rows: _inside_fp16(reference[rows], samples, r_sample, block, device),
                           len(reference))
        return float(precision.mean()), float(recall.mean())
    _check_size(reference, k), _check_size(samples, k)
    (ref_kept, ref_copy), (sam_kept, sam_copy) = _capped(reference, k), _capped(samples, k)
    with strict_fp32():  # the error bound assumes true float32 products
        r_ref = _radii(_Points(reference[ref_kept], device), k, block, comm)  # each set from its own mean
        r_sample = _radii(_Points(samples[sam_kept], device), k, block, comm)
        ref_rows, sam_rows = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in
                              (reference[ref_kept], samples[sam_kept]))
        center = (_sum_rows(ref_rows) + _sum_rows(sam_rows)) / (len(ref_rows) + len(sam_rows))
        ref, sam = _Points(ref_rows, device, center), _Points(sam_rows, device, center)  # then one shared
        to = lambda x: torch.as_tensor(x, dtype=torch.float64, device=ref.f32.device)  # noqa: E731
        ref_in, sam_in_part = _cross(ref, comm.rows(len(ref)), sam, to(r_ref), to(r_sample), block)
    parts = comm.allgather((ref_in, sam_in_part))
    recall = np.concatenate([p[0] for p in parts])[ref_copy]
    precision = np.logical_or.reduce([p[1] for p in parts])[sam_copy]
    return float(precision.mean()), float(recall.mean())


# ---- ADM's fp16 arithmetic (for matching published numbers) --------------------------------------

def _norms_fp16(x: torch.Tensor) -> torch.Tensor:
    """ADM's row norms in fp16 (squares rounded to fp16, then summed as TensorFlow sums them on this kind of
    device): float32 holding fp16 values on a CPU, fp16 on a GPU."""
    if x.device.type == "cpu":
        x16 = x.half().float()
        return _eigen_half_row_sum((x16 * x16).half().float())
    xh = x.half()
    return (xh * xh).sum(1)


def _pairwise_fp16(u: torch.Tensor, v: torch.Tensor, device, nu=None, nv=None, u16=None, v16=None) -> torch.Tensor:
    """ADM's graph in fp16 as TensorFlow computes it on the same kind of device: square (rounded to fp16),
    row sums (on a CPU, Eigen's fp16 accumulation as TensorFlow's CPU kernel does it; on a GPU accumulated in
    fp32, as its GPU reduction does, and rounded to fp16), the fp16 GEMM (fp32 accumulation, rounded once, on
    both), then norm_u - 2 mm + norm_v one fp16-rounded operation at a time, clamped at 0. nu, nv: the rows'
    _norms_fp16, when the caller has them already; u16, v16: on a CPU, the rows rounded to fp16 and held in
    float32 (the GEMM's inputs). Returned in float32, which holds every fp16 value exactly."""
    nu = (_norms_fp16(u) if nu is None else nu)[:, None]
    nv = (_norms_fp16(v) if nv is None else nv)[None, :]
    if torch.device(device).type == "cpu":  # a float32 GEMM of the fp16 values; torch's CPU fp16 ops then compute
        u16 = u.half().float() if u16 is None else u16  # each step in float32 and round it to fp16, as Eigen does
        v16 = v.half().float() if v16 is None else v16
        # BLAS's GEMM, not oneDNN's: rounded to fp16 it equals TensorFlow's in 65,527 of 65,536 entries, oneDNN's 65,517
        d = (nu.half() - (u16 @ v16.T).half().mul_(2)).add_(nv.half())
    else:
        uh, vh = u.half(), v.half()
        reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # fp32 accumulation
        try:
            mm = uh @ vh.T
        finally:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
        d = (nu - 2 * mm) + nv
    if not torch.isfinite(d).all():  # ADM's fallback to fp32 on overflow
        d = (u * u).sum(1, keepdim=True) - 2 * (u @ v.T) + (v * v).sum(1, keepdim=True).T
    return d.float().clamp_min(0)


# TensorFlow's CPU kernel sums fp16 rows with Eigen's vectorised inner-most reduction (8-lane fp16 packets as
# built for the TensorFlow wheels): rows longer than 8 x 200 values are split in two at a packet boundary and
# the halves summed separately; a leaf runs 4 packet accumulators over chunks of 32 values, every lane add
# rounded to fp16, then folds them, sums the 8 lanes in fp32 (Eigen's predux order), rounds, and adds the
# values left over. Checked against TensorFlow 2.21 on 2048-wide rows: equal in all 2,000 rows tried (a
# float32 sum rounded once agreed in 75%).
_PACKET, _LEAF = 8, 8 * 200


def _eigen_half_row_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums of x (float32 holding fp16 values) as TensorFlow's CPU kernel computes them in fp16."""
    def r(t):
        return t.half().float()

    n = x.shape[1]
    if n > _LEAF:
        half = -(-n // 2)
        split = -(-half // _PACKET) * _PACKET  # ceil(n / 2), rounded up to a whole packet
        return r(_eigen_half_row_sum(x[:, :split]) + _eigen_half_row_sum(x[:, split:]))
    vec4, vec = n // (4 * _PACKET) * 4 * _PACKET, n // _PACKET * _PACKET
    acc = torch.zeros(len(x), 4, _PACKET, dtype=x.dtype, device=x.device)
    for j in range(0, vec4, 4 * _PACKET):
        acc = r(acc + x[:, j:j + 4 * _PACKET].reshape(len(x), 4, _PACKET))
    p = acc[:, 0]
    for j in range(vec4, vec, _PACKET):
        p = r(p + x[:, j:j + _PACKET])
    for q in (1, 2, 3):
        p = r(p + acc[:, q])
    lanes = p[:, :4] + p[:, 4:]  # predux of 8 float lanes: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then the two
    lanes = lanes[:, :2] + lanes[:, 2:]
    packet_sum = r(lanes[:, 0] + lanes[:, 1])
    rest = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for j in range(vec, n):
        rest = r(rest + x[:, j])
    return r(rest + packet_sum)


class _HalfSet:
    """A feature set for ADM's fp16 arithmetic: the float32 rows (for ADM's float32 fallback), on a CPU their
    fp16 rounding held in float32 (the GEMM's inputs, rounded once rather than per block), the fp16 norms."""

    def __init__(self, features, device):
        self.f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
        self.f16 = self.f.half().float() if self.f.device.type == "cpu" else None
        self.norms = _norms_fp16(self.f)

    def pairwise(self, rows: slice, other: "_HalfSet", cols: slice) -> torch.Tensor:
        u16 = None if self.f16 is None else self.f16[rows]
        v16 = None if other.f16 is None else other.f16[cols]
        return _pairwise_fp16(self.f[rows], other.f[cols], self.f.device, self.norms[rows], other.norms[cols], u16, v16)


def _radii_fp16(features, k, block, device, rows) -> np.ndarray:
    pts = _HalfSet(features, device)
    idx = range(*rows.indices(len(pts.f)))
    out = np.empty(len(idx), np.float64)
    for s in range(0, len(idx), block):
        mine = slice(idx.start + s, min(idx.start + s + block, idx.stop))
        d = pts.pairwise(mine, pts, slice(None))
        out[s:s + block] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k].cpu().numpy()
    return out


def _inside_fp16(points, manifold, manifold_radii, block, device) -> np.ndarray:
    p, m = _HalfSet(points, device), _HalfSet(manifold, device)
    r = torch.as_tensor(manifold_radii, dtype=torch.float32, device=device)  # float32 values: exact
    result = np.zeros(len(p.f), bool)
    for s in range(0, len(p.f), block):
        hit = torch.zeros(min(block, len(p.f) - s), dtype=torch.bool, device=device)
        for t in range(0, len(m.f), block):
            d = p.pairwise(slice(s, s + block), m, slice(t, t + block))
            hit |= (d <= r[t:t + block][None, :]).any(1)
        result[s:s + block] = hit.cpu().numpy()
    return result
