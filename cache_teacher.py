"""
Phase 1: records -> DualMind text -> tokens -> one teacher pass -> a compact top-k cache on disk.

The teacher runs once over the whole training stream; later phases read only this folder.

Inputs
  --data      JSONL or parquet files, or Hub dataset ids (org/name), in order. Records either carry
              explore/examine/response, used as they are, or question/CoT/response (the 0xZee/dataset-CoT-*
              format), restructured: CoT split into sentences, <examine> starting at the last sentence past
              the first half that opens with a verification trigger, else a 70/30 split.
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
"""

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time

import numpy as np

from common import (FORMAT_VERSION, DTYPES, ROLES, Progress, check_device, check_ranges, dualmind_text, end_tokens,
                    init_distributed, is_hub_id, load_tokenizer, pad_right, prepare_out, publish, read_jsonl,
                    read_manifest, save_npy, sha256_file, sha256_json, write_json)

try:  # the teacher pass needs torch; the cache reader (TeacherCache) does not: topology.py and windows.py run without
    import torch

    from model import Qwen3, resolve_folder
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
# DualMind: the text format and the CoT restructuring (pure functions)

TRIGGER = re.compile(
    r"^\W*(?:(?:let me|let's|let us|to|as an?|now|i(?:'ll| will)|we can|quick(?:ly)?)\s+)?(?:(?:quick|final)\s+)?"
    r"(?:(?:double[- ]?)?check(?:s|ing|ed)?|verif(?:y|ies|ying|ied|ication)|confirm(?:s|ing|ed)?|sanity"
    r"|substitut\w*\s+back|plug\w*\s+back|however|but wait|wait)\b",
    re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text):
    return [s for s in SENTENCE_END.split(text.strip()) if s]


def is_trigger(sentence):
    """Does the sentence open a verification passage (check, verify, let me double-check, however, but wait...)?"""
    return TRIGGER.match(sentence) is not None


def split_cot(cot):
    """CoT -> (explore, examine): <examine> starts at the last trigger sentence past the first half, else 70/30."""
    sents = split_sentences(cot)
    n = len(sents)
    late = [i for i in range(n) if 2 * i >= n and i > 0 and is_trigger(sents[i])]
    cut = late[-1] if late else min(max(round(0.7 * n), 1), n)
    return " ".join(sents[:cut]), " ".join(sents[cut:])


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
    On CPU the statistics after the top-k run over blocks of 32 rows that stay in cache, instead of
    several passes over the whole chunk in main memory (1.5x a bare forward becomes about 1.1x).
    """
    out = {n: [] for n in ["ids", "logprobs", "lse", "target", "entropy"]}
    W, buf = head.weight, None
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk]
        if W.dtype == torch.float32:  # reuse one logits buffer: no fresh chunk x vocab allocation per chunk
            buf = torch.empty(len(hc), W.shape[0], device=W.device) if buf is None else buf
            z = torch.matmul(hc, W.t(), out=buf[:len(hc)])  # (c, V)
        else:
            z = head(hc).float()  # (c, V) fp32 statistics whatever the teacher dtype
        top, ids = group_topk(z, k)  # (c, k) sorted descending
        block = len(z) if z.is_cuda else 32
        for b in range(0, len(z), block):
            st = row_stats(z[b:b + block], top[b:b + block], targets[s + b:s + b + block].to(z.device), temperatures)
            out["ids"].append(ids[b:b + block])
            for n, v in st.items():
                out[n].append(v)
    return {n: torch.cat(v) for n, v in out.items()}


def row_stats(z, top, targets, temperatures):
    """z (r, V) fp32 logits (overwritten) and their top-k values -> log-probs of the top-k, logsumexp at
    each T, target log-prob and entropy for these r rows."""
    m = top[:, :1]  # row max
    z.sub_(m)  # z - max <= 0, in place
    target = z.gather(1, targets[:, None])[:, 0]
    e2 = None
    if 2.0 in temperatures:  # e^((z - m) / 2) is the exp; its square e^(z - m) costs a multiply, not another exp
        e2 = z.mul(0.5).exp_()  # (r, V)
        e = e2 * e2  # (r, V) unnormalised probabilities
    else:
        e = torch.exp(z)
    s1 = e.sum(-1)
    log_s1 = s1.log()
    lse = {1.0: m[:, 0] + log_s1}
    for T in temperatures:  # logsumexp(z / T) = m / T + log sum e^(1/T)
        if T not in (1.0, 2.0):
            lse[T] = m[:, 0] / T + torch.exp(z / T).sum(-1).log()
    entropy = log_s1 - z.mul_(e).sum(-1) / s1  # H = log s - sum e (z - m) / s; z is spent now
    if e2 is not None:
        lse[2.0] = m[:, 0] / 2 + e2.sum(-1).log()
    return dict(logprobs=top - lse[1.0][:, None], lse=torch.stack([lse[T] for T in temperatures], 1),
                target=target - log_s1, entropy=entropy)


def group_topk(z, k, groups=16):
    """Exact torch.topk(z, k) (sorted descending), cheaper on CPU: split the vocabulary into V/groups strided
    groups; the top-k entries all lie in the k groups with the largest maxima, so only those are searched."""
    R, V = z.shape
    n = V // groups
    if V % groups or n < 4 * k:
        return torch.topk(z, k, dim=-1)
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
                 chunk="[1, inf)", log_every="[0, inf]")
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
        manifest.update(complete=True, dtypes=dict(tokens="uint32", doc_offsets="int64", roles="uint8",
                                                   topk_ids="uint8 (18-bit packed)", topk_logprobs="float16",
                                                   lse="float32", target_logprob="float32", entropy="float32"),
                        teacher_bytes_per_position=bytes_per_pos)
        write_json(os.path.join(out, "manifest.json"), manifest)
        print(f"cache: {D:,} documents, {N:,} positions, {counts['too_long']} too long ({args.too_long}), "
              f"teacher {args.teacher}, {bytes_per_pos} B/position, {time.time() - t0:.1f}s -> {out}")
    if distributed:
        dist.destroy_process_group()


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
    model = Qwen3.from_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device).eval()
    total = int(sum(lengths[d] for b in mine for d in batches[b]))
    prog = Progress("cache" + (f" rank {rank}" if world > 1 else ""), total, every=args.log_every)

    def on_done(b, n):
        for arr in arrays.values():
            arr.flush()  # rows on disk before the progress file says so: a kill -9 redoes at most this batch
        my_done.append(b)
        write_json(os.path.join(out, f"progress.{rank}.json"), my_done)
        prog.update(n)

    cache_batches(model, tokens, doc_offsets, [(b, batches[b]) for b in mine], arrays, k, temps, args.chunk,
                  args.device, on_done)
    del arrays


def cache_batches(model, tokens, doc_offsets, batches, arrays, k, temps, chunk, device, on_done=None):
    """The teacher pass proper: forward each batch of documents, statistics per position, rows into `arrays`."""
    lengths = np.diff(doc_offsets)
    for b, docs in batches:
        idx = torch.from_numpy(pad_right([tokens[doc_offsets[d]:doc_offsets[d + 1]] for d in docs]))  # (B, L)
        with torch.no_grad():
            h = model(idx.to(device), hidden_only=True)  # (B, L, C)
            rows = torch.cat([h[i, :lengths[d]] for i, d in enumerate(docs)])  # (R, C) real positions only
            nxt = torch.cat([torch.cat([idx[i, 1:lengths[d]], idx.new_zeros(1)]) for i, d in enumerate(docs)])
            st = topk_stats(model.lm_head, rows, nxt, k, temps, chunk)
        st = {n: v.cpu() for n, v in st.items()}
        r = 0
        for d in docs:
            a, n = int(doc_offsets[d]), int(lengths[d])
            st["target"][r + n - 1] = 0.0  # the last row of a document has no next token
            sl = slice(r, r + n)
            arrays["topk_ids"][a:a + n] = pack_ids18(st["ids"][sl].numpy())
            arrays["topk_logprobs"][a:a + n] = st["logprobs"][sl].numpy().astype(np.float16)
            arrays["lse"][a:a + n] = st["lse"][sl].numpy()
            arrays["target_logprob"][a:a + n] = st["target"][sl].numpy()
            arrays["entropy"][a:a + n] = st["entropy"][sl].numpy()
            r += n
        if on_done:
            on_done(b, r)

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
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines")
    return p


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:
        sys.exit(f"cache_teacher.py: error: {e}")
