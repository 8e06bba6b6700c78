"""
Phase 2: the DISC pass. Reads the teacher cache as one signal f along the concatenated token stream and finds
where it changes smoothly, where it jumps and where it drifts.

The signal (--signal, a name in SIGNALS): by default f[t] is the teacher's entropy at row t. A distance between
consecutive next-token distributions sits near its maximum almost everywhere (each predicts a different token), so a
3-sigma rule on it rarely fires; surprisal (log-loss on the real next token) and tv stay to measure that claim, and
report.json records every signal's mean, spread and firing rate. A new signal: a function of (rows, last) -> f and
its entry in SIGNALS.

The math (DESIGN.md section 3; each function below is pure and tested against a brute-force reference):
  delta[i] = |f[i+1] - f[i]|, 0 on a document's last row (the boundary is a forced cut anyway)
  disc[i]  = (1/K) sum_{j=1..K} |f[i+j] - f[i]| / j, K = 8: the discrete D f(x) = lim (1/e) int |f(t)-f(x)|/|t-x| dt
             (near a document end, the mean over the j inside it)
  jump[i]  = delta[i] > mean + 3 std of delta over the stream; weight[i+1] = 1.25 (where f changed), else 1.0
  per 64-token block (--block): TV = sum delta; J = sum of delta at jumps; A = n * min(median, mean) of the n
  non-jump deltas (what an evenly spread change would give); drift G = TV - J - A >= 0; discrepancy energy
  E = 0.5 sum disc^2; densities G / 64, E / 64.
  A steady trend lands in A, a devil's staircase (few sub-threshold steps) in G, planted steps in J.

Inputs   --cache (cache_teacher.py's folder)
Outputs  in --out (default out/topology):
  f.npy, delta.npy, disc.npy float32 [N]; jump.npy bool [N]; weight.npy float32 [N] (loss multiplier per row)
  block_{tv,jump,smooth,drift,gap_density,edisc,edisc_density}.npy float32 [ceil(N/64)]: block b = rows [64b, 64b+64)
  report.json (counts, every signal's statistics, top-k tail mass; per document: jumps, TV, E density, G, G density)
  report.html (one document's tokens coloured by discrepancy, jumps, block channels), manifest.json

Run
  python topology.py --cache out/cache --out out/topology
  python topology.py --cache out/cache --out out/topology_tv --signal tv
"""

import argparse
import json
import os
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cache_teacher import TeacherCache, tail_mass, unpack_ids18
from common import (FORMAT_VERSION, Progress, check_ranges, check_rows, check_upstream, checksums, cli, doc_line,
                    prepare_out, publish, read_manifest, sha256_json, verify_checksums, write_json)
from pages import topology_page

BLOCK = 64  # the card's gap-energy window, in tokens (--block)
BLOCK_CHANNELS = ["tv", "jump", "smooth", "drift", "gap_density", "edisc", "edisc_density"]
OUTPUTS = ["f", "delta", "disc", "jump", "weight"] + [f"block_{c}" for c in BLOCK_CHANNELS]

# -----------------------------------------------------------------------------
# The signal: SIGNALS[name](rows, last) -> f float32 [n] for n stream rows (a Rows), last (bool [n]) marking the
# last row of each document


class Rows(dict):
    """Stream rows [a, b) of a TeacherCache, each array read on first use as rows[name] (`in` sees only those read):
    tokens [n], roles [n], topk_ids int64 [n, k], topk_logprobs [n, k], lse [n, nT], target_logprob [n], entropy [n]."""

    def __init__(self, cache, a, b):
        super().__init__()
        self.cache, self.a, self.b = cache, a, b

    def __missing__(self, name):
        # read as TeacherCache.rows reads it, one array at a time (the entropy pass never unpacks the ids)
        if name in ("tokens", "roles"):
            self[name] = np.asarray(getattr(self.cache, name)[self.a:self.b])
        elif name == "topk_ids":
            self[name] = unpack_ids18(self.cache.arrays[name][self.a:self.b])  # (n, 9k/4) uint8 -> (n, k) int64
        else:
            self[name] = np.asarray(self.cache.arrays[name][self.a:self.b], dtype=np.float32)
        return self[name]


def entropy_signal(rows, last):
    """f[t] = H(p_t), the teacher's full-vocabulary entropy at row t (exact, from the cache)."""
    return rows["entropy"].astype(np.float32)


def surprisal_signal(rows, last):
    """f[t] = -log p_t(token t+1), the teacher's log-loss on the real next token."""
    f = -rows["target_logprob"].astype(np.float32)
    prev = np.concatenate([[0.0], f[:-1]]).astype(np.float32)
    return np.where(last, prev, f)  # a document's last row has no target: hold the previous value


def tv_consecutive(ids, logprobs, last):
    """TV(p_t, p_t+1) at T=1 over the union of two consecutive top-k supports plus one tail cell: ids, logprobs
    (n, k) -> (n,) float32, 0 where row t ends a document. With P the top-k mass and Q = 1 - P the tail mass,
      2 TV = P_t + P_t+1 - 2 sum_shared min(p_t, p_t+1) + |Q_t - Q_t+1|.
    Shared ids: sort each row pair's 2k int64 keys (id high, probability bits low), so equal ids sit side by side."""
    n, k = ids.shape
    p = np.exp(np.asarray(logprobs, dtype=np.float32))  # (n, k)
    P = p.sum(1, dtype=np.float64)
    key = (np.asarray(ids, dtype=np.int64) << 32) | p.view(np.uint32)
    pair = np.empty((n - 1, 2 * k), np.int64)  # row t's keys then row t+1's
    pair[:, :k], pair[:, k:] = key[:-1], key[1:]
    pair.sort(axis=1)
    half = pair.view(np.int32)  # little-endian: [:, 0::2] probability bits, [:, 1::2] ids
    idv, pv = half[:, 1::2], half.view(np.float32)[:, 0::2]
    same = idv[:, 1:] == idv[:, :-1]  # ids are distinct within a row: a match is one from each side
    shared = np.where(same, np.minimum(pv[:, 1:], pv[:, :-1]), 0).sum(1, dtype=np.float64)
    Q = 1.0 - P
    tv = np.zeros(n, dtype=np.float32)
    tv[:-1] = 0.5 * (P[:-1] + P[1:] - 2 * shared + np.abs(Q[:-1] - Q[1:]))
    tv[last] = 0.0
    return np.clip(tv, 0.0, 1.0)


def tv_signal(rows, last):
    """f[t] = sum_{j<t} TV(p_j, p_j+1) within the document: the path length, so delta[t] is exactly the total
    variation between consecutive top-k distributions (tv_consecutive)."""
    step = tv_consecutive(rows["topk_ids"], rows["topk_logprobs"], last)
    f = np.cumsum(np.concatenate([[0.0], step[:-1]]), dtype=np.float64)  # path length along the stream
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))  # restart at each document
    return (f - np.repeat(f[starts], np.diff(np.append(starts, len(f))))).astype(np.float32)


# --signal's choices; report.json compares them all on the stream at hand
SIGNALS = {"entropy": entropy_signal, "surprisal": surprisal_signal, "tv": tv_signal}


# -----------------------------------------------------------------------------
# The DISC math: pure functions of arrays (f and `last` as above)


def doc_last_rows(doc_offsets, a, b):
    """Bool mask over stream rows [a, b): True on the last row of a document."""
    last = np.zeros(b - a, dtype=bool)
    ends = np.asarray(doc_offsets[1:]) - 1
    ends = ends[(ends >= a) & (ends < b)]
    last[ends - a] = True
    return last


def deltas(f, last):
    """delta[i] = |f[i+1] - f[i]|, 0 where row i ends a document. f, last: [n] -> [n] float32."""
    d = np.zeros_like(f, dtype=np.float32)
    d[:-1] = np.abs(f[1:] - f[:-1])
    d[last] = 0.0
    if len(d):
        d[-1] = 0.0  # no f[n] in this slice: callers pass a slice that ends on a document end or overlap it
    return d


def discrepancy(f, last, K=8):
    """disc[i] = mean over j = 1..K (within i's document) of |f[i+j] - f[i]| / j: K shifted differences over the
    slice, then the rows within K of a document end recomputed over the j that stay inside. [n] -> [n] float32."""
    n = len(f)
    f = np.asarray(f, dtype=np.float32)
    acc = np.zeros(n, dtype=np.float32)
    for j in range(1, min(K, n - 1) + 1):
        acc[:n - j] += np.abs(f[j:] - f[:n - j]) * np.float32(1 / j)
    disc = acc / np.float32(K)
    ends = np.flatnonzero(last)
    if n and (not len(ends) or ends[-1] != n - 1):
        ends = np.append(ends, n - 1)  # the slice ends here too
    near = np.unique((ends[:, None] - np.arange(K)[None, :]).ravel())
    near = near[near >= 0]
    room = ends[np.searchsorted(ends, near)] - near  # rows left in the document after each near row
    part = np.zeros(len(near), dtype=np.float32)
    for j in range(1, K + 1):
        ok = room >= j
        part += np.where(ok, np.abs(f[np.minimum(near + j, n - 1)] - f[near]) * np.float32(1 / j), 0)
    disc[near] = part / np.maximum(np.minimum(room, K), 1)
    return disc


def threshold_from_sums(s1, s2, n, sigma=3.0):
    """mean + sigma std from the streaming sums s1 = sum x, s2 = sum x^2 over n values (inf when n = 0)."""
    if n == 0:
        return float("inf")
    mean = s1 / n
    return float(mean + sigma * np.sqrt(max(s2 / n - mean * mean, 0.0)))


def jump_threshold(delta, valid, sigma=3.0):
    """mean + sigma std of delta over the valid rows (not a document's last row), in one piece."""
    d = delta[valid].astype(np.float64)
    return threshold_from_sums(d.sum(), (d * d).sum(), len(d), sigma)


def jumps_and_weights(delta, valid, threshold, amplify=1.25):
    """jump[i] = delta[i] > threshold on valid rows; weight[i+1] = amplify where jump[i] (the row whose
    distribution the jump reached), else 1. All [n]."""
    jump = (delta > threshold) & valid
    weight = np.ones(len(delta), dtype=np.float32)
    weight[1:][jump[:-1]] = amplify
    return jump, weight


def block_channels(delta, jump, valid, disc, block=BLOCK):
    """Per block of `block` rows: TV, jump, smooth and drift channels, gap-energy density, discrepancy energy and its
    density. Inputs [n], n a multiple of `block` (padded with valid=False) -> dict of float32 [n/block]."""
    B = len(delta) // block
    d = delta.reshape(B, block).astype(np.float64)
    j = (jump & valid).reshape(B, block)
    smooth_mask = (valid & ~jump).reshape(B, block)
    tv = np.where(valid.reshape(B, block), d, 0).sum(1)
    jp = np.where(j, d, 0).sum(1)
    n = smooth_mask.sum(1)
    sm = np.sort(np.where(smooth_mask, d, np.inf), axis=1)  # the n_b non-jump deltas first, in order
    lo, hi = np.maximum(n - 1, 0) // 2, np.maximum(n, 1) // 2
    med = 0.5 * (np.take_along_axis(sm, lo[:, None], 1) + np.take_along_axis(sm, hi[:, None], 1))[:, 0]
    mean = np.where(smooth_mask, d, 0).sum(1) / np.maximum(n, 1)
    A = np.where(n > 0, n * np.minimum(med, mean), 0.0)
    G = np.maximum(tv - jp - A, 0.0)  # >= 0 by construction; max() only absorbs rounding
    e = 0.5 * (disc.reshape(B, block).astype(np.float64) ** 2).sum(1)
    f32 = lambda x: x.astype(np.float32)
    return dict(tv=f32(tv), jump=f32(jp), smooth=f32(A), drift=f32(G), gap_density=f32(G / block),
                edisc=f32(e), edisc_density=f32(e / block))


def span_channels(delta, jump, valid, disc, starts, ends, block=BLOCK):
    """block_channels summed over each span [starts[s], ends[s]) (documents, windows), cut into blocks from its own
    start, its last block padded. Stream arrays (N,); starts, ends (S,) non-empty spans -> float64 (S,) each."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    nblk = -(-(ends - starts) // block)  # (S,) blocks per span
    first = np.concatenate([[0], np.cumsum(nblk)[:-1]])  # (S,) each span's first block
    span = np.repeat(np.arange(len(starts)), nblk * block)  # (sum nblk * block,) the span of each padded row
    idx = starts[span] + np.arange(len(span)) - np.repeat(first * block, nblk * block)  # its stream row
    inside = idx < ends[span]
    idx = np.where(inside, idx, 0)
    ch = block_channels(np.where(inside, delta[idx], 0), jump[idx] & inside, valid[idx] & inside,
                        np.where(inside, disc[idx], 0), block)
    return {c: np.add.reduceat(v.astype(np.float64), first) for c, v in ch.items()}


# -----------------------------------------------------------------------------
# The pass over the stream, in chunks of whole documents (memory bounded by the chunk)


def doc_chunks(doc_offsets, chunk):
    """Stream ranges [a, b) of whole documents, about `chunk` rows each (a longer document is its own chunk)."""
    out = []
    D = len(doc_offsets) - 1
    d = 0
    while d < D:
        e = d + 1
        while e < D and doc_offsets[e + 1] - doc_offsets[d] <= chunk:
            e += 1
        out.append((int(doc_offsets[d]), int(doc_offsets[e])))
        d = e
    return out


def run_pass(cache, kind, chunk, K, sigma, amplify, out, prog=None, threads=1, block=BLOCK):
    """The pass into memory-mapped outputs: f, delta, disc by whole documents, the stream's jump threshold, then
    jumps, weights, block channels by whole blocks. Returns (outputs dict of memmaps, threshold, valid-row count)."""
    N = len(cache)
    nb = -(-N // block)
    spec = dict(f=(N, np.float32), delta=(N, np.float32), disc=(N, np.float32), jump=(N, np.bool_),
                weight=(N, np.float32), **{f"block_{c}": (nb, np.float32) for c in BLOCK_CHANNELS})
    arr = {n: np.lib.format.open_memmap(os.path.join(out, n + ".partial.npy"), mode="w+", dtype=dt, shape=(sh,))
           for n, (sh, dt) in spec.items()}

    def signal_pass(ab):  # signal, delta, disc of whole documents; numpy releases the GIL, so threads use every core
        a, b = ab
        last = doc_last_rows(cache.doc_offsets, a, b)  # (b - a,) bool: rows that end a document
        f = SIGNALS[kind](Rows(cache, a, b), last)  # (b - a,) float32
        d = deltas(f, last)
        arr["f"][a:b], arr["delta"][a:b], arr["disc"][a:b] = f, d, discrepancy(f, last, K)
        # this chunk's share of the stream-wide sums (the threshold needs the mean and std of every valid delta)
        dv = d[~last].astype(np.float64)
        return dv.sum(), (dv ** 2).sum(), len(dv), b - a

    # pass 1 over whole documents: f, delta, disc, and the streaming sums s1 = sum delta, s2 = sum delta^2, n
    s1 = s2 = nvalid = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for r1, r2, nv, n in pool.map(signal_pass, doc_chunks(cache.doc_offsets, chunk)):
            s1, s2, nvalid = s1 + r1, s2 + r2, nvalid + nv
            if prog:
                prog.update(n)
    # the stream-wide threshold from the sums of all chunks: the same number as jump_threshold over all of delta
    threshold = threshold_from_sums(s1, s2, nvalid, sigma)

    def jump_pass(ab):  # jumps, weights and block channels of whole blocks
        a, b = ab
        lo = max(a - 1, 0)  # weight[a] depends on jump[a - 1]: read one row before the range
        valid = ~doc_last_rows(cache.doc_offsets, lo, b)
        delta = np.asarray(arr["delta"][lo:b])
        jump, weight = jumps_and_weights(delta, valid, threshold, amplify)
        arr["jump"][a:b], arr["weight"][a:b] = jump[a - lo:], weight[a - lo:]
        # the range starts on a block boundary; pad its end to whole blocks with rows that count for nothing
        pad = -(b - a) % block
        padded = lambda x, v: np.concatenate([x[a - lo:], np.full(pad, v, dtype=x.dtype)])
        ch = block_channels(padded(delta, 0), padded(jump, False), padded(valid, False),
                            padded(np.asarray(arr["disc"][lo:b]), 0), block)
        for c in BLOCK_CHANNELS:
            arr[f"block_{c}"][a // block:a // block + len(ch[c])] = ch[c]

    # pass 2 over ranges of whole blocks, about `chunk` rows each: jumps and weights, then the block channels
    step = max(block, chunk // block * block)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(jump_pass, [(a, min(a + step, N)) for a in range(0, N, step)]))
    for m in arr.values():
        m.flush()
    return arr, threshold, int(nvalid)


Topology = namedtuple("Topology", "folder manifest fingerprint block arrays report")


def load(folder, cache_folder, needed_by="", verify=True):
    """topology.load(folder, cache folder) -> Topology (manifest, block: --block, report.json, arrays: OUTPUTS
    memory-mapped by name), refused if incomplete or built from another cache."""
    m = read_manifest(folder, "topology", needed_by=needed_by)
    check_upstream(m, cache_folder, "cache", folder)  # built from this very cache
    if verify:  # each file against its checksum: a missing, cut or changed file is one line naming it
        verify_checksums(folder, m)
    arrays = {n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r") for n in OUTPUTS}
    if verify:  # the format's one promise on values: every float is finite
        for n, a in arrays.items():
            if a.dtype.kind == "f":
                check_rows(os.path.join(folder, n + ".npy"), ~np.isfinite(a), a, "is not finite")
    with open(os.path.join(folder, "report.json")) as fh:
        report = json.load(fh)
    return Topology(folder, m, m["fingerprint"], m["settings"]["block"], arrays, report)


def signal_summary(f, delta, valid, sigma=3.0):
    """One signal on a stretch of the stream: its mean and spread, and how often `sigma` x std fires."""
    d = delta[valid].astype(np.float64)
    thr = jump_threshold(delta, valid, sigma)
    return dict(f_mean=float(f[valid].mean()), f_std=float(f[valid].std()), delta_mean=float(d.mean()),
                delta_std=float(d.std()), threshold=float(thr), firing_rate=float((d > thr).mean()))


def main(args):
    check_ranges(args, K="[1, inf)", sigma="(0, inf)", amplify="(0, inf)", chunk="[1, inf)", threads="[1, inf)",
                 report_positions="[1, inf)", log_every="[0, inf]", block="[1, inf)")
    cache = TeacherCache(args.cache, verify=not args.no_verify)
    if not cache.has_teacher:
        raise ValueError(f"{args.cache}: a cache made with --teacher none has no teacher distributions to analyse")
    settings = dict(signal=args.signal, K=args.K, sigma=args.sigma, amplify=args.amplify, block=args.block,
                    outputs=OUTPUTS)  # the file list too: a folder from before block_edisc_density is rebuilt
    fingerprint = sha256_json(dict(upstream=cache.fingerprint, settings=settings, version=FORMAT_VERSION))
    if prepare_out(args.out, "topology", fingerprint, args.force) == "done":
        print(f"{args.out}: complete topology with the same inputs already there; nothing to do")
        return
    t0 = time.time()
    N, out = len(cache), args.out
    prog = Progress("topology", N, unit="pos", every=args.log_every)
    arr, threshold, nvalid = run_pass(cache, args.signal, args.chunk, args.K, args.sigma, args.amplify, out, prog,
                                      args.threads, args.block)
    report = build_report(cache, args, arr, threshold, nvalid, time.time() - t0)
    write_json(os.path.join(out, "report.json"), report)
    topology_page(os.path.join(out, "report.html"), cache, arr, report)
    del arr
    for n in OUTPUTS:  # finished: the partial files take their final names, the manifest comes last
        publish(os.path.join(out, n + ".partial.npy"), os.path.join(out, n + ".npy"))
    manifest = dict(phase="topology", version=FORMAT_VERSION, fingerprint=fingerprint, settings=settings,
                    upstream=dict(cache=cache.fingerprint), args=vars(args), threshold=threshold,
                    counts=dict(positions=N, documents=cache.n_docs, jumps=report["jumps"], blocks=-(-N // args.block)),
                    dtypes=dict(f="float32", delta="float32", disc="float32", jump="bool", weight="float32",
                                blocks="float32"), complete=True,
                    sha256=checksums(out, [n + ".npy" for n in OUTPUTS] + ["report.json"]))
    write_json(os.path.join(out, "manifest.json"), manifest)
    print(f"topology: {N:,} positions, signal {args.signal}, {report['jumps']:,} jumps ({report['jump_rate']:.2%}, "
          f"threshold {threshold:.4g}), {report['positions_per_second']:,.0f} positions/s -> {out}")


def compare_signals(cache, positions, sigma, rng):
    """Every signal of SIGNALS over stretches of up to 512 rows of random documents (a fixed cost: tv is costly).
    Returns ({signal: signal_summary}, rows sampled)."""
    docs = rng.permutation(cache.n_docs)[:max(1, positions // 512)]
    parts = {kind: ([], [], []) for kind in SIGNALS}  # per signal: its f, delta and valid rows of each stretch
    sampled = 0
    for d in np.sort(docs):
        a, b = cache.doc_range(d)
        a = a + int(rng.integers(0, max(b - a - 512, 0) + 1))
        b = min(b, a + 512)
        last, rows = doc_last_rows(cache.doc_offsets, a, b), Rows(cache, a, b)
        last[-1] = True  # the stretch ends here: no delta reaches past it
        sampled += b - a
        for kind, (fs, ds, vs) in parts.items():
            fk = SIGNALS[kind](rows, last)  # the same rows, read the same way, as the pass gives it
            fs.append(fk)
            ds.append(deltas(fk, last))
            vs.append(~last)
    return {kind: signal_summary(*map(np.concatenate, v), sigma) for kind, v in parts.items()}, sampled


def build_report(cache, args, arr, threshold, nvalid, elapsed):
    """report.json: counts, every signal of SIGNALS on this stream, per-document jumps and energies, tail mass."""
    N = len(cache)
    rng = np.random.default_rng(0)  # the same sample of rows on every run
    sigs, sampled = compare_signals(cache, args.report_positions, args.sigma, rng)
    # per document: its jumps, and its channels over its own blocks (from its first row, as windows.py lays out a
    # window): TV, E_disc density and the gap energy G (the drift channel) with its density
    starts, ends = np.asarray(cache.doc_offsets[:-1]), np.asarray(cache.doc_offsets[1:])
    valid = ~doc_last_rows(cache.doc_offsets, 0, N)
    ch = span_channels(np.asarray(arr["delta"]), np.asarray(arr["jump"]), valid, np.asarray(arr["disc"]), starts, ends,
                       args.block)
    jumps = np.add.reduceat(np.asarray(arr["jump"], dtype=np.int64), starts)
    per_doc = [dict(doc=d, length=int(n), jumps=int(jumps[d]), tv=float(ch["tv"][d]),
                    edisc_density=float(ch["edisc"][d] / n), gap_energy=float(ch["drift"][d]),
                    gap_density=float(ch["drift"][d] / n)) for d, n in enumerate(ends - starts)]
    # how much probability mass the top-k misses, at each cached temperature (a sample of rows)
    rows = np.sort(rng.choice(N, size=min(N, args.report_positions), replace=False))
    lp = np.asarray(cache.arrays["topk_logprobs"][rows], dtype=np.float32)
    lse = np.asarray(cache.arrays["lse"][rows], dtype=np.float32)
    tails = {}
    for ti, T in enumerate(cache.temperatures):
        q = tail_mass(lp, lse, ti, T)
        tails[f"T={T:g}"] = dict(mean=float(q.mean()), **{f"p{p}": float(np.percentile(q, p)) for p in [50, 90, 99]})
    total = lambda c: float(np.asarray(arr[f"block_{c}"], dtype=np.float64).sum())
    n_jumps = int(np.count_nonzero(arr["jump"]))
    return dict(
        positions=N, documents=cache.n_docs, signal=args.signal, threshold=threshold, jumps=n_jumps,
        jump_rate=n_jumps / max(nvalid, 1), positions_per_second=N / max(elapsed, 1e-9),
        channels={c: total(c) for c in ["tv", "jump", "smooth", "drift"]},
        edisc_density=total("edisc") / N, gap_density=total("drift") / N,
        signals=sigs, signals_sampled_positions=sampled, tail_mass=tails,
        per_document=per_doc)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="out/cache", help="cache_teacher.py output folder")
    p.add_argument("--out", default="out/topology", help="output folder")
    p.add_argument("--signal", default="entropy", choices=list(SIGNALS), help="the per-position signal f, from "
                   "SIGNALS: " + "; ".join(f"{k}: {doc_line(f)}" for k, f in SIGNALS.items()))
    p.add_argument("--no_verify", action="store_true", help="skip the checksums of the input folders' files")
    p.add_argument("--K", type=int, default=8, help="reach of the discrepancy operator, in tokens")
    p.add_argument("--sigma", type=float, default=3.0, help="jump threshold: mean + sigma x std of delta (card: 3)")
    p.add_argument("--amplify", type=float, default=1.25, help="loss multiplier after a jump (card: 1.25x)")
    p.add_argument("--block", type=int, default=BLOCK, help="tokens per block of the channels (card: 64)")
    p.add_argument("--chunk", type=int, default=1 << 16, help="rows per chunk (memory bound of the pass)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="worker threads for the pass")
    p.add_argument("--report_positions", type=int, default=32_768, help="rows sampled for the report's tables")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines")
    return p


if __name__ == "__main__":
    cli("topology.py", main, get_parser, "rerun the same command")
