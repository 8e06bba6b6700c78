"""
The layer-streamed teacher pass of cache_teacher.py --stream_layers: a teacher of any size, one decoder layer at a time.

Stage 0 embeds every batch, stage s = 1..L runs every batch through decoder layer s-1, and the head stage applies the
final norm and cache_teacher's write_stats: the in-memory pass's batches, padding and kernels, so the same bytes.
The device holds the largest piece of the teacher plus the hidden states (B, L, C) of every batch while both fit the
budget, else the states spill to two scratch files. They are saved after every layer (or every save_every layers
while on the device), and a kill -9 resumes from the last save (state.{rank}.json).
"""

import ctypes
import json
import math
import os
import re
import sys
import time

import torch

from common import Progress, fmt_time, pad_right, write_json
from model import Qwen3, rope_cos_sin


def batch_input(tokens, doc_offsets, docs):
    """(B, L) int64 ids of a batch of documents (longest first), right-padded with 0: the input of both passes."""
    return torch.from_numpy(pad_right([tokens[doc_offsets[d]:doc_offsets[d + 1]] for d in docs]))


def stream_pieces(folder, dtype):
    """(config, index, [(what, tensor names, bytes in dtype)]) of a checkpoint checked from its headers alone: the
    pieces in stage order, 0 the embedding, s = 1..L decoder layer s-1 (all its experts), then the head stage."""
    cfg, index, _ = Qwen3.check_pretrained(folder)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    groups = ([("embedding", ["model.embed_tokens.weight"])] +
              [(f"decoder layer model.layers.{i}", [k for k in index if k.startswith(f"model.layers.{i}.")])
               for i in range(cfg.num_hidden_layers)] +
              [("final norm and lm_head", ["model.norm.weight", head])])
    return cfg, index, [(what, names, sum(math.prod(index[k][1]) for k in names) * dtype.itemsize)
                        for what, names in groups]


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
    except OSError:  # no /proc (macOS): all the physical memory
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail // 2


def host_memory_follows_tensors():
    """Make resident memory follow the live tensors under glibc (else freed activations stay resident; BENCHMARKS.md,
    issue 21): blocks of 8 MiB or more (not less: each mapping costs page faults) get their own mapping, and the
    returned trim() hands the heap's free pages back after each stage."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD, fixed (which also stops its dynamic raise)
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return lambda: None


class ScratchStates:
    """The hidden states (B, L, C) of each batch between two stages, in two scratch files of raw bytes: `slot` holds
    the last saved stage, a save writes the other (a kill mid-save leaves the last intact). With `resident` they also
    stay on the device. Positioned I/O, not mmap: the page cache holds the files, not the process's memory."""

    def __init__(self, folder, rank, shapes, dtype, device, resident, slot):
        self.dtype, self.device, self.slot, self.written = dtype, device, slot, 0
        self.where, pos = {}, 0
        for b, shape in shapes:  # batch b at byte offset pos in either file
            self.where[b] = (pos, tuple(shape))
            pos += math.prod(shape) * dtype.itemsize
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
        buf = memoryview(x.view(-1).view(torch.uint8).numpy())  # (B * L * C * bytes,) the tensor's own memory
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
        buf = memoryview(y.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())  # (B * L * C * bytes,)
        self.written += len(buf)
        while len(buf):  # as a read, a write may take less than given
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


def resume_state(state_path, shapes, dtype):
    """The saved scratch state if it covers every batch left (same shapes and dtype), else a fresh one; written back."""
    state = dict(shapes=shapes, dtype=str(dtype), stages_done=0, slot=0)
    if os.path.isfile(state_path):
        with open(state_path) as f:
            old = json.load(f)
        kept = {b: shape for b, shape in old["shapes"]}
        if old["dtype"] == str(dtype) and all(kept.get(b) == shape for b, shape in shapes):
            state = old
    write_json(state_path, state)
    return state


def run_stage(model, s, batches, store, save, first_input, tag, what, log_every):
    """Stage s over every batch: the embedding (s = 0) of first_input(docs), or decoder layer s-1 of the states in
    `store`; the outputs go back into `store`. Returns the stage's module."""
    cfg, device = model.config, store.device  # the device the states and this stage's weights are on
    stage = model.model.embed_tokens if s == 0 else model.model.layers[s - 1]
    last = time.time()
    for j, (b, docs) in enumerate(batches):
        with torch.no_grad():
            if s == 0:
                y = stage(first_input(docs).to(device))  # (B, L, C)
            else:
                x = store.get(b)  # (B, L, C) the output of stage s - 1
                cos, sin = rope_cos_sin(torch.arange(x.shape[1], device=device), cfg.head_dim, cfg.rope_theta,
                                        x.dtype)  # positions 0..L-1, as the in-memory forward
                y = stage(x, cos, sin)
        store.put(b, y, save)
        if time.time() - last >= log_every:
            last = time.time()
            print(f"[{tag}] {what}: batch {j + 1}/{len(batches)}", file=sys.stderr, flush=True)
    return stage


def stream_batches(folder, batches, tokens, doc_offsets, write_rows, dtype, device, budget, scratch, rank=0,
                   on_done=None, log_every=10.0, save_every=1):
    """The teacher pass one stage at a time over `batches` [(b, docs)]; the head stage calls write_rows(lm_head,
    h (B, L, C) final-normed, ids (B, L), docs) -> positions written. Returns dict(read=checkpoint bytes read,
    written=scratch bytes written, resident=states kept on the device)."""
    if not batches:
        return dict(read=0, written=0, resident=True)
    cfg, index, pieces = stream_pieces(folder, dtype)
    check_budget(pieces, budget)
    L, C, tag = cfg.num_hidden_layers, cfg.hidden_size, f"stream rank {rank}" if rank else "stream"
    os.makedirs(scratch, exist_ok=True)
    state_path = os.path.join(scratch, f"state.{rank}.json")
    # one (B, L, C) block of hidden states per batch: B documents, L the length of its first (longest), C hidden
    shapes = [[b, [len(docs), int(doc_offsets[docs[0] + 1] - doc_offsets[docs[0]]), C]] for b, docs in batches]
    state = resume_state(state_path, shapes, dtype)
    start = state["stages_done"]  # stages 0..start-1 are in the scratch file `slot`
    n_pos = int(sum(doc_offsets[d + 1] - doc_offsets[d] for _, docs in batches for d in docs))
    padded = sum(math.prod(shape) for _, shape in shapes) // C  # positions with padding
    size = dtype.itemsize
    weights = max(n for _, _, n in pieces)
    resident = weights + padded * C * size <= budget  # else the states live in the scratch files only
    store = ScratchStates(scratch, rank, state["shapes"], dtype, device, resident, state["slot"])
    print(f"[{tag}] {L} layers, largest piece {weights / 1e9:.4g} GB; hidden states: {padded:,} positions "
          f"({n_pos:,} real) x {C} x {size} B = {padded * C * size / 1e9:.3f} GB, "
          f"{'kept on the device' if resident else 'spilled to ' + scratch} (budget {budget / 1e9:.3f} GB)"
          + (f"; resuming after layer {start - 1}/{L}" if start > 1 else ""), file=sys.stderr, flush=True)
    with torch.device("meta"):
        model = Qwen3(cfg).eval()  # the skeleton: each stage's weights are assigned in, then sent back to meta
    trim = host_memory_follows_tensors()  # else host memory grows by about a layer per layer (see there)
    ids = lambda docs: batch_input(tokens, doc_offsets, docs)  # (B, L) int64 token ids of a batch, right-padded
    t0, read = time.time(), 0

    # --- the embedding and decoder layers: every batch through one stage before the next stage's weights load
    for s in range(start, L + 1):
        model.load_weights(index, pieces[s][1], dtype, device)
        read += sum(index[n][2] for n in pieces[s][1])  # checkpoint bytes of this piece
        save = not resident or s % save_every == 0 or s == L  # spilled states are saved at every stage
        stage = run_stage(model, s, batches, store, save, ids, tag, pieces[s][0], log_every)
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

    # --- the head stage: final norm and lm_head statistics, rows written as the in-memory pass writes them
    model.load_weights(index, pieces[-1][1], dtype, device)  # a tied lm_head reads the embedding a second time
    read += sum(index[n][2] for n in pieces[-1][1])
    model.tie_weights()
    prog = Progress(f"{tag} head", n_pos, every=log_every)
    for b, docs in batches:
        with torch.no_grad():
            h = model.model.norm(store.get(b))  # (B, L, C) final-normed, as hidden_only=True
            n = write_rows(model.lm_head, h, ids(docs), docs)
        if on_done:
            on_done(b, n)  # the caller flushes the rows and records batch b as done
        prog.update(n)
    store.remove()
    os.remove(state_path)
    print(f"[{tag}] done: {L - max(start - 1, 0)} layers over {n_pos:,} positions in {fmt_time(time.time() - t0)}, "
          f"{read / 1e9:.3f} GB read from the checkpoint, {store.written / 1e9:.3f} GB written to scratch",
          file=sys.stderr, flush=True)
    return dict(read=read, written=store.written, resident=resident)
