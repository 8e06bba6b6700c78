"""
Phase 1: records -> DualMind text -> tokens -> one teacher pass -> a compact top-k cache, all that later phases read.

Inputs
  --data      JSONL or parquet files, or Hub dataset ids (org/name), in order: records with explore/examine/response,
              or question/CoT/response (the 0xZee/dataset-CoT-* format), whose CoT is split into explore and examine
  --teacher   a model folder or Hub id, or `none` for tokens and roles only
  --tokenizer tokenizer.json or its folder (default: the teacher's)

Outputs, in --out (default out/cache), one row per stream position, documents concatenated in order:
  tokens.npy          uint32  [N]          token ids
  doc_offsets.npy     int64   [D+1]        document d is rows doc_offsets[d]:doc_offsets[d+1]
  roles.npy           uint8   [N]          0 prompt, 1 explore, 2 examine, 3 response (tags with their block)
  topk_ids.npy        uint8   [N, 18k/8]   the k ids, 18-bit packed (4 ids in 9 bytes; unpack_ids18)
  topk_logprobs.npy   float16 [N, k]       teacher log-probs at T=1 of those ids, sorted descending
                                           (logit = logprob + lse[:, 0]; stored centred so fp16 keeps 1e-4 nats)
  lse.npy             float32 [N, nT]      logsumexp(z / T) over the full vocabulary, per T in --temperatures
  target_logprob.npy  float32 [N]          teacher log-prob of the real next token (0 on a document's last row)
  entropy.npy         float32 [N]          teacher entropy at T=1, full vocabulary, nats
  tokenizer.json (+ tokenizer_config.json), manifest.json ("complete": true written last)
Row t is the teacher's distribution for token t+1 (logit = logprob + lse[:, 0]); 288 bytes per position at k=64.

Run
  python cache_teacher.py --data data/physics_cot.jsonl --teacher out/teacher --out out/cache        # demo
  python cache_teacher.py --data 0xZee/dataset-CoT-Differential-Equations-636 ... \\
      --teacher Qwen/Qwen3-30B-A3B-Thinking-2507 --device cuda --out out/cache           # real, one GPU (README)
  torchrun --nproc_per_node=8 cache_teacher.py ... --device cuda                            # documents split by rank
  python cache_teacher.py ... --stream_layers --stream_budget_gb 18 ...   # a teacher larger than the GPU: stream.py
Killed at any point, the same command resumes; a complete cache is left alone.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time

import numpy as np

from common import (DTYPES, FORMAT_VERSION, ROLES, check_device, check_free_space, check_ranges, check_rows, checksums,
                    cli, close_distributed, disk_full_is_oserror, drop_empty_folder, dualmind_text, end_tokens,
                    init_distributed, input_files, load_tokenizer, prepare_out, Progress, publish, read_manifest,
                    read_records, record_to_blocks, save_npy, sha256_file, sha256_json, stop_requests, token_roles,
                    verify_checksums, write_json)

try:  # the teacher pass needs torch; the cache reader (TeacherCache) does not: topology.py and windows.py run without
    import torch

    from model import Qwen3, resolve_folder
    from stream import batch_input, check_budget, stream_batches, stream_budget, stream_pieces
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    torch = None

TEACHER_ARRAYS = ["topk_ids", "topk_logprobs", "lse", "target_logprob", "entropy"]

# -----------------------------------------------------------------------------
# Teacher statistics (pure), id packing


def topk_stats(head, h, targets, k, temperatures, chunk):
    """h (R, C) final hidden states, targets (R,) next-token ids -> per row: top-k ids and log-probs, logsumexp at
    each T, target log-prob, entropy (fp32). Logits come `chunk` rows at a time (memory chunk x vocab), each chunk
    padded to whole 32-row tiles: BLAS rounds a partial tile differently, so any --chunk writes the same bytes.
    On CPU the statistics run over 32-row blocks that stay in cache."""
    out = {n: [] for n in ["ids", "logprobs", "lse", "target", "entropy"]}
    W, buf, tile = head.weight, None, 32
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk]
        n = len(hc)  # real rows; the padding rows are computed and dropped
        hc = torch.cat([hc, hc.new_zeros(-n % tile, hc.shape[1])])  # (c, C), c a multiple of the tile
        if W.dtype == torch.float32:  # reuse one logits buffer: no fresh chunk x vocab allocation per chunk
            buf = torch.empty(len(hc), W.shape[0], device=W.device) if buf is None else buf
            z = torch.matmul(hc, W.t(), out=buf[:len(hc)])[:n]  # (n, V)
        else:
            z = head(hc).float()[:n]  # (n, V) fp32 statistics whatever the teacher dtype
        top, ids = group_topk(z, k)  # (n, k) sorted descending
        block = n if z.is_cuda else tile
        for b in range(0, n, block):
            e = min(b + block, n)  # a chunk's last block may be short: its targets stop at the chunk's end too
            st = row_stats(z[b:e], top[b:e], targets[s + b:s + e].to(z.device), temperatures)
            out["ids"].append(ids[b:e])
            for name, v in st.items():
                out[name].append(v)
    return {n: torch.cat(v) for n, v in out.items()}


EXP_FLOOR = -87.0  # exp inputs are clamped here: exp(-87) = 1.6e-38 is still a normal fp32. On a CPU, exp below
# it (a subnormal result) is 10-30x slower; the change is invisible in a sum that holds the row max's exp(0) = 1.


def row_stats(z, top, targets, temperatures):
    """z (r, V) fp32 logits (overwritten) and their top-k values -> log-probs of the top-k, logsumexp at
    each T, target log-prob and entropy for these r rows."""
    m = top[:, :1]  # row max
    z.sub_(m)  # z - max <= 0, in place
    target = z.gather(1, targets[:, None])[:, 0]  # (r,) the target's z - max
    e2 = None
    if 2.0 in temperatures:  # e^((z - m) / 2) is the exp; its square e^(z - m) costs a multiply, not another exp
        e2 = z.mul(0.5).clamp_min_(EXP_FLOOR).exp_()  # (r, V)
        e = e2 * e2  # (r, V) unnormalised probabilities
    else:
        e = z.clamp_min(EXP_FLOOR).exp_()
    s1 = e.sum(-1)
    log_s1 = s1.log()
    lse = {1.0: m[:, 0] + log_s1}
    for T in temperatures:  # logsumexp(z / T) = m / T + log sum e^(1/T)
        if T not in (1.0, 2.0):
            lse[T] = m[:, 0] / T + torch.div(z, T).clamp_min_(EXP_FLOOR).exp_().sum(-1).log()
    entropy = log_s1 - z.mul_(e).sum(-1) / s1  # H = log s - sum e (z - m) / s; z is spent now
    if e2 is not None:
        lse[2.0] = m[:, 0] / 2 + e2.sum(-1).log()
    return dict(logprobs=top - lse[1.0][:, None], lse=torch.stack([lse[T] for T in temperatures], 1),
                target=target - log_s1, entropy=entropy)


def group_topk(z, k):
    """Exact torch.topk(z, k) (sorted descending), cheaper on CPU: the vocabulary split into strided groups of 16
    (else 8 or 4: what divides V and leaves >= 4k groups); the top-k lie in the k groups with the largest maxima."""
    R, V = z.shape
    groups = next((g for g in (16, 8, 4) if V % g == 0 and V // g >= 4 * k), None)
    if groups is None:
        return torch.topk(z, k, dim=-1)
    n = V // groups
    zg = z.view(R, groups, n)  # (R, groups, n): group j = ids {j, j + n, j + 2n, ...}
    _, gi = torch.topk(zg.amax(1), k, dim=-1, sorted=False)  # (R, k) the groups holding the top-k
    cand = zg.gather(2, gi[:, None, :].expand(R, groups, k)).reshape(R, groups * k)  # (R, groups x k) candidates
    top, ci = torch.topk(cand, k, dim=-1)  # sorted descending
    return top, (ci // k) * n + gi.gather(1, ci % k)


def pack_ids18(ids):
    """(N, k) ints < 2^18 -> (N, 9k/4) uint8: 4 ids in 9 little-endian bytes. k must be a multiple of 4."""
    N, k = ids.shape
    a = ids.astype(np.uint64).reshape(N, k // 4, 4)  # (N, k/4, 4) groups of 4 ids
    low = a[..., 0] | (a[..., 1] << 18) | (a[..., 2] << 36) | (a[..., 3] << 54)  # 64 bits
    out = np.empty((N, k // 4, 9), dtype=np.uint8)
    out[..., :8] = low.astype("<u8").view(np.uint8).reshape(N, k // 4, 8)  # (N, k/4, 8) the low 64 bits as bytes
    out[..., 8] = (a[..., 3] >> 10).astype(np.uint8)  # id 3's top 8 bits
    return out.reshape(N, k // 4 * 9)  # (N, 9k/4)


def unpack_ids18(packed):
    """Inverse of pack_ids18: (N, 9k/4) uint8 -> (N, k) int64."""
    N = packed.shape[0]
    b = np.ascontiguousarray(packed).reshape(N, -1, 9)  # (N, k/4, 9) groups of 4 ids
    low = b[..., :8].copy().view("<u8")[..., 0]  # (N, k/4) the low 64 bits
    m = np.uint64((1 << 18) - 1)
    ids = np.stack([low & m, (low >> np.uint64(18)) & m, (low >> np.uint64(36)) & m,
                    (low >> np.uint64(54)) | (b[..., 8].astype(np.uint64) << np.uint64(10))], -1)
    return ids.reshape(N, -1).astype(np.int64)  # (N, k/4, 4) -> (N, k)


# -----------------------------------------------------------------------------
# The reader later phases use


class TeacherCache:
    """Memory-mapped view of a complete cache folder. rows(a, b) returns a dict of numpy arrays for rows [a, b)."""

    def __init__(self, folder, verify=True):
        self.folder = folder
        self.manifest = read_manifest(folder, "cache")
        if verify:  # every file against the checksum written with it (--no_verify skips this)
            verify_checksums(folder, self.manifest)
        self.fingerprint = self.manifest["fingerprint"]
        self.has_teacher = self.manifest["teacher"] is not None
        self.k = self.manifest["args"]["k"]
        self.temperatures = self.manifest["args"]["temperatures"]
        load = lambda n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r")
        self.tokens, self.doc_offsets, self.roles = load("tokens"), load("doc_offsets"), load("roles")
        self.arrays = {n: load(n) for n in TEACHER_ARRAYS} if self.has_teacher else {}
        self.n_docs = len(self.doc_offsets) - 1
        self.tokenizer_path = os.path.join(folder, "tokenizer.json")
        if verify:  # and the values against what the format promises (a writer's bug, not only a bad disk)
            self.check_bounds()

    def check_bounds(self, chunk=1 << 20):
        """What the format promises, `chunk` rows at a time: offsets increasing from 0 to N, roles 0-3, and with a
        teacher finite log-probs <= 0 sorted descending, entropy in [0, ln V], finite lse, ids < V (check_rows)."""
        fail = lambda name, bad, a, what, values: check_rows(f"{self.folder}/{name}.npy", bad, values, what, a)
        off, N = np.asarray(self.doc_offsets), len(self.tokens)
        if off[0] != 0 or off[-1] != N or np.any(np.diff(off) <= 0):
            raise ValueError(f"{self.folder}/doc_offsets.npy: not increasing from 0 to {N} positions")
        V = self.manifest.get("teacher_vocab_size")
        for a in range(0, N, chunk):
            rows = slice(a, min(a + chunk, N))
            roles = np.asarray(self.roles[rows])
            fail("roles", roles > 3, a, "is not a role (0-3)", roles)  # check_rows raises only if a row is bad
            if not self.has_teacher:
                continue
            lp = np.asarray(self.arrays["topk_logprobs"][rows], dtype=np.float32)  # (r, k)
            bad = ~np.isfinite(lp).all(1) | (lp > 0).any(1) | (np.diff(lp, axis=1) > 0).any(1)
            fail("topk_logprobs", bad, a, "is not finite, <= 0 and sorted descending", lp)
            if V:
                ent = np.asarray(self.arrays["entropy"][rows])
                bad = ~((ent >= 0) & (ent <= np.log(V) + 1e-3))  # nan is bad too
                fail("entropy", bad, a, f"is outside [0, ln V = {np.log(V):.4f}]", ent)
            lse = np.asarray(self.arrays["lse"][rows])
            fail("lse", ~np.isfinite(lse).all(1), a, "is not finite", lse)
            if V:
                ids = unpack_ids18(self.arrays["topk_ids"][rows])  # (r, k)
                fail("topk_ids", (ids >= V).any(1), a, f"holds an id >= the vocabulary {V}", ids)

    def __len__(self):
        return len(self.tokens)

    def doc_range(self, d):
        return int(self.doc_offsets[d]), int(self.doc_offsets[d + 1])

    def rows(self, a, b, teacher=True):
        r = {"tokens": np.asarray(self.tokens[a:b]), "roles": np.asarray(self.roles[a:b])}
        if teacher and self.has_teacher:
            r["topk_ids"] = unpack_ids18(self.arrays["topk_ids"][a:b])
            for n in TEACHER_ARRAYS[1:]:
                r[n] = np.asarray(self.arrays[n][a:b], dtype=np.float32)
        return r

    def rows_at(self, idx):
        """Teacher arrays at arbitrary rows idx (n,): topk_ids (n, k) int64, topk_logprobs and lse float32."""
        idx = np.asarray(idx)
        return dict(topk_ids=unpack_ids18(self.arrays["topk_ids"][idx]),
                    topk_logprobs=np.asarray(self.arrays["topk_logprobs"][idx], dtype=np.float32),
                    lse=np.asarray(self.arrays["lse"][idx], dtype=np.float32))

    def doc(self, d, teacher=True):
        return self.rows(*self.doc_range(d), teacher=teacher)

    def temperature_index(self, T):
        if T not in self.temperatures:
            raise ValueError(f"{self.folder}: temperature {T} was not cached (cached: {self.temperatures})")
        return self.temperatures.index(T)


def teacher_log_q(topk_logprobs, lse, t_index, T):
    """The teacher's log q_T (..., k) of its cached ids (numpy or torch): topk_logprobs (..., k) at T=1, lse (..., nT),
    t_index the column of T. As logprob_i = z_i - L_1:  log q_T(i) = z_i / T - L_T = (logprob_i + L_1) / T - L_T."""
    return (topk_logprobs + lse[..., :1]) / T - lse[..., t_index:t_index + 1]


def tail_mass(topk_logprobs, lse, t_index, T):
    """1 - sum of the top-k probabilities at temperature T (..., ): the mass the cache keeps as one tail bucket."""
    return 1.0 - np.exp(teacher_log_q(topk_logprobs, lse, t_index, T)).sum(-1)


def write_cache(out, tokens, roles, doc_offsets, teacher=None, k=64, temperatures=(1.0, 2.0), tokenizer=None,
                source="arrays"):
    """A complete cache folder from in-memory arrays (another engine's cache; the tests' and bench.py's streams).
    teacher: None, or a dict of every TEACHER_ARRAYS entry (topk_ids as (N, k) ints, packed here)."""
    os.makedirs(out, exist_ok=True)
    arrays = dict(tokens=np.asarray(tokens, np.uint32), roles=np.asarray(roles, np.uint8),
                  doc_offsets=np.asarray(doc_offsets, np.int64))
    if teacher is not None:
        arrays.update(topk_ids=pack_ids18(np.asarray(teacher["topk_ids"])),
                      topk_logprobs=np.asarray(teacher["topk_logprobs"], np.float16),
                      lse=np.asarray(teacher["lse"], np.float32).reshape(len(tokens), -1),  # (N, nT)
                      target_logprob=np.asarray(teacher["target_logprob"], np.float32),
                      entropy=np.asarray(teacher["entropy"], np.float32))
    h = hashlib.sha256()
    for n, a in arrays.items():
        save_npy(os.path.join(out, n + ".npy"), a)
        h.update(n.encode() + a.tobytes())
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))
    N = len(arrays["tokens"])
    write_json(os.path.join(out, "manifest.json"), dict(
        phase="cache", version=FORMAT_VERSION, fingerprint=h.hexdigest(), inputs=dict(source=source),
        args=dict(k=k, temperatures=list(map(float, temperatures))),
        teacher=None if teacher is None else dict(name=source), end_token=None,
        counts=dict(positions=N, documents=len(arrays["doc_offsets"]) - 1), complete=True))


# -----------------------------------------------------------------------------
# The teacher pass: batches of documents, their statistics written into shared memory-mapped files


def plan_batches(lengths, batch_tokens):
    """Documents grouped by length (longest first) so that batch size x longest length <= batch_tokens; the plan
    depends only on the lengths, so any number of ranks, and any resume, computes the same batches."""
    order = np.argsort(-lengths, kind="stable")
    batches, cur = [], []
    for d in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(int(d))
    batches.append(cur)
    return batches


def write_stats(head, h, idx, docs, doc_offsets, arrays, k, temps, chunk):
    """h (B, L, C) final-normed hidden states of a batch -> the statistics of its real positions, written into
    `arrays` at their stream rows. Returns the number of positions."""
    lengths = [int(doc_offsets[d + 1] - doc_offsets[d]) for d in docs]
    rows = torch.cat([h[i, :n] for i, n in enumerate(lengths)])  # (R, C) real positions only
    nxt = torch.cat([torch.cat([idx[i, 1:n], idx.new_zeros(1)]) for i, n in enumerate(lengths)])  # (R,) targets
    st = {name: v.cpu() for name, v in topk_stats(head, rows, nxt, k, temps, chunk).items()}
    r = 0
    for d, n in zip(docs, lengths):
        a = int(doc_offsets[d])
        st["target"][r + n - 1] = 0.0  # the last row of a document has no next token
        sl = slice(r, r + n)
        arrays["topk_ids"][a:a + n] = pack_ids18(st["ids"][sl].numpy())
        arrays["topk_logprobs"][a:a + n] = st["logprobs"][sl].numpy().astype(np.float16)
        arrays["lse"][a:a + n] = st["lse"][sl].numpy()
        arrays["target_logprob"][a:a + n] = st["target"][sl].numpy()
        arrays["entropy"][a:a + n] = st["entropy"][sl].numpy()
        r += n
    return r


def cache_batches(model, tokens, doc_offsets, batches, arrays, k, temps, chunk, device, on_done=None):
    """The teacher pass proper: forward each batch of documents, statistics per position, rows into `arrays`."""
    for b, docs in batches:
        idx = batch_input(tokens, doc_offsets, docs)  # (B, L)
        with torch.no_grad():
            h = model(idx.to(device), hidden_only=True)  # (B, L, C)
            n = write_stats(model.lm_head, h, idx, docs, doc_offsets, arrays, k, temps, chunk)
        if on_done:
            on_done(b, n)


def progress_files(out):
    """The progress.{rank}.json files of an unfinished pass: each lists the batches its rank has written."""
    return glob.glob(os.path.join(out, "progress.*.json"))


def partial_shapes(N, k, temps):
    """{name: (shape, dtype)} of the teacher arrays for N positions."""
    return dict(topk_ids=((N, k // 4 * 9), np.uint8), topk_logprobs=((N, k), np.float16),
                lse=((N, len(temps)), np.float32), target_logprob=((N,), np.float32), entropy=((N,), np.float32))


def check_space(out, N, D, k, temps, has_teacher):
    """Room on `out`'s disk for the whole cache, less the .partial.npy files an interrupted run allocated there."""
    need = N * 5 + (D + 1) * 8  # tokens (uint32), roles (uint8), doc_offsets (int64)
    for n, (shape, dt) in partial_shapes(N, k, temps).items() if has_teacher else []:
        path = os.path.join(out, n + ".partial.npy")
        have = os.stat(path).st_blocks * 512 if os.path.isfile(path) else 0  # blocks really on disk
        need += max(math.prod(shape) * np.dtype(dt).itemsize - have, 0)
    check_free_space(out, need, "the cache")


def open_partials(out, N, k, temps, rank, world):
    """The teacher arrays as shared memory-mapped .partial.npy files, created by rank 0 unless an interrupted run
    left whole ones of the right shape. Blocks are allocated here: a full disk is an OSError now, not a SIGBUS later."""
    shapes = partial_shapes(N, k, temps)
    paths = {n: os.path.join(out, n + ".partial.npy") for n in shapes}
    if rank == 0:
        for n, (shape, dt) in shapes.items():
            try:  # reuse a partial file from an interrupted run only if it is whole and the right shape
                a = np.load(paths[n], mmap_mode="r")
                ok = a.shape == shape and a.dtype == dt
            except (OSError, ValueError):
                ok = False
            if not ok:
                np.lib.format.open_memmap(paths[n], mode="w+", dtype=dt, shape=shape).flush()
                for p in progress_files(out):  # a fresh array: no batch of it is done
                    os.remove(p)
            with open(paths[n], "r+b") as f, disk_full_is_oserror(paths[n]):
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(paths[n]))
    if world > 1:
        torch.distributed.barrier()  # the files exist before any rank opens them
    return {n: np.load(p, mmap_mode="r+") for n, p in paths.items()}


def run_teacher(args, folder, tokens, doc_offsets, temps, rank, world):
    """The one teacher pass: this rank's batches, written into shared memory-mapped .partial.npy files."""
    out, k = args.out, args.k
    arrays = open_partials(out, len(tokens), k, temps, rank, world)
    lengths = np.diff(doc_offsets)
    batches = plan_batches(lengths, args.batch_tokens)
    done = set()
    for p in progress_files(out):  # any rank's finished batches, any world size
        with open(p) as f:
            done |= set(json.load(f))
    mine = [b for b in range(len(batches)) if b % world == rank and b not in done]
    my_done = sorted(b for b in done if b % world == rank)
    if not args.stream_layers:
        model = Qwen3.from_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device).eval()
    total = int(sum(lengths[d] for b in mine for d in batches[b]))
    prog = Progress("cache" + (f" rank {rank}" if world > 1 else ""), total, every=args.log_every,
                    enabled=not args.stream_layers)  # the streamed pass reports per layer instead

    # SIGTERM / SIGINT: the in-memory pass stops after its current batch, with that batch saved; the streamed pass
    # saves its hidden states after every layer, so it is left to stop at once and a rerun resumes from that save
    got, restore = ([], lambda: None) if args.stream_layers else stop_requests()
    n_mine = len(mine) + len(my_done)  # this rank's batches, done or not

    def on_done(b, n):
        for arr in arrays.values():
            arr.flush()  # rows on disk before the progress file says so: a kill -9 redoes at most this batch
        my_done.append(b)
        write_json(os.path.join(out, f"progress.{rank}.json"), my_done)
        prog.update(n)
        if got:
            raise SystemExit(f"cache_teacher.py: stopped by {got[0]} after {len(my_done)}/{n_mine} "
                             f"batches{f' of rank {rank}' if world > 1 else ''}, saved in {out}: run the same command "
                             "to go on")

    work = [(b, batches[b]) for b in mine]
    if args.stream_layers:  # one decoder layer at a time (stream.py): the same bytes, a teacher of any size
        write_rows = lambda head, h, idx, docs: write_stats(head, h, idx, docs, doc_offsets, arrays, k, temps,
                                                            args.chunk)
        stream_batches(folder, work, tokens, doc_offsets, write_rows, getattr(torch, args.dtype), args.device,
                       stream_budget(args.stream_budget_gb, args.device), os.path.join(out, "stream_scratch"), rank,
                       on_done, args.log_every, args.stream_save_every)
    else:
        cache_batches(model, tokens, doc_offsets, work, arrays, k, temps, args.chunk, args.device, on_done)
    restore()


# -----------------------------------------------------------------------------
# main


def tokenize_documents(args, tok, fields, end_id, max_len):
    """All records -> (tokens, roles, doc_offsets, counts); documents longer than max_len skipped or cut."""
    toks, roles, offsets, n_long, n_rec = [], [], [0], 0, 0
    for spec in args.data:
        for path in input_files(spec):
            n_file = 0
            for where, rec in read_records(path):
                n_file += 1
                if args.max_docs and n_rec >= args.max_docs:
                    break
                text, spans = dualmind_text(*record_to_blocks(rec, where, fields))
                enc = tok.encode(text, add_special_tokens=False)
                ids = np.array(enc.ids + [end_id], dtype=np.uint32)
                r = np.append(token_roles(enc.offsets, spans), np.uint8(ROLES["response"]))
                n_rec += 1
                if len(ids) > max_len:
                    n_long += 1
                    if args.too_long == "skip":
                        continue
                    ids, r = ids[:max_len], r[:max_len]
                toks.append(ids)
                roles.append(r)
                offsets.append(offsets[-1] + len(ids))
            if n_file == 0:
                raise ValueError(f"{path}: no records (empty file)")
    if len(toks) == 0:
        why = f" ({n_long} longer than --max_len {max_len})" if n_long else ""
        raise ValueError("no documents left to cache" + why)
    return (np.concatenate(toks), np.concatenate(roles), np.array(offsets, dtype=np.int64),
            dict(records=n_rec, too_long=n_long, too_long_policy=args.too_long))


def teacher_identity(folder):
    """Fingerprint of a teacher folder without reading it all: config.json, and per safetensors file its Hub blob
    name (the sha256 of its content, in a huggingface_hub snapshot) or its header plus 16 evenly spaced 64 KiB samples
    of its data (any fine-tune changes those)."""
    h = hashlib.sha256(open(os.path.join(folder, "config.json"), "rb").read())
    for p in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        real, size = os.path.realpath(p), os.path.getsize(p)
        h.update(f"{os.path.basename(p)}:{size}".encode())
        if os.path.islink(p) and re.fullmatch(r"[0-9a-f]{64}", os.path.basename(real)):
            h.update(os.path.basename(real).encode())
            continue
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 26)))
            for i in range(16):
                f.seek(8 + n + (size - 8 - n) * i // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def parse_temperatures(spec):
    """--temperatures "1,2" -> [1.0, 2.0]; the first must be 1 (log-probs are stored at T=1)."""
    try:
        temps = [float(t) for t in spec.split(",")]
    except ValueError:
        raise ValueError(f"--temperatures {spec}: not a comma-separated list of numbers") from None
    if temps[0] != 1.0 or not all(0 < t < float("inf") for t in temps):
        raise ValueError(f"--temperatures {spec}: must start with 1 and be positive and finite")
    return temps


def check_teacher(args, folder, vocab_in_tok, tok_file):
    """The teacher's config, after its config and tensor headers are checked against the tokenizer and the flags."""
    cfg, _, _ = Qwen3.check_pretrained(folder)
    if vocab_in_tok > cfg.vocab_size:
        raise ValueError(f"{tok_file}: tokenizer ids go up to {vocab_in_tok - 1}, beyond the teacher's "
                         f"vocabulary of {cfg.vocab_size} ({folder})")
    if cfg.vocab_size > 1 << 18:
        raise ValueError(f"teacher vocabulary {cfg.vocab_size} exceeds the 18-bit id packing")
    if args.stream_layers:  # a missing tensor or too small a budget fails here, before any work
        check_budget(stream_pieces(folder, getattr(torch, args.dtype))[2],
                     stream_budget(args.stream_budget_gb, args.device))
    if args.k > cfg.vocab_size:
        raise ValueError(f"--k {args.k}: more than the teacher's vocabulary of {cfg.vocab_size}")
    if args.max_len > cfg.max_position_embeddings:
        raise ValueError(f"--max_len {args.max_len}: beyond the teacher's context of "
                         f"{cfg.max_position_embeddings} tokens")
    return cfg


def cache_inputs(args, tok_file, teacher_folder, affecting):
    """(inputs, fingerprint): the hashes of the data, tokenizer and teacher, and one hash of all that changes the
    bytes written (inputs, the flags in `affecting`, the format version)."""
    data_files = [p for spec in args.data for p in input_files(spec)]
    inputs = dict(data=[dict(path=os.path.basename(p), sha256=sha256_file(p)) for p in data_files],
                  tokenizer_sha256=sha256_file(tok_file),
                  teacher=None if teacher_folder is None else teacher_identity(teacher_folder))
    return inputs, sha256_json(dict(inputs=inputs, args=affecting, version=FORMAT_VERSION))


def write_token_files(out, tokens, roles, doc_offsets, tok_file, manifest):
    """Rank 0, before the teacher pass: the token arrays, the tokenizer files and the manifest (not complete yet)."""
    for name, arr in dict(tokens=tokens, roles=roles, doc_offsets=doc_offsets).items():
        save_npy(os.path.join(out, name + ".npy"), arr)
    for f in [tok_file, os.path.join(os.path.dirname(tok_file), "tokenizer_config.json")]:
        if os.path.isfile(f):  # tokenizer_config.json is optional
            shutil.copyfile(f, os.path.join(out, os.path.basename(f)))
    write_json(os.path.join(out, "manifest.json"), manifest)


def publish_cache(out, manifest, has_teacher):
    """Rank 0, after every rank's pass: the .partial files renamed, the bookkeeping removed, the manifest marked
    complete (last). Returns the teacher's bytes per position."""
    bytes_per_pos = 0
    for n in TEACHER_ARRAYS if has_teacher else []:
        publish(os.path.join(out, n + ".partial.npy"), os.path.join(out, n + ".npy"))
        bytes_per_pos += np.load(os.path.join(out, n + ".npy"), mmap_mode="r")[0].nbytes  # one row of each array
    for p in progress_files(out):
        os.remove(p)
    shutil.rmtree(os.path.join(out, "stream_scratch"), ignore_errors=True)
    manifest.update(complete=True, dtypes=dict(tokens="uint32", doc_offsets="int64", roles="uint8",
                                               topk_ids="uint8 (18-bit packed)", topk_logprobs="float16",
                                               lse="float32", target_logprob="float32", entropy="float32"),
                    teacher_bytes_per_position=bytes_per_pos)
    arrays = ["tokens", "roles", "doc_offsets"] + (TEACHER_ARRAYS if has_teacher else [])
    manifest["sha256"] = checksums(out, [n + ".npy" for n in arrays] + ["tokenizer.json"])  # readers verify these
    write_json(os.path.join(out, "manifest.json"), manifest)
    return bytes_per_pos


def main(args):
    if torch is None:
        raise ValueError("the teacher pass needs PyTorch: pip install -r requirements.txt")
    check_ranges(args, k="[4, inf)", max_len="[0, inf)", max_docs="[0, inf)", batch_tokens="[1, inf)",
                 chunk="[1, inf)", log_every="[0, inf]", stream_budget_gb="[0, inf)", stream_save_every="[1, inf)")
    if args.k % 4:
        raise ValueError(f"--k {args.k}: must be a positive multiple of 4 (ids are packed 4 per 9 bytes)")
    temps = parse_temperatures(args.temperatures)
    check_device(args.device)  # before any folder: cuda on a machine without it is one line, not a traceback
    rank, world, args.device = init_distributed(args.device)
    fields = dict(question=args.question_field, cot=args.cot_field, response=args.response_field,
                  explore=args.explore_field, examine=args.examine_field)

    # --- the teacher and tokenizer ------------------------------------------------------------------
    teacher_folder = None if args.teacher == "none" else resolve_folder(args.teacher)
    if args.tokenizer is None and teacher_folder is None:
        raise ValueError("--teacher none needs --tokenizer")
    tok, tok_file = load_tokenizer(args.tokenizer or teacher_folder)
    end_name, end_id = end_tokens(tok_file)[0]
    vocab_in_tok = tok.get_vocab_size(with_added_tokens=True)
    teacher_cfg = check_teacher(args, teacher_folder, vocab_in_tok, tok_file) if teacher_folder else None
    max_len = args.max_len or (teacher_cfg.max_position_embeddings if teacher_cfg else 40960)

    # --- fingerprint: everything that changes the bytes written ---------------------------------------
    affecting = dict(k=args.k, temperatures=temps, max_len=max_len, too_long=args.too_long, fields=fields,
                     max_docs=args.max_docs, dtype=args.dtype, batch_tokens=args.batch_tokens, chunk=args.chunk)
    inputs, fingerprint = cache_inputs(args, tok_file, teacher_folder, affecting)
    out = args.out
    created = args.force or not os.path.isdir(out)
    state = prepare_out(out, "cache", fingerprint, args.force, rank, world)
    if state == "done":
        if rank == 0:
            print(f"{out}: complete cache with the same inputs already there; nothing to do")
        return

    # --- tokens and roles (cheap: recomputed on resume, and must come out identical) ------------------
    try:
        tokens, roles, doc_offsets, counts = tokenize_documents(args, tok, fields, end_id, max_len)
    except ValueError:  # a bad record: leave no empty folder behind
        if rank == 0 and created and state == "fresh":
            drop_empty_folder(out)
        raise
    N, D = len(tokens), len(doc_offsets) - 1
    manifest = dict(phase="cache", version=FORMAT_VERSION, fingerprint=fingerprint, inputs=inputs,
                    args=dict(affecting, data=args.data, teacher=args.teacher),
                    teacher=None if teacher_folder is None else dict(name=args.teacher, identity=inputs["teacher"]),
                    end_token=end_name, counts=dict(counts, positions=N, documents=D),
                    teacher_vocab_size=teacher_cfg.vocab_size if teacher_cfg else None, complete=False)
    if rank == 0:
        check_space(out, N, D, args.k, temps, teacher_folder is not None)  # one line now, not a full disk later
        write_token_files(out, tokens, roles, doc_offsets, tok_file, manifest)

    # --- the teacher pass, then the cache published by rank 0 -----------------------------------------
    t0 = time.time()
    if teacher_folder is not None:
        run_teacher(args, teacher_folder, tokens, doc_offsets, temps, rank, world)
    if world > 1:
        torch.distributed.barrier()  # every rank's rows are on disk
    if rank == 0:
        bytes_per_pos = publish_cache(out, manifest, teacher_folder is not None)
        print(f"cache: {D:,} documents, {N:,} positions, {counts['too_long']} too long ({args.too_long}), "
              f"teacher {args.teacher}, {bytes_per_pos} B/position, {time.time() - t0:.1f}s -> {out}")
    if world > 1:
        close_distributed()


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="JSONL/parquet files or Hub dataset ids, in order")
    p.add_argument("--teacher", required=True, help="teacher folder or Hub id, or 'none' for tokens and roles only")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder (default: the teacher's)")
    p.add_argument("--out", default="out/cache", help="output folder")
    p.add_argument("--k", type=int, default=64, help="teacher ids and log-probs kept per position (card: top-64)")
    p.add_argument("--temperatures", default="1,2", help="temperatures of the cached logsumexp (first 1; KD uses 2)")
    p.add_argument("--max_len", type=int, default=0, help="longest document in tokens (0: the teacher's context)")
    p.add_argument("--too_long", choices=["skip", "truncate"], default="skip", help="what to do with longer documents")
    p.add_argument("--max_docs", type=int, default=0, help="use only the first N records (0: all)")
    p.add_argument("--batch_tokens", type=int, default=16384, help="tokens per teacher forward (batch x longest doc)")
    p.add_argument("--chunk", type=int, default=1024, help="positions per lm_head chunk (memory: chunk x vocab x 4 B)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="teacher weights and activations")
    p.add_argument("--device", default="cuda" if torch and torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1")
    p.add_argument("--question_field", default="question", help="record field with the question")
    p.add_argument("--cot_field", default="CoT", help="record field with the chain of thought to restructure")
    p.add_argument("--response_field", default="response", help="record field with the final answer")
    p.add_argument("--explore_field", default="explore", help="records with this field are already DualMind")
    p.add_argument("--examine_field", default="examine", help="the examine block of such records")
    p.add_argument("--stream_layers", action="store_true", help="one decoder layer at a time over all batches: a "
                   "teacher larger than the device, the same bytes out")
    p.add_argument("--stream_budget_gb", type=float, default=0.0, help="device GB (1e9 B) for the largest layer and "
                   "the hidden states (beyond it they spill to disk); 0: 75%% of free GPU memory, half the RAM on CPU")
    p.add_argument("--stream_save_every", type=int, default=1, help="save device-held hidden states every N layers "
                   "(a rerun resumes from the last save; a save writes positions x hidden x bytes)")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines")
    return p


if __name__ == "__main__":
    cli("cache_teacher.py", main, get_parser, "rerun the same command (it resumes from the batches on disk)")
