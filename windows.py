"""
Phase 3: topology-guided training windows, their difficulty, and the four-phase curriculum.

Each document is cut into windows of at most 512 tokens at calm places instead of a fixed stride:
  from start s, the cut e = argmin of a 3-token moving average of disc over [s+384, s+512], never at a jump
  or beside one; the next window starts at e - o, o in [32, 128] chosen at the calmest position of that range;
  the overlap [e - o, e) is context only, so every trainable row is trained exactly once per epoch.
Windows never cross a document boundary, and a document of at most 512 tokens is one window.
A window (doc, start, loss_start, end) feeds tokens [start, end) to the student and trains rows [loss_start, end)
(row t predicts token t+1, read from the stream, so a window's last row trains too), except a document's last row.
Difficulty = discrepancy-energy density (0.5 sum disc^2 / length) + gap-energy density (topology.py's drift G over
the window's 64-token blocks / length); lower is easier. The curriculum's four phases of equal steps draw from the
easiest 30%, 55%, 80%, 100% of the training windows (--pools; draw_schedule, which train.py follows). train.py
ranks its own training windows; phase.npy ranks all windows (held-out ones too) for the report only.
WindowBatches turns windows into training batches.

Inputs   --cache, --topology (topology.py's folder; optional with --fixed_stride)
Outputs  in --out (default out/windows):
  windows.npy     int64   [W, 4]  (doc, start, loss_start, end) in stream rows
  difficulty.npy  float32 [W]
  phase.npy       uint8   [W]     first curriculum pool that holds the window, over all windows (0..3; nested)
  report.html (the topology picture with the window cuts), manifest.json

Run
  python windows.py --cache out/cache --topology out/topology --out out/windows
  python windows.py --cache out/cache --out out/windows_fixed --fixed_stride      # plain-KD ablation
"""

import argparse
import os
from collections import namedtuple

import numpy as np

import topology
from cache_teacher import TeacherCache
from common import (FORMAT_VERSION, REASONING, ROLES, check_ranges, check_rows, check_upstream, checksums, cli,
                    pad_right, prepare_out, read_manifest, save_npy, sha256_json, verify_checksums, write_json)
from pages import topology_page
from topology import BLOCK, doc_last_rows, span_channels

POOLS = (0.30, 0.55, 0.80, 1.00)  # the card's curriculum: phase p draws from the easiest POOLS[p] of the windows

# -----------------------------------------------------------------------------
# Pure functions


def smooth3(x):
    """3-token centred moving average of one document's values (edges average what exists)."""
    x = np.asarray(x, dtype=np.float64)
    s = np.convolve(x, np.ones(3), mode="same")
    n = np.convolve(np.ones(len(x)), np.ones(3), mode="same")
    return s / n


def cut_document(sm, jump, window=512, min_cut=384, overlap=(32, 128)):
    """Windows of one document: sm (n,) smoothed disc, jump (n,) bool -> ([(start, loss_start, end)] in document
    rows, the number of cuts forced through a jump). A cut at e (before row e) is barred by jump[e-2], jump[e-1] or
    jump[e]; e = n - 1 is never a cut (the next window would train only the last row, which has no next token)."""
    n = len(sm)
    out, s, loss_start, forced = [], 0, 0, 0  # s: where the window's tokens start; loss_start: its first trained row
    while n - s > window:  # what is left does not fit one window: cut it
        hi = min(s + window, n - 2)  # the last end that leaves the next window a row to train
        cand = np.arange(min(s + min_cut, hi), hi + 1)  # candidate ends e, e - s in [min_cut, window]
        # a cut may not touch a jump: not at the jump's row, nor on either side of the change
        barred = jump[cand - 2] | jump[cand - 1] | jump[np.minimum(cand, n - 1)]
        ok = cand[~barred]
        if len(ok) == 0:  # jumps everywhere in range: cut anyway, and count it
            ok, forced = cand, forced + 1
        e = int(ok[np.argmin(sm[ok])])  # the calmest allowed end (lowest smoothed disc)
        out.append((s, loss_start, e))
        # the next window re-reads o tokens before e as context (o in [32, 128]), starting at the calmest of them;
        # its loss starts at e, so every trainable row belongs to exactly one window
        starts = np.arange(e - overlap[1], e - overlap[0] + 1)
        s, loss_start = int(starts[np.argmin(sm[starts])]), e
    out.append((s, loss_start, n))  # the rest of the document, which fits
    return out, forced


def fixed_document(n, window=512, stride=512):
    """Fixed-stride windows of one document (no topology): starts every `stride` rows, the overlap as context."""
    out, s, loss_start = [], 0, 0
    while True:
        e = min(s + window, n)
        if e == n - 1:  # the next window would train only the last row, which has no next token: end one earlier
            e -= 1
        out.append((s, loss_start, e))
        if e == n:
            return out
        s, loss_start = min(s + stride, e), e


def fixed_windows(cache, window=512, stride=512):
    """Fixed-stride windows of every document of a cache: (W, 4) stream rows (doc, start, loss_start, end)."""
    rows = [(d, a + s, a + l, a + e) for d in range(cache.n_docs) for a, b in [cache.doc_range(d)]
            for s, l, e in fixed_document(b - a, window, stride)]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)  # (W, 4), also when W = 0


def window_difficulty(delta, jump, valid, disc, windows, block=BLOCK):
    """Discrepancy-energy density + gap-energy density of each window [start, end): windows (W, 4), stream arrays
    (N,) -> (W,) float32. span_channels sums over the window's `block`-token blocks; / its real length."""
    ch = span_channels(delta, jump, valid, disc, windows[:, 1], windows[:, 3], block)
    length = (windows[:, 3] - windows[:, 1]).astype(np.float64)
    return ((ch["edisc"] + ch["drift"]) / length).astype(np.float32)


def parse_pools(text):
    """--pools "0.30,0.55,0.80,1.0" -> (0.3, 0.55, 0.8, 1.0): increasing fractions in (0, 1], the last one 1."""
    try:
        pools = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--pools {text!r}: comma-separated fractions, e.g. 0.30,0.55,0.80,1.0") from None
    if not all(a < b for a, b in zip((0.0,) + pools, pools)) or pools[-1] != 1.0:
        raise ValueError(f"--pools {text!r}: the fractions must increase within (0, 1] and end at 1")
    return pools


def pool_phases(difficulty, pools=POOLS):
    """phase[w] = the first pool that holds window w; pool p holds the ceil(pools[p] x W) easiest (ties by index)."""
    order = np.argsort(difficulty, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    sizes = np.ceil(np.asarray(pools) * len(order) - 1e-9).astype(np.int64)
    return np.searchsorted(sizes, rank, side="right").astype(np.uint8)


def step_phase(step, total, n_phases=4):
    """The curriculum phase of an optimizer step: n_phases (the card: four) phases of equal length."""
    return min(step * n_phases // max(total, 1), n_phases - 1)


def draw_schedule(pools, total, batch, seed):
    """The windows of every optimizer step, (total, batch) indices: phase p draws from its whole pool, pools[p] (so
    the easiest windows train in every phase), in shuffled passes. Pure: a resumed run and every process agree."""
    phases = np.array([step_phase(s, total, len(pools)) for s in range(total)], dtype=np.int64)
    out = []
    for p, pool in enumerate(pools):
        n = int((phases == p).sum()) * batch  # this phase's draws
        assert len(pool) or not n, f"phase {p} has steps but an empty pool"
        rng = np.random.default_rng([seed, p])
        passes = [rng.permutation(pool) for _ in range(-(-n // max(len(pool), 1)))]
        out.append(np.concatenate(passes)[:n] if n else np.zeros(0, np.int64))
    return np.concatenate(out).astype(np.int64).reshape(total, batch)


def draws_summary(schedule, bands, alphas):
    """How often the schedule draws the windows of each difficulty band, and at what alpha: bands is a list of
    window-index arrays (band p = pool p minus pool p-1), alphas (total,) the KD weight of each step."""
    steps = np.repeat(np.arange(len(schedule)), schedule.shape[1])  # (total * batch,) the step of each draw
    drawn = schedule.ravel()
    counts = np.bincount(drawn, minlength=max([int(drawn.max())] + [int(b.max()) for b in bands if len(b)]) + 1)
    out = []
    for band in bands:
        hit = np.isin(drawn, band)
        out.append(dict(windows=len(band), draws=int(hit.sum()), never_drawn=int((counts[band] == 0).sum()),
                        mean_alpha=float(alphas[steps[hit]].mean()) if hit.any() else None))
    return out


# -----------------------------------------------------------------------------
# The windows folder


Windows = namedtuple("Windows", "windows phase difficulty fingerprint manifest")


def load(folder, cache_folder, topology_folder=None, needed_by="", verify=True):
    """windows.load(folder, cache folder[, topology folder]) -> Windows(windows (W, 4) int64, phase (W,) uint8,
    difficulty (W,) float32, fingerprint, manifest), refused if incomplete or built from another cache/topology."""
    m = read_manifest(folder, "windows", needed_by=needed_by)
    if verify:  # each file against its checksum: a missing, cut or changed file is one line naming it
        verify_checksums(folder, m)
    check_upstream(m, cache_folder, "cache", folder)
    if topology_folder and m["upstream"]["topology"] is not None:  # fixed-stride windows have no topology
        check_upstream(m, topology_folder, "topology", folder)
    arr = {n: np.load(os.path.join(folder, n + ".npy")) for n in ["windows", "phase", "difficulty"]}
    if len(arr["windows"]) == 0:
        raise ValueError(f"{folder}/windows.npy: no windows")
    if verify:  # the values the format promises: each window inside its document, difficulty finite
        off = np.load(os.path.join(cache_folder, "doc_offsets.npy"))  # (D + 1,) the documents' first stream rows
        doc, start, loss_start, end = arr["windows"].T
        inside = (doc >= 0) & (doc < len(off) - 1)
        d = np.where(inside, doc, 0)
        inside &= (off[d] <= start) & (start <= loss_start) & (loss_start < end) & (end <= off[d + 1])
        check_rows(os.path.join(folder, "windows.npy"), ~inside, arr["windows"], "is not inside its document "
                   "(doc, start, loss_start, end)")
        check_rows(os.path.join(folder, "difficulty.npy"), ~np.isfinite(arr["difficulty"]), arr["difficulty"],
                   "is not finite")
    return Windows(arr["windows"], arr["phase"], arr["difficulty"], m["fingerprint"], m)


# -----------------------------------------------------------------------------
# The windows as training batches (train.py, ablate.py and bench.py read them through these)


def split_micro(lengths, n_micro, batch_size):
    """Cut one step's windows, sorted by length, into n_micro runs of consecutive windows with the fewest padded
    tokens, none over batch_size x the longest window (the memory --batch_size sets). The gradient is the same for
    every cut (losses are divided by the step's rows); padding falls from 11% to 3% on the demo. A dynamic
    programme, O(n_micro x n^2). Returns (n_micro + 1,) cut points, 0 ... len(lengths); ValueError if none fits."""
    L = np.asarray(lengths, dtype=np.int64)
    n = len(L)
    assert 1 <= n_micro <= n and np.all(np.diff(L) >= 0), (n_micro, L)
    cap = batch_size * int(L[-1])
    s, i = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    cost = np.where(i > s, (i - s) * L[np.maximum(i - 1, 0)], np.inf)  # windows s..i-1 as one micro-batch
    cost[cost > cap] = np.inf
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    arg = []
    for _ in range(n_micro):  # best[i]: fewest tokens for the first i windows in j micro-batches
        total = best[:, None] + cost
        arg.append(total.argmin(0))
        best = total.min(0)
    if not np.isfinite(best[n]):
        raise ValueError(f"no cut of {n} windows into {n_micro} micro-batches keeps each within {batch_size} x the "
                         f"longest window ({cap} tokens)")
    cuts = [n]
    for a in reversed(arg):
        cuts.append(int(a[cuts[-1]]))
    return np.array(cuts[::-1])


def batch_tensors(device, idx, sel, targets, reasoning, jump_w, topk_ids=None, topk_logprobs=None, lse=None,
                  lengths=None):
    """The micro-batch dict micro_step reads, as tensors on `device`: idx (B, L) tokens; sel (R,) trained rows as
    flat indices into B*L; targets (R,); reasoning (R,) bool; jump_w (R,); the teacher's topk_ids, topk_logprobs
    (R, k) and lse (R, nT); lengths: each sequence's real tokens (default L), which tok/s and MFU count."""
    import torch
    arrays = dict(idx=idx, sel=sel, targets=targets, reasoning=reasoning, jump_w=jump_w, topk_ids=topk_ids,
                  topk_logprobs=topk_logprobs, lse=lse)
    out = {k: torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v).to(device)
           for k, v in arrays.items() if v is not None}
    B, L = out["idx"].shape
    out["lengths"] = [int(n) for n in lengths] if lengths is not None else [L] * B
    out["ntok"] = sum(out["lengths"])
    return out


class WindowBatches:
    """The windows of a run over the cache; batch() turns window indices into a padded micro-batch."""

    def __init__(self, cache, windows, jump_weight=None):
        self.cache, self.windows, self.jump_weight = cache, windows, jump_weight
        self.doc_end = np.asarray(cache.doc_offsets)[windows[:, 0] + 1]  # (W,) end row of each window's document

    def rows_of(self, w):
        """Stream rows trained in window w: [loss_start, end), minus the document's last row and prompt targets."""
        d, s, l, e = self.windows[w]
        t = np.arange(l, min(e, self.doc_end[w] - 1))  # row t predicts token t + 1, which must exist
        return t[self.cache.roles[t + 1] != ROLES["prompt"]]  # loss never falls on the prompt

    def count(self, ws):
        """Rows trained in windows ws."""
        return sum(len(self.rows_of(w)) for w in ws)

    def lengths(self, ws):
        """(len(ws),) tokens of each window."""
        return self.windows[ws, 3] - self.windows[ws, 1]

    def batch(self, ws, device):
        lengths = self.lengths(ws)
        L = int(lengths.max())
        sel, rows = [], []
        for b, w in enumerate(ws):
            t = self.rows_of(w)
            sel.append(b * L + (t - self.windows[w, 1]))  # flat index into (B, L)
            rows.append(t)
        sel, rows = np.concatenate(sel), np.concatenate(rows)  # (R,) each
        teacher = self.cache.rows_at(rows) if self.cache.has_teacher else {}
        return batch_tensors(
            device, idx=pad_right([self.cache.tokens[s:e] for _, s, _, e in self.windows[ws]], L), sel=sel,
            targets=self.cache.tokens[rows + 1].astype(np.int64),
            reasoning=np.isin(self.cache.roles[rows + 1], REASONING), lengths=lengths,
            jump_w=self.jump_weight[rows] if self.jump_weight is not None else np.ones(len(rows), np.float32),
            **teacher)


def main(args):
    check_ranges(args, window="[1, inf)", min_cut="[1, inf)", overlap_min="[1, inf)", overlap_max="[1, inf)",
                 stride="[1, inf)")
    cache = TeacherCache(args.cache, verify=not args.no_verify)
    if args.topology is None and not args.fixed_stride:
        raise ValueError("--topology is needed (or --fixed_stride for the plain-KD ablation)")
    topo = (topology.load(args.topology, args.cache, needed_by="windows.py", verify=not args.no_verify)
            if args.topology else None)
    pools = parse_pools(args.pools)
    if args.fixed_stride and not 0 < args.stride <= args.window:
        raise ValueError(f"--stride {args.stride}: must be in (0, --window {args.window}] (no row may be skipped)")
    if not (0 < args.min_cut <= args.window) or not (0 < args.overlap_min <= args.overlap_max < args.min_cut):
        raise ValueError(f"need 0 < overlap_min <= overlap_max < min_cut <= window, got {args.overlap_min}, "
                         f"{args.overlap_max}, {args.min_cut}, {args.window}")
    settings = dict(window=args.window, min_cut=args.min_cut, overlap=[args.overlap_min, args.overlap_max],
                    fixed_stride=args.fixed_stride, stride=args.stride, pools=list(pools))
    upstream = dict(cache=cache.fingerprint, topology=topo.fingerprint if topo else None)
    fingerprint = sha256_json(dict(upstream=upstream, settings=settings, version=FORMAT_VERSION))
    if prepare_out(args.out, "windows", fingerprint, args.force) == "done":
        print(f"{args.out}: complete windows with the same inputs already there; nothing to do")
        return
    forced = 0
    if args.fixed_stride:
        windows = fixed_windows(cache, args.window, args.stride)
    else:
        rows = []
        for d in range(cache.n_docs):
            a, b = cache.doc_range(d)
            disc, jump = topo.arrays["disc"][a:b], np.asarray(topo.arrays["jump"][a:b])  # this document's rows
            wins, f = cut_document(smooth3(disc), jump, args.window, args.min_cut, (args.overlap_min, args.overlap_max))
            forced += f
            rows += [(d, a + s, a + l, a + e) for s, l, e in wins]
        windows = np.array(rows, dtype=np.int64).reshape(-1, 4)  # (W, 4)
    if topo is not None:
        valid = ~doc_last_rows(cache.doc_offsets, 0, len(cache))
        difficulty = window_difficulty(np.asarray(topo.arrays["delta"]), np.asarray(topo.arrays["jump"]), valid,
                                       np.asarray(topo.arrays["disc"]), windows, topo.block)
        phase = pool_phases(difficulty, pools)
        # the topology picture, with the window cuts drawn into the tokens
        cuts = [(int(w[2]), f"window {i}: loss starts") for i, w in enumerate(windows) if w[2] > w[1]]
        cuts += [(int(w[1]), f"window {i}: context starts") for i, w in enumerate(windows)]
        topology_page(os.path.join(args.out, "report.html"), cache, topo.arrays, topo.report, cuts=sorted(cuts))
    else:  # no topology: no difficulty, every pool is every window
        difficulty, phase = np.zeros(len(windows), np.float32), np.zeros(len(windows), np.uint8)
    for name, arr in dict(windows=windows, difficulty=difficulty, phase=phase).items():
        save_npy(os.path.join(args.out, name + ".npy"), arr)
    lengths = windows[:, 3] - windows[:, 1]  # (W,) tokens fed to the student
    overlaps = windows[:, 2] - windows[:, 1]  # (W,) context-only tokens before the first trained row
    counts = dict(windows=len(windows), documents=cache.n_docs, forced_cuts=forced,
                  mean_length=float(lengths.mean()), max_length=int(lengths.max()),
                  overlap_min=int(overlaps[overlaps > 0].min()) if (overlaps > 0).any() else 0,
                  overlap_max=int(overlaps.max()), trainable_rows=int((windows[:, 3] - windows[:, 2]).sum()),
                  per_phase=[int((phase <= p).sum()) for p in range(len(pools))])
    write_json(os.path.join(args.out, "manifest.json"), dict(
        phase="windows", version=FORMAT_VERSION, fingerprint=fingerprint, settings=settings, upstream=upstream,
        args=vars(args), counts=counts, curriculum=topo is not None,
        dtypes=dict(windows="int64", difficulty="float32", phase="uint8"), complete=True,
        sha256=checksums(args.out, ["windows.npy", "difficulty.npy", "phase.npy"])))
    print(f"windows: {len(windows):,} windows over {cache.n_docs:,} documents, mean {lengths.mean():.0f} tokens, "
          f"overlap {counts['overlap_min']}-{counts['overlap_max']}, pools {counts['per_phase']}, "
          f"{forced} forced cuts -> {args.out}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="out/cache", help="cache_teacher.py output folder")
    p.add_argument("--topology", default=None, help="topology.py output folder (not needed with --fixed_stride)")
    p.add_argument("--out", default="out/windows", help="output folder")
    p.add_argument("--window", type=int, default=512, help="longest window in tokens (card: 512)")
    p.add_argument("--min_cut", type=int, default=384, help="shortest window before a topology cut, tokens")
    p.add_argument("--overlap_min", type=int, default=32, help="least context overlap, tokens (card: 32)")
    p.add_argument("--overlap_max", type=int, default=128, help="most context overlap (card: 128)")
    p.add_argument("--pools", default=",".join(f"{f:.2f}" for f in POOLS), help="curriculum pools for phase.npy: "
                   "the easiest fraction of the windows each phase draws from (card: 30/55/80/100%%)")
    p.add_argument("--fixed_stride", action="store_true", help="plain-KD ablation: fixed-stride windows, no topology")
    p.add_argument("--stride", type=int, default=512, help="stride of --fixed_stride windows, tokens")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--no_verify", action="store_true", help="skip the checksums of the input folders' files")
    return p


if __name__ == "__main__":
    cli("windows.py", main, get_parser, "rerun the same command")
