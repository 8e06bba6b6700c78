"""
Phase 1: records -> DualMind text -> tokens -> one teacher pass -> a compact top-k cache on disk.

The teacher runs once over the whole training stream; later phases read only this folder.

Inputs
  --data      JSONL or parquet files, or Hub dataset ids (org/name), in order. Records either carry
              explore/examine/response, used as they are, or question/CoT/response (the 0xZee/dataset-CoT-*
              format), restructured: CoT cut into segments at sentence ends and line breaks, <examine> starting
              at the last segment past the first half (in characters) that opens with a verification trigger,
              else at the segment boundary nearest 70%; explore and examine are two slices of the CoT, byte for byte.
  --teacher   a model folder or Hub id (model.py loads it), or `none` for tokens and roles only
  --tokenizer tokenizer.json or a folder holding it (default: the teacher's)

Outputs, in --out (default out/cache), one row per stream position, documents concatenated in order:
  tokens.npy          uint32  [N]          token ids
  doc_offsets.npy     int64   [D+1]        document d is rows doc_offsets[d]:doc_offsets[d+1]
  roles.npy           uint8   [N]          0 prompt, 1 explore, 2 examine, 3 response (tags with their block)
  topk_ids.npy        uint8   [N, 18k/8]   the k ids, 18-bit packed (4 ids in 9 bytes); unpack_ids18 reads them
  topk_logprobs.npy   float16 [N, k]       teacher log-probs at T=1 of those ids, sorted descending
                                           (logit = logprob + lse[:, 0]; stored centred so fp16 keeps 1e-4 nats)
  lse.npy             float32 [N, nT]      logsumexp(z / T) over the full vocabulary, for each T in temperatures
  target_logprob.npy  float32 [N]          teacher log-prob of the real next token (0 on a document's last row)
  entropy.npy         float32 [N]          teacher entropy at T=1, full vocabulary, nats
  tokenizer.json (+ tokenizer_config.json), manifest.json ("complete": true written last)
Row t is the teacher's distribution for token t+1. At k=64 the teacher record takes 288 bytes per position.

Run
  python cache_teacher.py --data data/physics_cot.jsonl --teacher out/teacher --out out/cache        # demo
  python cache_teacher.py --data 0xZee/dataset-CoT-Differential-Equations-636 \\
      0xZee/dataset-CoT-Theoretical-Mechanics-307 0xZee/dataset-CoT-Electromagnetism-580 \\
      0xZee/dataset-CoT-General-Relativity-76 --teacher Qwen/Qwen3-30B-A3B-Thinking-2507 \\
      --device cuda --dtype bfloat16 --out out/cache                                            # real, one GPU
  torchrun --nproc_per_node=8 cache_teacher.py ... --device cuda                                 # documents split by rank
Killed at any point, the same command resumes; a complete cache is left alone.

A teacher larger than the device: --stream_layers
  python cache_teacher.py ... --teacher Qwen/Qwen3-30B-A3B-Thinking-2507 --device cuda --dtype bfloat16 \\
      --stream_layers --stream_budget_gb 18 --out out/cache                                      # a 24 GB GPU
  Every batch goes through the embedding, then every batch through decoder layer 1, then layer 2, ..., then the
  final norm and the lm_head statistics. Each weight is read once from disk for the whole dataset (a tied embedding
  twice). The kernels, batches, padding and positions are those of the in-memory pass, and so are the files written:
  byte for byte in fp32 on CPU, where the tests check it. On a GPU no forward kernel sums atomically, so the same is
  expected in bf16; test_streamed_equals_in_memory_on_gpu checks it where a GPU is present.
  Device memory: the largest piece of the teacher (one decoder layer with all its experts: 1.25 GB for the card's
  teacher in bf16) plus the hidden states of all positions (padded positions x hidden x bytes: about 14 GB for the
  card's data) while both fit --stream_budget_gb (default 75% of the free GPU memory, half the available RAM on
  CPU); a batch's activations and the lm_head chunk come on top. Beyond the budget the hidden states spill to
  --out/stream_scratch and are read back for each layer. Disk: two scratch files of the hidden states' size, saved
  (fsync'd) after every layer, or every --stream_save_every layers while the states stay on the device; a kill -9
  resumes from the last save, and the scratch folder is removed when the cache is complete. torchrun: each process
  streams its own batches with its own scratch files.
"""

import argparse
import ctypes
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np

from common import (FORMAT_VERSION, DTYPES, ROLES, Progress, check_device, check_ranges, close_distributed,
                    dualmind_text, end_tokens, fmt_time, init_distributed, is_hub_id, load_tokenizer, pad_right,
                    prepare_out, publish, read_jsonl, read_manifest, save_npy, sha256_file, sha256_json, write_json)

try:  # the teacher pass needs torch; the cache reader (TeacherCache) does not: topology.py and windows.py run without
    import torch

    from model import Qwen3, resolve_folder, rope_cos_sin
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    torch = None

TEACHER_ARRAYS = ["topk_ids", "topk_logprobs", "lse", "target_logprob", "entropy"]

# -----------------------------------------------------------------------------
# Records: JSONL, parquet, Hub datasets


def input_files(spec):
    """A local file, or the JSONL/parquet files of a Hub dataset repo (org/name), as local paths."""
    if os.path.isfile(spec):
        return [spec]
    if not is_hub_id(spec):
        raise ValueError(f"{spec}: no such file, and not a Hub dataset id of the form org/name")
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(spec, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"])
    except Exception as e:  # offline with no cached copy, unknown repo, no network, ...
        why = " ".join(str(e).split())  # one line
        raise ValueError(f"{spec}: no such file, and no Hub dataset of that name on the Hub or in its local cache "
                         f"({type(e).__name__}: {why})") from None
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True) +
                   glob.glob(os.path.join(folder, "**", "*.jsonl"), recursive=True))
    if not files:
        raise ValueError(f"{spec}: the dataset has no .parquet or .jsonl files")
    return files


def read_records(path):
    """Yield (where, record) with where = 'file:line' (JSONL) or 'file:row N' (parquet)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", rec
        return
    if not path.endswith((".jsonl", ".json")):
        raise ValueError(f"{path}: unsupported file type (use .jsonl or .parquet)")
    for i, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: a record must be a JSON object, got {type(rec).__name__}")
        yield f"{path}:{i}", rec


# -----------------------------------------------------------------------------
# DualMind: the CoT restructuring (pure functions; the layout itself is common.dualmind_text)
#
# The CoT is cut into segments at sentence ends and at line breaks, never inside math, after an abbreviation or
# inside a number. explore and examine are two slices of the CoT string: its text, newlines and LaTeX survive byte
# for byte, and only the whitespace at the one split point goes (the block layout replaces it).

# Math that no segment boundary falls inside: display $$...$$ and \[...\] (across lines too), inline \(...\) and $...$
MATH = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\\$])\$[^$\n]+?(?<!\\)\$", re.DOTALL)
CLOSERS = "[\"'\u2019\u201d)\\]*_]*"  # closing quotes, brackets and markdown emphasis after a sentence's last mark
# a sentence ends at . ! ? (and its closers) before whitespace; an ellipsis does not end one ("Hmm... let me")
SENTENCE_END = re.compile(r"(?:(?<!\.)\.(?!\.)|[!?])" + CLOSERS + r"(?=\s)")
# ... nor does the period of an abbreviation, or of a list number opening a line ("2. Substitute ...")
ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|et al|cf|vs|etc|approx|eqs?|figs?|refs?|secs?|ch|resp)\." + CLOSERS + "$",
                          re.IGNORECASE)
LIST_NUMBER = re.compile(r"[ \t]*(?:[-*+][ \t]+)?\(?\d{1,3}\." + CLOSERS)
# A segment that opens a verification passage: after markdown (a header, bold, a list marker) and up to two short
# interjections ("Hmm,", "Okay, so", "Now,", "But"), an optional lead-in ("let me", "to", "as a quick") and then
# check / verify / confirm / sanity / substitute back / plug back / however / wait, or a "**Verification**" header.
TRIGGER = re.compile(
    r"^[\s#>*_+-]*(?:\d{1,3}[.)]\s+)?[*_]*"
    r"(?:(?:hmm+|okay|ok|now|but|so|wait|well|alright|actually|finally|then|and|also|right|yes)\b[^\w\s]*\s*){0,2}"
    r"(?:(?:let me|let['\u2019]s|let us|to|as an?|i(?:['\u2019]ll| will| can| should)|we(?:['\u2019]ll| will| can| should))"
    r"\s+)?"
    r"(?:(?:one more|another|a|just|also|quick(?:ly)?|final|last|further|sanity)\s+){0,2}"
    r"(?:(?:double|re|cross)[- ]?check(?:s|ing|ed)?|check(?:s|ing|ed)?|verif(?:y|ies|ying|ied|ication)"
    r"|confirm(?:s|ing|ed|ation)?|sanity|(?<=me |.s |to )make sure|substitut\w*\s+back|plug\w*\s+back"
    r"|however|wait)\b",
    re.IGNORECASE)


def segments(text):
    """(start, end) character spans of the segments of `text`, in order: cut at sentence ends and at line breaks,
    never inside math, after an abbreviation or inside a number; each span without its surrounding whitespace."""
    math = [m.span() for m in MATH.finditer(text)]
    inside = lambda p: any(a < p < b for a, b in math)  # a few dozen math spans per CoT: a scan is fine
    line = lambda e: text[text.rfind("\n", 0, e) + 1:e]  # the line up to position e
    cuts = [m.end() for m in SENTENCE_END.finditer(text)
            if not ABBREVIATION.search(line(m.end())[-16:]) and not LIST_NUMBER.fullmatch(line(m.end()))]
    cuts += [m.start() for m in re.finditer("\n", text)]
    bounds = [0] + sorted(p for p in set(cuts) if not inside(p)) + [len(text)]
    spans = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        piece = text[a:b]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((a + lead, a + len(piece.rstrip())))
    return spans


def is_trigger(segment):
    """Does the segment open a verification passage ("Let me double-check", "Hmm, let me verify", "**Check:**")?"""
    return TRIGGER.match(segment) is not None


def examine_segment(text, spans):
    """Index of the segment where <examine> starts, and how it was found: ("trigger", i) for the last trigger
    segment starting past the first half of the text (in characters: the share of the reasoning, whatever its
    line layout), else ("fallback", i) for the segment boundary nearest 70% of the characters. With two or more
    segments examine is never empty; with one it is."""
    n = len(spans)
    late = [i for i, (a, b) in enumerate(spans) if i > 0 and 2 * a >= len(text) and is_trigger(text[a:b])]
    if late:
        return "trigger", late[-1]
    if n < 2:
        return "fallback", n
    return "fallback", min(range(1, n), key=lambda i: abs(spans[i][0] - 0.7 * len(text)))


def split_cot(cot):
    """CoT -> (explore, examine), two slices of cot.strip(): <examine> starts at the last trigger segment past the
    first half, else at the 70/30 boundary; only the whitespace between the two slices is dropped."""
    text = cot.strip()
    spans = segments(text)
    _, i = examine_segment(text, spans)
    if i >= len(spans):
        return text, ""
    return text[:spans[i - 1][1]], text[spans[i][0]:]


def token_roles(offsets, spans):
    """Role of each token = the role of the character it starts at (tokenizer offsets, no re-tokenising)."""
    starts = np.array([s for s, _, _ in spans])
    roles = np.array([r for _, _, r in spans], dtype=np.uint8)
    first = np.array([o[0] for o in offsets], dtype=np.int64)
    return roles[np.searchsorted(starts, first, side="right") - 1]


def record_to_blocks(rec, where, fields):
    """A record -> (question, explore, examine, response), with a clear error for a missing or empty field."""
    def get(name):
        if name not in rec:
            raise ValueError(f"{where}: record has no field {name!r} (fields: {sorted(rec)})")
        v = rec[name]
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: field {name!r} is empty or not text")
        return v.strip()
    q, resp = get(fields["question"]), get(fields["response"])
    if fields["explore"] in rec:
        examine = rec.get(fields["examine"]) or ""
        if not isinstance(examine, str):
            raise ValueError(f"{where}: field {fields['examine']!r} is not text")
        return q, get(fields["explore"]), examine.strip(), resp
    return (q, *split_cot(get(fields["cot"])), resp)


# -----------------------------------------------------------------------------
# Teacher statistics (pure), id packing


def topk_stats(head, h, targets, k, temperatures, chunk):
    """Per position: top-k ids and log-probs, logsumexp at each T, target log-prob, entropy (all fp32 math).

    head: the lm_head Linear; h (R, C) final hidden states; targets (R,) next-token ids (any id on rows
    without one). Logits are formed `chunk` rows at a time, so memory is chunk x vocab, never R x vocab.
    Each chunk's matmul runs over whole 32-row tiles (the last one padded with zero rows): BLAS computes a
    last partial group of rows with other code and other rounding, so without the padding a row's logits
    would depend on --chunk and on where the row falls in its chunk; with it, any --chunk writes the same bytes.
    On CPU the statistics after the top-k run over blocks of 32 rows that stay in cache, instead of
    several passes over the whole chunk in main memory (1.5x a bare forward becomes about 1.1x).
    """
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


EXP_FLOOR = -87.0  # exp inputs are clamped here: exp(-87) = 1.6e-38 is still a normal fp32 (smallest 1.2e-38).
# On a CPU, exp of an input below -87 takes 10-30x longer (measured on this project's machine: 15 ms instead of
# 0.45 ms per million), and the rows of a trained model, minus their max, are full of them. The change is at most
# 1.6e-38 per entry, invisible in any sum that holds the row max's exp(0) = 1.


def row_stats(z, top, targets, temperatures):
    """z (r, V) fp32 logits (overwritten) and their top-k values -> log-probs of the top-k, logsumexp at
    each T, target log-prob and entropy for these r rows."""
    m = top[:, :1]  # row max
    z.sub_(m)  # z - max <= 0, in place
    target = z.gather(1, targets[:, None])[:, 0]
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
    """Exact torch.topk(z, k) (sorted descending), cheaper on CPU: split the vocabulary into V/groups strided
    groups; the top-k entries all lie in the k groups with the largest maxima, so only those are searched.
    groups is 16 (Qwen3's 151,936: 9,496 groups), else 8 or 4, whichever divides V and leaves at least 4k groups
    (the demo's 2,112 at k = 64: 8, which takes 6 ms per 1,024 rows instead of torch.topk's 10)."""
    R, V = z.shape
    groups = next((g for g in (16, 8, 4) if V % g == 0 and V // g >= 4 * k), None)
    if groups is None:
        return torch.topk(z, k, dim=-1)
    n = V // groups
    zg = z.view(R, groups, n)  # group j = ids {j, j + n, j + 2n, ...}
    _, gi = torch.topk(zg.amax(1), k, dim=-1, sorted=False)  # (R, k) the groups holding the top-k
    cand = zg.gather(2, gi[:, None, :].expand(R, groups, k)).reshape(R, groups * k)
    top, ci = torch.topk(cand, k, dim=-1)  # sorted descending
    return top, (ci // k) * n + gi.gather(1, ci % k)


def pack_ids18(ids):
    """(N, k) ints < 2^18 -> (N, 9k/4) uint8: 4 ids in 9 little-endian bytes. k must be a multiple of 4."""
    N, k = ids.shape
    a = ids.astype(np.uint64).reshape(N, k // 4, 4)
    low = a[..., 0] | (a[..., 1] << 18) | (a[..., 2] << 36) | (a[..., 3] << 54)  # 64 bits
    out = np.empty((N, k // 4, 9), dtype=np.uint8)
    out[..., :8] = low.astype("<u8").view(np.uint8).reshape(N, k // 4, 8)
    out[..., 8] = (a[..., 3] >> 10).astype(np.uint8)  # id 3's top 8 bits
    return out.reshape(N, k // 4 * 9)


def unpack_ids18(packed):
    """Inverse of pack_ids18: (N, 9k/4) uint8 -> (N, k) int64."""
    N = packed.shape[0]
    b = np.ascontiguousarray(packed).reshape(N, -1, 9)
    low = b[..., :8].copy().view("<u8")[..., 0]
    m = np.uint64((1 << 18) - 1)
    ids = np.stack([low & m, (low >> np.uint64(18)) & m, (low >> np.uint64(36)) & m,
                    (low >> np.uint64(54)) | (b[..., 8].astype(np.uint64) << np.uint64(10))], -1)
    return ids.reshape(N, -1).astype(np.int64)


# -----------------------------------------------------------------------------
# The reader later phases use


class TeacherCache:
    """Memory-mapped view of a complete cache folder. rows(a, b) returns a dict of numpy arrays for rows [a, b)."""

    def __init__(self, folder):
        self.folder = folder
        self.manifest = read_manifest(folder, "cache")
        self.fingerprint = self.manifest["fingerprint"]
        self.has_teacher = self.manifest["teacher"] is not None
        self.k = self.manifest["args"]["k"]
        self.temperatures = self.manifest["args"]["temperatures"]
        load = lambda n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r")
        self.tokens, self.doc_offsets, self.roles = load("tokens"), load("doc_offsets"), load("roles")
        self.arrays = {n: load(n) for n in TEACHER_ARRAYS} if self.has_teacher else {}
        self.n_docs = len(self.doc_offsets) - 1
        self.tokenizer_path = os.path.join(folder, "tokenizer.json")

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
    """The teacher's log q_T of its k cached ids, from the cache alone (numpy arrays or torch tensors alike).

    topk_logprobs (..., k) log-probs at T=1; lse (..., nT) the cached logsumexp(z / T) for each cached T; t_index
    the column of T. Since logprob_i = z_i - L_1:  log q_T(i) = z_i / T - L_T = (logprob_i + L_1) / T - L_T.
    """
    return (topk_logprobs + lse[..., :1]) / T - lse[..., t_index:t_index + 1]


def tail_mass(topk_logprobs, lse, t_index, T):
    """1 - sum of the top-k probabilities at temperature T (..., ): the mass the cache keeps as one tail bucket."""
    return 1.0 - np.exp(teacher_log_q(topk_logprobs, lse, t_index, T)).sum(-1)


def write_cache(out, tokens, roles, doc_offsets, teacher=None, k=64, temperatures=(1.0, 2.0), tokenizer=None,
                source="arrays"):
    """Write a complete cache folder from in-memory arrays: for a cache computed by another engine, and for
    the synthetic streams of the tests and bench.py. teacher: None, or a dict with every TEACHER_ARRAYS entry
    (topk_ids as (N, k) ints, packed here); tokenizer: a tokenizer.json to copy alongside."""
    os.makedirs(out, exist_ok=True)
    arrays = dict(tokens=np.asarray(tokens, np.uint32), roles=np.asarray(roles, np.uint8),
                  doc_offsets=np.asarray(doc_offsets, np.int64))
    if teacher is not None:
        arrays.update(topk_ids=pack_ids18(np.asarray(teacher["topk_ids"])),
                      topk_logprobs=np.asarray(teacher["topk_logprobs"], np.float16),
                      lse=np.asarray(teacher["lse"], np.float32).reshape(len(tokens), -1),
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
        raise ValueError("no documents left to cache" + (f" ({n_long} longer than --max_len {max_len})" if n_long else ""))
    return (np.concatenate(toks), np.concatenate(roles), np.array(offsets, dtype=np.int64),
            dict(records=n_rec, too_long=n_long, too_long_policy=args.too_long))


def plan_batches(lengths, batch_tokens):
    """Documents grouped by length (longest first) so that batch size x longest length <= batch_tokens.

    The plan depends only on the lengths, so any number of ranks, and any resume, computes the same batches.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, cur = [], []
    for d in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(int(d))
    batches.append(cur)
    return batches


def teacher_identity(folder):
    """Fingerprint of a teacher folder without reading 61 GB: config.json, and per safetensors file either its
    Hub blob name (the sha256 of its content, when the folder is a huggingface_hub snapshot) or its header
    plus 16 evenly spaced 64 KiB samples of its data (any fine-tune changes those)."""
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


def main(args):
    if torch is None:
        raise ValueError("the teacher pass needs PyTorch: pip install -r requirements.txt")
    check_ranges(args, k="[4, inf)", max_len="[0, inf)", max_docs="[0, inf)", batch_tokens="[1, inf)",
                 chunk="[1, inf)", log_every="[0, inf]", stream_budget_gb="[0, inf)", stream_save_every="[1, inf)")
    if args.k % 4:
        raise ValueError(f"--k {args.k}: must be a positive multiple of 4 (ids are packed 4 per 9 bytes)")
    try:
        temps = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        raise ValueError(f"--temperatures {args.temperatures}: not a comma-separated list of numbers") from None
    if temps[0] != 1.0 or not all(0 < t < float("inf") for t in temps):
        raise ValueError(f"--temperatures {args.temperatures}: must start with 1 and be positive and finite")
    check_device(args.device)  # before any folder: cuda on a machine without it is one line, not a traceback
    rank, world, args.device = init_distributed(args.device)
    distributed = world > 1
    if distributed:
        import torch.distributed as dist
    fields = dict(question=args.question_field, cot=args.cot_field, response=args.response_field,
                  explore=args.explore_field, examine=args.examine_field)

    # --- the teacher and tokenizer ------------------------------------------------------------------
    teacher_folder = None if args.teacher == "none" else resolve_folder(args.teacher)
    if args.tokenizer is None and teacher_folder is None:
        raise ValueError("--teacher none needs --tokenizer")
    tok, tok_file = load_tokenizer(args.tokenizer or teacher_folder)
    end_name, end_id = end_tokens(tok_file)[0]
    vocab_in_tok = tok.get_vocab_size(with_added_tokens=True)
    teacher_cfg = None
    if teacher_folder:  # the teacher is checked whole before any work: a truncated or mismatched one fails here
        teacher_cfg, _, _ = Qwen3.check_pretrained(teacher_folder)  # config.json and every tensor's header
        if vocab_in_tok > teacher_cfg.vocab_size:
            raise ValueError(f"{tok_file}: tokenizer ids go up to {vocab_in_tok - 1}, beyond the teacher's "
                             f"vocabulary of {teacher_cfg.vocab_size} ({teacher_folder})")
        if teacher_cfg.vocab_size > 1 << 18:
            raise ValueError(f"teacher vocabulary {teacher_cfg.vocab_size} exceeds the 18-bit id packing")
        if args.stream_layers:  # a missing tensor or too small a budget fails here, before any work
            check_budget(stream_pieces(teacher_folder, getattr(torch, args.dtype))[2],
                         stream_budget(args.stream_budget_gb, args.device))
        if args.k > teacher_cfg.vocab_size:
            raise ValueError(f"--k {args.k}: more than the teacher's vocabulary of {teacher_cfg.vocab_size}")
        if args.max_len > teacher_cfg.max_position_embeddings:
            raise ValueError(f"--max_len {args.max_len}: beyond the teacher's context of "
                             f"{teacher_cfg.max_position_embeddings} tokens")
    max_len = args.max_len or (teacher_cfg.max_position_embeddings if teacher_cfg else 40960)

    # --- fingerprint: everything that changes the bytes written ---------------------------------------
    data_files = [p for spec in args.data for p in input_files(spec)]
    inputs = dict(data=[dict(path=os.path.basename(p), sha256=sha256_file(p)) for p in data_files],
                  tokenizer_sha256=sha256_file(tok_file),
                  teacher=None if teacher_folder is None else teacher_identity(teacher_folder))
    affecting = dict(k=args.k, temperatures=temps, max_len=max_len, too_long=args.too_long, fields=fields,
                     max_docs=args.max_docs, dtype=args.dtype, batch_tokens=args.batch_tokens, chunk=args.chunk)
    fingerprint = sha256_json(dict(inputs=inputs, args=affecting, version=FORMAT_VERSION))
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
        if rank == 0 and created and state == "fresh" and not os.listdir(out):
            os.rmdir(out)
        raise
    N, D = len(tokens), len(doc_offsets) - 1
    manifest = dict(phase="cache", version=FORMAT_VERSION, fingerprint=fingerprint, inputs=inputs,
                    args=dict(affecting, data=args.data, teacher=args.teacher),
                    teacher=None if teacher_folder is None else dict(name=args.teacher, identity=inputs["teacher"]),
                    end_token=end_name, counts=dict(counts, positions=N, documents=D),
                    teacher_vocab_size=teacher_cfg.vocab_size if teacher_cfg else None, complete=False)
    if rank == 0:
        for name, arr in dict(tokens=tokens, roles=roles, doc_offsets=doc_offsets).items():
            save_npy(os.path.join(out, name + ".npy"), arr)
        for f in [tok_file, os.path.join(os.path.dirname(tok_file), "tokenizer_config.json")]:
            if os.path.isfile(f):
                shutil.copyfile(f, os.path.join(out, os.path.basename(f)))
        write_json(os.path.join(out, "manifest.json"), manifest)
    t0 = time.time()
    if teacher_folder is not None:
        run_teacher(args, teacher_folder, tokens, doc_offsets, temps, rank, world)
    if distributed:
        dist.barrier()
    if rank == 0:
        bytes_per_pos = 0
        for n in TEACHER_ARRAYS if teacher_folder else []:
            publish(os.path.join(out, n + ".partial.npy"), os.path.join(out, n + ".npy"))
            bytes_per_pos += np.load(os.path.join(out, n + ".npy"), mmap_mode="r")[0].nbytes
        for p in glob.glob(os.path.join(out, "progress.*.json")):
            os.remove(p)
        shutil.rmtree(os.path.join(out, "stream_scratch"), ignore_errors=True)
        manifest.update(complete=True, dtypes=dict(tokens="uint32", doc_offsets="int64", roles="uint8",
                                                   topk_ids="uint8 (18-bit packed)", topk_logprobs="float16",
                                                   lse="float32", target_logprob="float32", entropy="float32"),
                        teacher_bytes_per_position=bytes_per_pos)
        write_json(os.path.join(out, "manifest.json"), manifest)
        print(f"cache: {D:,} documents, {N:,} positions, {counts['too_long']} too long ({args.too_long}), "
              f"teacher {args.teacher}, {bytes_per_pos} B/position, {time.time() - t0:.1f}s -> {out}")
    if distributed:
        close_distributed()


def run_teacher(args, folder, tokens, doc_offsets, temps, rank, world):
    """The one teacher pass: this rank's batches, written into shared memory-mapped .partial.npy files."""
    out, N, k = args.out, len(tokens), args.k
    shapes = dict(topk_ids=((N, k // 4 * 9), np.uint8), topk_logprobs=((N, k), np.float16),
                  lse=((N, len(temps)), np.float32), target_logprob=((N,), np.float32), entropy=((N,), np.float32))
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
                for p in glob.glob(os.path.join(out, "progress.*.json")):
                    os.remove(p)
    if world > 1:
        torch.distributed.barrier()
    arrays = {n: np.load(p, mmap_mode="r+") for n, p in paths.items()}
    lengths = np.diff(doc_offsets)
    batches = plan_batches(lengths, args.batch_tokens)
    done = set()
    for p in glob.glob(os.path.join(out, "progress.*.json")):  # any rank's finished batches, any world size
        with open(p) as f:
            done |= set(json.load(f))
    mine = [b for b in range(len(batches)) if b % world == rank and b not in done]
    my_done = sorted(b for b in done if b % world == rank)
    if not args.stream_layers:
        model = Qwen3.from_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device).eval()
    total = int(sum(lengths[d] for b in mine for d in batches[b]))
    prog = Progress("cache" + (f" rank {rank}" if world > 1 else ""), total, every=args.log_every,
                    enabled=not args.stream_layers)  # the streamed pass reports per layer instead

    def on_done(b, n):
        for arr in arrays.values():
            arr.flush()  # rows on disk before the progress file says so: a kill -9 redoes at most this batch
        my_done.append(b)
        write_json(os.path.join(out, f"progress.{rank}.json"), my_done)
        prog.update(n)

    work = [(b, batches[b]) for b in mine]
    if args.stream_layers:  # one decoder layer at a time: the same bytes, a teacher of any size
        stream_batches(folder, work, tokens, doc_offsets, arrays, k, temps, args.chunk,
                       getattr(torch, args.dtype), args.device, stream_budget(args.stream_budget_gb, args.device),
                       os.path.join(out, "stream_scratch"), rank, on_done, args.log_every, args.stream_save_every)
    else:
        cache_batches(model, tokens, doc_offsets, work, arrays, k, temps, args.chunk, args.device, on_done)
    del arrays


def cache_batches(model, tokens, doc_offsets, batches, arrays, k, temps, chunk, device, on_done=None):
    """The teacher pass proper: forward each batch of documents, statistics per position, rows into `arrays`."""
    for b, docs in batches:
        idx = batch_input(tokens, doc_offsets, docs)  # (B, L)
        with torch.no_grad():
            h = model(idx.to(device), hidden_only=True)  # (B, L, C)
            n = write_stats(model.lm_head, h, idx, docs, doc_offsets, arrays, k, temps, chunk)
        if on_done:
            on_done(b, n)


def batch_input(tokens, doc_offsets, docs):
    """(B, L) int64 ids of a batch of documents (longest first), right-padded with 0."""
    return torch.from_numpy(pad_right([tokens[doc_offsets[d]:doc_offsets[d + 1]] for d in docs]))


def write_stats(head, h, idx, docs, doc_offsets, arrays, k, temps, chunk):
    """h (B, L, C) final-normed hidden states of a batch -> the statistics of its real positions, written into
    `arrays` at their stream rows. Returns the number of positions."""
    lengths = [int(doc_offsets[d + 1] - doc_offsets[d]) for d in docs]
    rows = torch.cat([h[i, :n] for i, n in enumerate(lengths)])  # (R, C) real positions only
    nxt = torch.cat([torch.cat([idx[i, 1:n], idx.new_zeros(1)]) for i, n in enumerate(lengths)])
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


# -----------------------------------------------------------------------------
# The streamed pass: a teacher of any size, one decoder layer at a time
#
# Stage 0 embeds every batch of this rank, stage s = 1..L runs every batch through decoder layer s-1, and the head
# stage applies the final norm and the lm_head statistics (write_stats, as in the in-memory pass). Each weight is
# read once for the whole dataset. Between stages the hidden states (B, L, C) of each batch, padding included (every
# matmul keeps the in-memory pass's shapes, so fp32 CPU rows come out bit for bit the same), stay on the device when
# they fit the budget, and are always written to one of two scratch files (by stage parity); state.{rank}.json then
# names the last complete stage, so a kill -9 loses at most the stage in flight.


def stream_pieces(folder, dtype):
    """Check a checkpoint from its safetensors headers alone (a ValueError names any missing tensor before any work)
    and list what the streamed pass holds at once: (config, index, [(what, tensor names, bytes in dtype)]) for the
    embedding, each decoder layer (for MoE all its experts) and the final norm with the lm_head."""
    cfg, index, _ = Qwen3.check_pretrained(folder)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    groups = ([("embedding", ["model.embed_tokens.weight"])] +
              [(f"decoder layer model.layers.{i}", [k for k in index if k.startswith(f"model.layers.{i}.")])
               for i in range(cfg.num_hidden_layers)] +
              [("final norm and lm_head", ["model.norm.weight", head])])
    size = torch.empty((), dtype=dtype).element_size()
    return cfg, index, [(what, names, sum(math.prod(index[k][1]) for k in names) * size) for what, names in groups]


def check_budget(pieces, budget):
    """The largest piece of the teacher must fit the budget on its own; a ValueError names both sizes."""
    what, _, n = max(pieces, key=lambda p: p[2])
    if n > budget:
        raise ValueError(f"--stream_budget_gb {budget / 1e9:g}: smaller than the teacher's {what} "
                         f"({n / 1e9:.4g} GB), which must be on the device at once")


def stream_budget(gb, device):
    """Bytes the streamed pass plans to hold on the device: --stream_budget_gb, or when 0, 75% of the free memory
    (CUDA) or half of the available memory (CPU)."""
    if gb > 0:
        return int(gb * 1e9)
    if str(device).startswith("cuda"):
        return int(0.75 * torch.cuda.mem_get_info(torch.device(device))[0])  # the rest: a batch's activations
    try:
        with open("/proc/meminfo") as f:
            avail = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except OSError:
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail // 2


def host_memory_follows_tensors():
    """Make the process's resident memory follow its live tensors: glibc malloc (where this Python runs on it) gives
    each block of 8 MiB or more its own mapping, returned to the system when freed, and the free pages it keeps in
    its heap are returned after each stage (the returned trim function, called by the streamed pass).

    Why: by default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after
    the first layer the activations and hidden states under 32 MiB come from the heap instead; freed there between
    long-lived tensors (the kept hidden states), their pages stay resident. Measured on a 1 GB fp32 16-layer teacher:
    the streamed process grew by about a layer per layer, to 1.4x the checkpoint, while its live tensors never
    exceeded one layer, the hidden states and a batch's activations. 8 MiB, not less: every fresh mapping costs page
    faults, and a 1 MiB threshold made the streamed pass 1.3x slower on a CPU (bench.py's model); 8 MiB did not."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD, fixed (which also stops its dynamic raise)
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return lambda: None


class ScratchStates:
    """The hidden states (B, L, C) of each batch between two stages, in two scratch files of raw `dtype` bytes: `slot`
    holds the last saved stage's outputs, and a save writes the other file, so a kill mid-save leaves the last one
    intact. With `resident`, the states also stay on the device and reads come from there. Positioned I/O, not
    mmap: the page cache holds the files, not the process's memory."""

    def __init__(self, folder, rank, shapes, dtype, device, resident, slot):
        self.dtype, self.device, self.slot, self.written = dtype, device, slot, 0
        size = torch.empty((), dtype=dtype).element_size()
        self.where, pos = {}, 0
        for b, shape in shapes:  # batch b at byte offset pos in either file
            self.where[b] = (pos, tuple(shape))
            pos += math.prod(shape) * size
        self.paths = [os.path.join(folder, f"hidden.{rank}.{i}.bin") for i in (0, 1)]
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in self.paths]
        for fd in self.fds:
            os.ftruncate(fd, pos)
        self.on_device = {} if resident else None

    def get(self, b):
        if self.on_device is not None and b in self.on_device:
            return self.on_device.pop(b)  # the caller's output takes its place: one copy on the device
        offset, shape = self.where[b]
        x = torch.empty(shape, dtype=self.dtype)
        buf = memoryview(x.view(-1).view(torch.uint8).numpy())
        while len(buf):  # a read may return less than asked
            n = os.preadv(self.fds[self.slot], [buf], offset)
            assert n > 0, f"{self.paths[self.slot]}: ends before batch {b}"
            buf, offset = buf[n:], offset + n
        return x.to(self.device)

    def put(self, b, y, save):
        if self.on_device is not None:
            self.on_device[b] = y
        if not save:
            return
        offset, shape = self.where[b]
        assert tuple(y.shape) == shape, (b, tuple(y.shape), shape)
        buf = memoryview(y.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
        self.written += len(buf)
        while len(buf):
            n = os.pwrite(self.fds[1 - self.slot], buf, offset)
            buf, offset = buf[n:], offset + n

    def commit(self):
        """The save is whole: on disk (before the state file says so), and the file reads come from."""
        os.fsync(self.fds[1 - self.slot])
        self.slot = 1 - self.slot

    def remove(self):
        for fd, p in zip(self.fds, self.paths):
            os.close(fd)
            os.remove(p)


def stream_batches(folder, batches, tokens, doc_offsets, arrays, k, temps, chunk, dtype, device, budget,
                   scratch, rank=0, on_done=None, log_every=10.0, save_every=1):
    """The teacher pass one stage at a time over `batches` [(b, docs)]: the same rows into `arrays` as cache_batches,
    with at most one decoder layer of weights on the device. The hidden states are saved to scratch after every
    layer (every `save_every` layers while they stay on the device), and a rerun resumes from the last save.
    Returns dict(read=checkpoint bytes read, written=scratch bytes written, resident=states kept on the device)."""
    if not batches:
        return dict(read=0, written=0, resident=True)
    cfg, index, pieces = stream_pieces(folder, dtype)
    check_budget(pieces, budget)
    L, C, tag = cfg.num_hidden_layers, cfg.hidden_size, f"stream rank {rank}" if rank else "stream"
    os.makedirs(scratch, exist_ok=True)
    state_path = os.path.join(scratch, f"state.{rank}.json")
    shapes = [[b, [len(docs), int(doc_offsets[docs[0] + 1] - doc_offsets[docs[0]]), C]] for b, docs in batches]
    state = dict(shapes=shapes, dtype=str(dtype), stages_done=0, slot=0)
    if os.path.isfile(state_path):  # resume if the kept states cover every batch left to do
        with open(state_path) as f:
            old = json.load(f)
        kept = {b: shape for b, shape in old["shapes"]}
        if old["dtype"] == str(dtype) and all(kept.get(b) == shape for b, shape in shapes):
            state = old
    start = state["stages_done"]
    write_json(state_path, state)
    n_pos = int(sum(doc_offsets[d + 1] - doc_offsets[d] for _, docs in batches for d in docs))
    padded = sum(math.prod(shape) for _, shape in shapes) // C  # positions with padding
    size = torch.empty((), dtype=dtype).element_size()
    weights = max(n for _, _, n in pieces)
    resident = weights + padded * C * size <= budget
    store = ScratchStates(scratch, rank, state["shapes"], dtype, device, resident, state["slot"])
    print(f"[{tag}] {L} layers, largest piece {weights / 1e9:.4g} GB; hidden states: {padded:,} positions "
          f"({n_pos:,} real) x {C} x {size} B = {padded * C * size / 1e9:.3f} GB, "
          f"{'kept on the device' if resident else 'spilled to ' + scratch} (budget {budget / 1e9:.3f} GB)"
          + (f"; resuming after layer {start - 1}/{L}" if start > 1 else ""), file=sys.stderr, flush=True)
    with torch.device("meta"):
        model = Qwen3(cfg).eval()  # the skeleton: each stage's weights are assigned in, then sent back to meta
    trim = host_memory_follows_tensors()  # else host memory grows by about a layer per layer (see there)
    t0, read = time.time(), 0

    def load(names):
        nonlocal read
        model.load_weights(index, names, dtype, device)
        read += sum(index[n][2] for n in names)

    for s in range(start, L + 1):
        load(pieces[s][1])
        stage = model.model.embed_tokens if s == 0 else model.model.layers[s - 1]
        last = time.time()
        save = not resident or s % save_every == 0 or s == L  # spilled states are saved at every stage
        for j, (b, docs) in enumerate(batches):
            with torch.no_grad():
                if s == 0:
                    y = stage(batch_input(tokens, doc_offsets, docs).to(device))  # (B, L, C)
                else:
                    x = store.get(b)  # (B, L, C) the output of stage s - 1
                    cos, sin = rope_cos_sin(torch.arange(x.shape[1], device=device), cfg.head_dim, cfg.rope_theta,
                                            x.dtype)  # positions 0..L-1, as the in-memory forward
                    y = stage(x, cos, sin)
            store.put(b, y, save)
            if time.time() - last >= log_every:
                last = time.time()
                print(f"[{tag}] {pieces[s][0]}: batch {j + 1}/{len(batches)}", file=sys.stderr, flush=True)
        x = y = None
        if save:
            store.commit()
            write_json(state_path, dict(state, stages_done=s + 1, slot=store.slot))  # stages 0..s are on disk
        stage.to("meta")  # frees its weights before the next stage's are read
        trim()  # and the host memory the stage's activations used goes back to the system
        if s > 0:
            dt = time.time() - t0
            rate = (s - max(start, 1) + 1) * n_pos / dt  # positions x layers per second
            print(f"[{tag}] layer {s}/{L} | {rate:,.0f} tok/s (positions x layers) | "
                  f"ETA {fmt_time((L - s) * n_pos / rate)} | {read / 1e9:.3f} GB read", file=sys.stderr, flush=True)

    load(pieces[-1][1])  # a tied lm_head reads the embedding a second time: memory stays one piece at a time
    model.tie_weights()
    prog = Progress(f"{tag} head", n_pos, every=log_every)
    for b, docs in batches:
        with torch.no_grad():
            h = model.model.norm(store.get(b))  # (B, L, C) final-normed, as hidden_only=True
            n = write_stats(model.lm_head, h, batch_input(tokens, doc_offsets, docs), docs, doc_offsets, arrays, k,
                            temps, chunk)
        if on_done:
            on_done(b, n)
        prog.update(n)
    store.remove()
    os.remove(state_path)
    print(f"[{tag}] done: {L - max(start - 1, 0)} layers over {n_pos:,} positions in {fmt_time(time.time() - t0)}, "
          f"{read / 1e9:.3f} GB read from the checkpoint, {store.written / 1e9:.3f} GB written to scratch",
          file=sys.stderr, flush=True)
    return dict(read=read, written=store.written, resident=resident)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="JSONL/parquet files or Hub dataset ids, in order")
    p.add_argument("--teacher", required=True, help="teacher folder or Hub id, or 'none' for tokens and roles only")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder (default: the teacher's)")
    p.add_argument("--out", default="out/cache", help="output folder")
    p.add_argument("--k", type=int, default=64, help="teacher ids and log-probs kept per position (card: top-64)")
    p.add_argument("--temperatures", default="1,2", help="temperatures whose full-vocabulary logsumexp is cached "
                   "(first must be 1; KD runs at T=2)")
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
    p.add_argument("--stream_layers", action="store_true", help="load one decoder layer at a time (every batch "
                   "through layer 1, then layer 2, ...): a teacher larger than the device, the same bytes out")
    p.add_argument("--stream_budget_gb", type=float, default=0.0, help="with --stream_layers: device memory (GB, "
                   "1e9 B) for the largest layer plus the hidden states, which spill to disk beyond it; 0: 75%% of "
                   "the free GPU memory, half of the available RAM on CPU")
    p.add_argument("--stream_save_every", type=int, default=1, help="with --stream_layers and the hidden states on "
                   "the device: save them to disk every N layers (a rerun resumes from the last save; each save "
                   "writes positions x hidden x bytes)")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines")
    return p


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:
        sys.exit(f"cache_teacher.py: error: {e}")
