"""
What every phase shares, in one small file (numpy, json and hashlib only: topology.py and windows.py run without
torch; check_device and load_tokenizer import torch and tokenizers when called). nanochat keeps the same things in
its common.py; model.py stays standalone and keeps its own few lines of checkpoint I/O, so it can be copied into
another project alone.

  atomic writes      atomic_write (a file object), write_json, publish (rename a finished file into place)
  phase folders      sha256_file / sha256_json fingerprints, read_manifest, check_upstream, prepare_out
  progress           Progress (rate and ETA lines), fmt_time
  torchrun           init_distributed, close_distributed
  names              is_hub_id (a Hub id or a mistyped local path?), DTYPES (the dtype names a flag accepts)
  user input         check_ranges (flags), check_device, read_jsonl (file:line errors), load_tokenizer
  the DualMind text  the card's layout: USER, PROMPT, TAGS, ROLES, dualmind_prompt, chat_template, dualmind_text,
                     end tokens
  batches            pad_right (documents or windows into one right-padded (B, L) array)
  pictures           svg_chart (one small inline-SVG chart), html_page (a self-contained page): train.py's
                     report.html and ablate.py's ablation.html draw with them
"""

import contextlib
import hashlib
import html
import json
import math
import os
import shutil
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
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
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
        obj = [_prepare_out(out, phase, fingerprint, force) if rank == 0 else None]
        dist.broadcast_object_list(obj, src=0)
        return obj[0]
    return _prepare_out(out, phase, fingerprint, force)


def _prepare_out(out, phase, fingerprint, force):
    path = os.path.join(out, "manifest.json")
    if os.path.isfile(path) and not force:
        with open(path) as f:
            m = json.load(f)
        if m.get("phase") != phase or m.get("fingerprint") != fingerprint:
            raise ValueError(f"{out}: holds a {m.get('phase')} folder built from other inputs or settings "
                             f"(fingerprint {str(m.get('fingerprint'))[:12]}, now {fingerprint[:12]}); "
                             "choose another --out or pass --force to rebuild it")
        return "done" if m.get("complete") else "resume"
    if os.path.isdir(out) and force:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return "fresh"


# -----------------------------------------------------------------------------
# Progress and torchrun


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


def init_distributed(device):
    """Under torchrun (RANK/WORLD_SIZE set): join the process group, one GPU per local rank.
    Returns (rank, world size, device). Without torchrun: (0, 1, device), and torch is not touched."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch
        import torch.distributed as dist
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)  # NCCL collectives (and broadcast_object_list) use the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def close_distributed():
    """Leave the process group, all processes together. Drop every DDP wrapper before calling: DDP's reducer sits
    in a reference cycle, so a group it holds outlives destroy_process_group and is torn down while the interpreter
    exits, where gloo can abort the process ('terminate called without an active exception'). Two processes of DDP
    over one Linear layer, torch 2.13 CPU: 9 of 30 runs aborted so; 2 of 30 after `del` alone; 0 of 30 after `del`
    and gc.collect(). tests/test_train.py has the same with 16 layers."""
    import gc
    import torch.distributed as dist
    dist.barrier()  # no process tears down while another may still be in a collective
    gc.collect()
    dist.destroy_process_group()


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".safetensors", ".bin", ".npy", ".gz")


def is_hub_id(spec):
    """Could `spec` be a Hub repo id (org/name)? A path that exists, starts with . or /, whose first part is a
    local folder, or that ends like a file name (dta/physics_cot.jsonl) is a (mistyped) local path, never sent to
    the Hub."""
    return (not os.path.exists(spec) and spec.count("/") == 1 and not spec.startswith((".", "/"))
            and not os.path.isdir(spec.split("/")[0]) and not spec.lower().endswith(FILE_SUFFIXES))


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
    """`device` if this machine has it, else a ValueError saying why (cuda on a machine without CUDA, cuda:3 with one
    GPU, a misspelt name), before any work or folder. Imports torch only when called."""
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


def load_tokenizer(path):
    """(tokenizers.Tokenizer, path of its tokenizer.json) from the file or a folder holding it. A ValueError names a
    missing or unreadable file (the tokenizers library's own error names neither the file nor the cause)."""
    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise ValueError(f"{path}: no tokenizer.json")
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(f), f
    except Exception as e:  # tokenizers raises a plain Exception: truncated JSON, an unknown model type, ...
        raise ValueError(f"{f}: not a readable tokenizer.json ({e}): is the file truncated?") from None


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
    """dualmind_prompt as a Hugging Face chat template (Jinja, the "chat_template" of tokenizer_config.json), so any
    chat client prompts the student the way it was trained: apply_chat_template([{"role": "user", "content": q}],
    add_generation_prompt=True, tokenize=False) == dualmind_prompt(q). An assistant turn is what the model wrote after
    that prompt, so it renders as OPEN + its content + the end token."""
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
    found = []
    for n in names:
        if n and n in ids and n not in [m for m, _ in found]:
            found.append((n, int(ids[n])))
    if not found:
        raise ValueError(f"{tokenizer_file}: no end token (neither tokenizer_config eos_token nor <|endoftext|>)")
    return found


# -----------------------------------------------------------------------------
# Batches


def pad_right(seqs, length=None):
    """Sequences of token ids -> (B, L) int64, right-padded with 0 (causal attention never reads the padding)."""
    length = length or max(len(s) for s in seqs)
    idx = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = s
    return idx


# -----------------------------------------------------------------------------
# Pictures: small inline-SVG charts on self-contained pages (no plotting library, no script, no network)


def nice_ticks(lo, hi, log=False, n=5):
    """About n round tick values in [lo, hi] and their labels: steps of 1, 2 or 5 x 10^k; on a log axis the values
    1, 2, 5 x 10^k, or linear steps when the range holds fewer than two of those."""
    if log:
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
        if len(ticks) > 2 * n:
            ticks = [t for t in ticks if round(t / 10 ** math.floor(math.log10(t))) == 1]
        if len(ticks) >= 2:
            return ticks, [fmt_num(t) for t in ticks]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks = [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    digits = max(0, -math.floor(math.log10(step) + 1e-9))  # as many decimals as the step needs, no float noise
    return ticks, [f"{t:.{digits}f}" for t in ticks]


def fmt_num(v):
    """A number for a tooltip or a caption: 4 significant digits."""
    return f"{v:.4g}"


def svg_chart(series, *, width=480, height=210, log=False, vlines=(), hlines=(), xcats=None, xlabel="",
              yrange=None):
    """One small chart as an inline <svg> string.

    series: dicts with x, y (sequences; None or NaN points are skipped), color, label, and kind: 'line', 'dots',
      'mean' (a short horizontal bar at each point) or 'range' (a vertical segment, y holding (low, high) pairs);
      tips (optional, one string per point) become the points' tooltips.
    vlines: (x, color, label, dash) vertical markers (dash: an SVG stroke-dasharray, "" for a solid line);
    hlines: (y, color, label) horizontal reference lines, dashed.
    xcats: names of the categories x = 0, 1, ... (an axis of variants instead of steps). log: log-scale y.
    yrange: (low, high) of the y axis (a rate: (0, 1)); by default the data's range."""
    left, right, top, bottom = 58, 10, 22, 34 if xcats is None else 46
    pw, ph = width - left - right, height - top - bottom
    ok = lambda v: v is not None and math.isfinite(v) and (v > 0 or not log)
    ys = [v for s in series for y in s["y"] for v in (y if s.get("kind") == "range" else [y]) if ok(v)]
    ys += [y for y, _, _ in hlines if ok(y)]
    xs = [x for s in series for x in s["x"]] + [v[0] for v in vlines]
    if xcats is not None:
        x0, x1 = -0.5, len(xcats) - 0.5
    else:
        x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
        x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = yrange or ((min(ys), max(ys)) if ys else (1.0, 2.0))
    if log:
        y0, y1 = math.log10(y0), math.log10(y1)
    pad = (y1 - y0) * 0.06 or (abs(y0) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    X = lambda x: left + (x - x0) / (x1 - x0) * pw
    Y = lambda y: top + (1 - ((math.log10(y) if log else y) - y0) / (y1 - y0)) * ph
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfbfb" stroke="#bbb"/>']
    # the y grid and its labels
    for t, name in zip(*nice_ticks(10 ** y0 if log else y0, 10 ** y1 if log else y1, log)):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 4}" y="{Y(t) + 4:.1f}" text-anchor="end" fill="#555">{name}</text>')
    # the x axis: category names, or round steps
    if xcats is not None:
        for i, name in enumerate(xcats):  # a long name on two lines (split at its last space), so names never overlap
            lines = name.rsplit(" ", 1) if len(name) > 8 and " " in name else [name]
            out.append(f'<text x="{X(i):.1f}" y="{top + ph + 14}" text-anchor="middle" fill="#333">' + "".join(
                f'<tspan x="{X(i):.1f}" dy="{13 * (j > 0)}">{html.escape(t)}</tspan>' for j, t in enumerate(lines))
                + "</text>")
    else:
        for t, name in zip(*nice_ticks(x0, x1, n=6)):
            if t != int(t) and all(float(x).is_integer() for x in xs):
                continue  # steps are whole numbers
            out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>'
                       f'<text x="{X(t):.1f}" y="{top + ph + 15}" text-anchor="middle" fill="#555">{name}</text>')
    if xlabel:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#333">'
                   f'{html.escape(xlabel)}</text>')
    for x, color, label, dash in vlines:  # markers first, so the data is drawn over them
        out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{top}" y2="{top + ph}" stroke="{color}" '
                   f'stroke-width="1.5" stroke-dasharray="{dash}"><title>{html.escape(label)}</title></line>')
    for y, color, label in hlines:
        if ok(y):
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="{color}" '
                       f'stroke-dasharray="6 3"><title>{html.escape(label)}</title></line>')
    for s in series:
        kind, color = s.get("kind", "line"), s["color"]
        tips = s.get("tips") or [None] * len(s["x"])
        tip = lambda t: f"<title>{html.escape(t)}</title>" if t else ""
        if kind == "line":
            pts = [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(s["x"], s["y"]) if ok(y)]
            out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.4"/>')
        for x, y, t in zip(s["x"], s["y"], tips):
            if kind == "dots" and ok(y):
                out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.2" fill="{color}" fill-opacity="0.8">'
                           f'{tip(t)}</circle>')
            elif kind == "mean" and ok(y):
                half = 0.28 * pw / max(len(xcats or ()), 1)
                out.append(f'<line x1="{X(x) - half:.1f}" x2="{X(x) + half:.1f}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" '
                           f'stroke="{color}" stroke-width="2.5">{tip(t)}</line>')
            elif kind == "range" and ok(y[0]) and ok(y[1]):
                if yrange:  # within the axis: a rate's mean - std may lie below 0
                    y = [min(max(v, yrange[0]), yrange[1]) for v in y]
                out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{Y(y[0]):.1f}" y2="{Y(y[1]):.1f}" '
                           f'stroke="{color}" stroke-width="1.2">{tip(t)}</line>')
    # the legend, top right, one entry per labelled series
    labelled = [s for s in series if s.get("label")]
    for i, s in enumerate(labelled):
        x = left + pw - 8 - 110 * (len(labelled) - 1 - i)
        out.append(f'<rect x="{x - 100}" y="{top - 15}" width="9" height="9" fill="{s["color"]}"/>'
                   f'<text x="{x - 88}" y="{top - 7}" fill="#333">{html.escape(s["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def html_page(title, body):
    """A self-contained page around `body` (HTML): one style block, no script, nothing fetched."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#1a202c}}
h1{{font-size:22px;margin-bottom:.2em}} h2{{font-size:17px;margin:1.2em 0 .4em}} .note{{color:#555}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th:first-child,td:first-child,.facts td{{text-align:left}} .grid{{display:flex;flex-wrap:wrap;gap:10px 18px}}
figure{{margin:0}} figcaption{{font-weight:600;margin:.3em 0 .1em}} .sig{{font-weight:700;color:#b7202e}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
