"""
What every phase shares (numpy, json and hashlib only, so topology.py and windows.py run without torch; functions
that need torch or tokenizers import them when called). model.py keeps its own checkpoint I/O, to stay standalone.

  files        atomic_write, write_json, publish; fingerprints, manifests, phase folders (prepare_out)
  runs         Progress, peak_flops (the MFU denominator), init_distributed / close_distributed, cli, stop_requests
  user input   check_ranges (flags), check_device, read_jsonl / read_records (file:line errors), load_tokenizer
  DualMind     the card's layout (PROMPT, ROLES, dualmind_prompt, chat_template, dualmind_text, end_tokens) and the
               restructuring of a chain of thought into it (split_cot, record_to_blocks)
The HTML pages and their charts live in pages.py.
"""

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time

import numpy as np

FORMAT_VERSION = 1  # of every phase folder; a reader refuses another version
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names accepted by --dtype flags (getattr(torch, name))

# -----------------------------------------------------------------------------
# Atomic writes: a killed run never leaves a file that looks finished


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open `path.tmp` for writing; on a clean exit, flush it to disk and rename it to `path`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a kill: no .tmp left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_npy(path, array):
    """np.save, atomically (np.save on a name would add .npy to a temporary name)."""
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def publish(src, dst):
    """Rename a finished file or folder into its final name (atomic on one filesystem)."""
    os.replace(src, dst)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_free_space(folder, need, what):
    """An OSError(ENOSPC) before any work when `folder`'s disk has less than `need` bytes free for `what`."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{what} needs {need / 1e9:.3g} GB, {free / 1e9:.3g} GB free there", folder)


@contextlib.contextmanager
def disk_full_is_oserror(path):
    """A write into `path` that fails on a full disk comes out as OSError(ENOSPC) naming `path`, whatever raised it
    (safetensors has its own error; torch.save and np.save report a short write with no errno)."""
    try:
        yield
    except Exception as e:
        code = getattr(e, "errno", None)
        short = code is None and any(s in str(e) for s in ("unexpected pos", "requested and"))  # a short write
        if not (code in DISK_FULL or "os error 28" in str(e) or short):
            raise
        why = e.strerror if code in DISK_FULL else os.strerror(errno.ENOSPC)  # check_free_space's says how much
        raise OSError(errno.ENOSPC, why, getattr(e, "filename", None) or path) from None


# -----------------------------------------------------------------------------
# Fingerprints, manifests and phase folders


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def checksums(folder, names):
    """{file name: sha256} of files a phase wrote, for its manifest's "sha256" entry (readers verify them)."""
    return {n: sha256_file(os.path.join(folder, n)) for n in names}


def verify_folder(folder):
    """verify_checksums for a model folder: train.py's student has a manifest; a Hugging Face folder has none."""
    path = os.path.join(folder, "manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            verify_checksums(folder, json.load(f))


def verify_checksums(folder, manifest):
    """Hash again every file the manifest's "sha256" entry lists: a ValueError names the first one missing or changed
    since its phase wrote it (a bad disk, a bad copy, an edit). A folder written before checksums passes as it is."""
    for name, digest in (manifest.get("sha256") or {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (listed in {folder}/manifest.json); rebuild the folder")
        if sha256_file(path) != digest:
            raise ValueError(f"{path}: checksum mismatch, the file changed after it was written; rebuild it, or pass "
                             "--no_verify to read it anyway")


def check_rows(path, bad, values, what, first=0):
    """A ValueError naming the file, the first row where `bad` (one flag per row) holds, and its value(s)."""
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        v = values[i] if np.ndim(values[i]) == 0 else "[" + ", ".join(f"{x:.4g}" for x in values[i][:4]) + ", ...]"
        raise ValueError(f"{path}: row {first + i}: {v} {what}")


def read_manifest(folder, phase, needed_by=""):
    """The manifest of a complete phase folder, or a ValueError saying what to run."""
    path = os.path.join(folder, "manifest.json")
    hint = f" (needed by {needed_by})" if needed_by else ""
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no manifest.json{hint}: run the {phase} phase into it first")
    with open(path) as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if m.get("phase") != phase:
        raise ValueError(f"{path}: is a {m.get('phase')!r} folder, expected {phase!r}{hint}")
    if m.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {m.get('version')}, this code reads {FORMAT_VERSION}")
    if not m.get("complete"):
        raise ValueError(f"{path}: incomplete (the run was interrupted): run the {phase} phase again to finish it")
    return m


def check_upstream(manifest, upstream_folder, upstream_phase, path):
    """Refuse a folder built from another version of its upstream (the upstream was rebuilt since)."""
    want = manifest.get("upstream", {}).get(upstream_phase)
    have = read_manifest(upstream_folder, upstream_phase)["fingerprint"]
    if want != have:
        raise ValueError(f"{path}: was built from a different {upstream_phase} folder than {upstream_folder} "
                         f"(fingerprint {str(want)[:12]} vs {have[:12]}): rebuild it")


def prepare_out(out, phase, fingerprint, force=False, rank=0, world=1):
    """Create or reuse a phase folder. Returns 'done' (complete, same inputs), 'resume' or 'fresh'.
    Under torchrun, rank 0 decides and every rank gets its answer."""
    if world > 1:
        import torch.distributed as dist
        obj = [prepare_out(out, phase, fingerprint, force) if rank == 0 else None]
        dist.broadcast_object_list(obj, src=0)
        return obj[0]
    lock_folder(out)  # before the manifest is read: two runs never both decide to write here
    path = os.path.join(out, "manifest.json")
    if os.path.isfile(path) and not force:
        with open(path) as f:
            m = json.load(f)
        if m.get("phase") != phase or m.get("fingerprint") != fingerprint:
            raise ValueError(f"{out}: holds a {m.get('phase')} folder built from other inputs or settings "
                             f"(fingerprint {str(m.get('fingerprint'))[:12]}, now {fingerprint[:12]}); "
                             "choose another --out or pass --force to rebuild it")
        return "done" if m.get("complete") else "resume"
    if force:  # everything but the lock this process holds
        for name in set(os.listdir(out)) - {".lock"}:
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
    return "fresh"


HELD_LOCKS = {}  # folder -> its open, locked .lock file: held until this process exits


def lock_folder(out):
    """One writer per output folder: an exclusive flock on out/.lock, held until the process exits (the kernel drops
    it then, also after kill -9). A second process gets a ValueError naming the folder and the holder's pid."""
    import fcntl
    key = os.path.abspath(out)
    if key in HELD_LOCKS:  # this process holds it already (main() run twice in one process, as the tests do)
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{out}: another process (pid {pid}) is writing this folder; wait for it to end or choose "
                         "another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    HELD_LOCKS[key] = f


def drop_empty_folder(out):
    """Undo prepare_out for a run that failed before writing anything: release the lock, remove a folder that holds
    only the lock file."""
    held = HELD_LOCKS.pop(os.path.abspath(out), None)
    if held:
        held.close()
    if os.path.isdir(out) and set(os.listdir(out)) <= {".lock"}:
        shutil.rmtree(out)


# -----------------------------------------------------------------------------
# Progress, torchrun and the MFU denominator


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Prints `name done/total unit | rate/s | ETA` at most every `every` seconds, and a summary at the end."""

    def __init__(self, name, total, unit="tok", every=10.0, enabled=True):
        self.name, self.total, self.unit, self.every, self.enabled = name, total, unit, every, enabled
        self.t0 = self.last = time.time()
        self.done = 0

    def update(self, n, extra=""):
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[{self.name}] {self.done:,}/{self.total:,} {self.unit} | {rate:,.0f} {self.unit}/s | "
                  f"ETA {fmt_time(eta)}{extra}", file=sys.stderr, flush=True)


# dense bf16 peak of known GPUs, FLOP/s (vendor datasheets, without sparsity). The first key found in the device's
# name wins, so a name that contains another (H100 PCIe, H100) comes first
PEAK_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
              "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A6000": 155e12, "4090": 165e12, "3090": 71e12,
              "A10": 125e12, "L4": 121e12, "V100": 125e12}


def measure_matmul_flops(device, dtype, n=2048, reps=3):
    """This device's matmul speed in FLOP/s: the best of `reps` (n x n) @ (n x n) products in `dtype`."""
    import torch
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device, dtype, flag=0.0):
    """The MFU denominator and where it comes from: --peak_flops when given; on a GPU the datasheet's dense bf16
    figure of a known model (PEAK_FLOPS); otherwise (CPU, or an unknown GPU) a large matmul measured here and now."""
    if flag > 0:
        return flag, "--peak_flops"
    if device.type == "cuda":
        import torch
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_FLOPS.items():
            if key in name:
                return v, f"{name} datasheet, dense bf16"
    return measure_matmul_flops(device, dtype), f"measured: a 2048^3 {str(dtype).removeprefix('torch.')} matmul"


def init_distributed(device, always=False):
    """Under torchrun (or with `always`: FSDP needs the group) join the process group, one GPU per local rank.
    Returns (rank, world size, device); without torchrun (0, 1, device), and torch is not touched."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 or always:
        import torch
        import torch.distributed as dist
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)  # NCCL collectives (and broadcast_object_list) use the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def close_distributed():
    """Leave the process group, all processes together. Drop every DDP wrapper first: its reducer sits in a reference
    cycle, and a group torn down at interpreter exit can abort gloo ('terminate called without an active exception');
    gc.collect() breaks the cycle."""
    import gc
    import torch.distributed as dist
    dist.barrier()  # no process tears down while another may still be in a collective
    gc.collect()
    dist.destroy_process_group()


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".safetensors", ".bin", ".npy", ".gz")


def is_hub_id(spec):
    """Could `spec` be a Hub repo id (org/name)? A path that exists, starts with . or /, begins with a local folder
    or ends like a file name (dta/physics_cot.jsonl) is a (mistyped) local path, never sent to the Hub."""
    return (not os.path.exists(spec) and spec.count("/") == 1 and not spec.startswith((".", "/"))
            and not os.path.isdir(spec.split("/")[0]) and not spec.lower().endswith(FILE_SUFFIXES))


# -----------------------------------------------------------------------------
# A script's entry point and its stops: bad input, a full disk and SIGTERM end with one line and a non-zero exit


def cli(script, main, get_parser, rerun):
    """Run main(args) as `python script`: a ValueError (bad input) or a full disk is one line `script: error: ...`
    and exit status 1; `rerun` says how to go on once there is space."""
    try:
        main(get_parser().parse_args())
    except ValueError as e:
        sys.exit(f"{script}: error: {e}")
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        sys.exit(f"{script}: error: the disk is full ({e.strerror}: {e.filename}); nothing half-written is kept: "
                 f"free some space and {rerun}")


def stop_requests():
    """SIGTERM / SIGINT noted, not obeyed at once (the caller saves its step and exits); a second one stops at once.
    Returns (the signals' names as they arrive, a function that puts the previous handlers back)."""
    got, before = [], {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def note(signum, frame):
        got.append(signal.Signals(signum).name)
        if len(got) > 1:  # a second signal stops at once, as it would have without this handler (Ctrl-C twice)
            signal.signal(signum, before[signum])
            os.kill(os.getpid(), signum)

    for s in before:
        signal.signal(s, note)
    return got, lambda: [signal.signal(s, h) for s, h in before.items()]


# -----------------------------------------------------------------------------
# User input: flag ranges, the device, JSONL files, tokenizer files (one clear line each, no traceback)


def check_ranges(args, **intervals):
    """A ValueError naming the first flag outside its interval, written as in maths:
    check_ranges(args, k="[4, inf)", lr="(0, 1]"). nan is outside every interval; inf is inside only `, inf]`."""
    for name, interval in intervals.items():
        v = getattr(args, name)
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        ok = (v > lo if interval[0] == "(" else v >= lo) and (v < hi if interval[-1] == ")" else v <= hi)
        if not ok:  # nan fails both comparisons
            low = interval[1:].split(",")[0]
            want = f"{'>' if interval[0] == '(' else '>='} {low}" if interval.endswith("inf)") else f"in {interval}"
            raise ValueError(f"--{name} {v}: must be {want}")


def check_device(device):
    """`device` if this machine has it, else a ValueError saying why (no CUDA, cuda:3 with one GPU, a misspelt
    name). Imports torch only when called."""
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: not supported here (cpu, cuda, cuda:1, mps)")
    return device


def read_jsonl(path):
    """Yield (line number, value) for each non-blank line of a JSONL file. A ValueError names the file, the line and
    where in it for a line that is not UTF-8 or not JSON (a missing closing brace: at the end of the line)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8").rstrip("\r\n")  # a BOM may open the file
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                 "the line): convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                where = "at the end of the line" if e.pos >= len(line.rstrip()) else f"at column {e.pos + 1}"
                raise ValueError(f"{path}:{i}: invalid JSON ({e.msg} {where})") from None
            yield i, value


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


def load_tokenizer(path):
    """(tokenizers.Tokenizer, path of its tokenizer.json) from the file or its folder; a ValueError names a missing
    or unreadable file (the library's own error names neither)."""
    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise ValueError(f"{path}: no tokenizer.json")
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(f), f
    except Exception as e:  # tokenizers raises a plain Exception: truncated JSON, an unknown model type, ...
        raise ValueError(f"{f}: not a readable tokenizer.json ({e}): is the file truncated?") from None


def doc_line(f):
    """The first line of f's docstring, without its full stop ('' without one): a table entry's --help text."""
    return (f.__doc__ or "").strip().split("\n")[0].rstrip(".")


# -----------------------------------------------------------------------------
# The DualMind format of the model card (one definition: the cache, the tokenizer, generate and the chat template)

USER = "##USER:\n"  # opens the user turn
PROMPT = USER + "{question}\n\n"  # the user turn; the model's answer opens with <explore>
BLOCKS = ("explore", "examine", "response")  # in the card's order
TAGS = [t for b in BLOCKS for t in (f"<{b}>", f"</{b}>")]
ROLES = {"prompt": 0, "explore": 1, "examine": 2, "response": 3}  # roles.npy codes
REASONING = (ROLES["explore"], ROLES["examine"])  # the rows the proof weight multiplies
OPEN = f"<{BLOCKS[0]}>\n"  # how the model's answer opens: the end of every prompt


def dualmind_prompt(question):
    """What the model sees before it answers: the user turn, then the opening <explore> tag."""
    return PROMPT.format(question=question) + OPEN


def chat_template():
    """dualmind_prompt as a Hugging Face chat template (Jinja), so any chat client prompts the student as it was
    trained: apply_chat_template([user q], add_generation_prompt=True, tokenize=False) == dualmind_prompt(q).
    An assistant turn renders as OPEN + its content + the end token."""
    head, tail = PROMPT.split("{question}")
    lit = json.dumps  # a Jinja string literal takes the same escapes as JSON ("\n")
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{ " + lit(head) + " + message['content'] + " + lit(tail) + " }}"
            "{%- elif message['role'] == 'assistant' -%}{{ " + lit(OPEN) + " + message['content'] + eos_token }}"
            "{%- else -%}{{ raise_exception('the DualMind format has user and assistant turns only, not ' + "
            "message['role']) }}{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + lit(OPEN) + " }}{%- endif -%}")


def dualmind_text(question, explore, examine, response):
    """The card's layout and the character span (start, end, role code) of each role; tags and the separators
    after them belong to the block they open or close."""
    parts = [("prompt", PROMPT.format(question=question))]
    parts += [(b, f"<{b}>\n{body}\n</{b}>" + ("\n\n" if b != BLOCKS[-1] else ""))
              for b, body in zip(BLOCKS, (explore, examine, response))]
    text, spans = "", []
    for role, s in parts:
        spans.append((len(text), len(text) + len(s), ROLES[role]))
        text += s
    return text, spans


def end_tokens(tokenizer_file):
    """[(name, id)] of the end tokens: tokenizer_config.json's eos_token first, then <|endoftext|>, each if the
    tokenizer has it. Read from the JSON files alone (no tokenizer library needed)."""
    with open(tokenizer_file, encoding="utf-8") as f:
        try:
            tok = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{tokenizer_file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                             "is the file truncated?") from None
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    ids.update((tok.get("model") or {}).get("vocab") or {})
    names = []
    cfg = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        names.append(eos.get("content") if isinstance(eos, dict) else eos)
    names.append("<|endoftext|>")
    found = [(n, int(ids[n])) for n in dict.fromkeys(names) if n and n in ids]  # in order, each name once
    if not found:
        raise ValueError(f"{tokenizer_file}: no end token (neither tokenizer_config eos_token nor <|endoftext|>)")
    return found


# -----------------------------------------------------------------------------
# DualMind: the CoT restructuring of Phase 1 (pure functions; the layout itself is dualmind_text above)

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
    r"(?:(?:let me|let['\u2019]s|let us|to|as an?|i(?:['\u2019]ll| will| can| should)"
    r"|we(?:['\u2019]ll| will| can| should))\s+)?"
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
    """Where <examine> starts: ("trigger", i) for the last trigger segment past the first half of the characters,
    else ("fallback", i) for the segment boundary nearest 70% of them (examine is empty only with one segment)."""
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
# Batches


def pad_right(seqs, length=None):
    """Sequences of token ids -> (B, L) int64, right-padded with 0 (causal attention never reads the padding)."""
    length = length or max(len(s) for s in seqs)
    idx = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = s
    return idx
