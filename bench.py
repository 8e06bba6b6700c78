"""
Side-by-side speed and memory of the kit against the reference implementation, printed as ratios.

    python bench.py                     # every section (11-13 minutes on a 2-core CPU, 4.5 of them the demo)
    python bench.py --only model        # one section: model
    python bench.py --device cuda       # the same on a GPU

Sections and what each compares (higher ratio = better for us; memory ratios are ours / theirs, lower = better; the
demo's share rows are fractions of its time):
  hardware  this machine's bounds, measured in the same run: the matmul peak in fp32 and bf16 (2048^3), memory
          bandwidth as a 512 MiB copy and as a 256 MiB fp32 matrix-vector product. The MFU rows divide model FLOPs
          (model.Qwen3Config.flops_per_token: 6 N + 12 L T H D per token in training, a third of it in a forward)
          by the peak of the dtype; the decode rows divide the weight bytes read per token by the time per token.
  model   model.py vs transformers' Qwen3 on one random config (8 layers, hidden 512, 8 query / 4 KV heads,
          head_dim 64, vocab 32,000, batch 2 x 512), fp32 and bf16: forward tok/s, forward+backward tok/s,
          peak memory. Each measurement runs in a fresh subprocess so peak RSS is its own.
  cache   the teacher pass of cache_teacher.py (top-64, logsumexp at T=1,2, target log-prob, entropy, written to
          memory-mapped files) vs a bare forward producing full logits, same model (the model config above)
          and the same batches of the bundled records; and the bytes the teacher record takes per position.
  stream  the streamed teacher pass (cache_teacher.py --stream_layers, one decoder layer at a time) against the
          in-memory pass, each whole (weights read from the checkpoint in the page cache, statistics written), on the
          model config above and the bundled records (target <= 1.3x on CPU); and the peak RSS of the command line a
          user runs (cache_teacher.py --stream_layers, ru_maxrss of that process) on a 1 GB fp32 checkpoint (16
          layers, hidden 1024) over the first 8 records, its rise over the same command with --teacher none, with the
          default budget (states kept in memory) and 0.065 GB (spilled), against the checkpoint's size (target <= 0.35x)
  topology  positions per second of the whole topology.py pass (report and picture included) on a synthetic
          2,000,000-position cache with Qwen3-sized ids, for the default signal and for --signal tv (k = 64),
          against the targets (5,000,000/s and 500,000/s): here the reference column is the target.
  train   one optimizer step of train.py (micro-batch 2 x 512, the full loss: CE + T^2 KL over top-64 + tail,
          proof weights, AdamW, clip), FP32 master weights with BF16 autocast, against the same step written
          with transformers' Qwen3 and a straightforward full-vocabulary loss, with Qwen3's real vocabulary
          (151,936) on the model config above: tokens/s, and peak memory of the step (fresh subprocesses).
  generate  decode tokens/s at batch 1 (32-token prompt, 128 new tokens, greedy, prefill included) of generate.py
          against transformers' generate on the model config above; both must produce the same tokens. Then
          per token against its bound, a bare chain of matrix-vector products over the model's own weight
          matrices (fp32 and bf16), and as GB/s of weights read against the measured matvec bandwidth.
  demo    `bash demo.sh` from an empty folder (--work/bench_demo, deleted first), as a new user runs it, without
          the demo's scaling variables (N_SYNTH, TEACHER_STEPS, ...) of this shell: its wall time against the target
          of 240 s, the time of its four long steps and their share of the whole, and its outcome against the
          targets: held-out KL after distillation <= 0.06, top-1 agreement >= 0.75, the layout in 4 of 4 answers.
          About 4.5 minutes on 2 cores, so it runs last (--only demo alone, or every section but it with
          --only hardware,model,cache,stream,topology,train,generate).

The real shapes (--real): one prepared check of the card's run on one device, random weights made on the device
(nothing downloaded), one table and the same figures in --work/real.json; 2.6 minutes on one H200, its rows run one
per process (measured).

    python bench.py --real --device cuda                         # every row below, at the card's shapes
    python bench.py --real --device cuda --only teacher,parity   # some rows
    python bench.py --real --device cpu                          # the student row at Qwen3-0.6B shapes (~14 GB)
    torchrun --nproc_per_node=8 bench.py --real --device cuda    # DDP and FSDP steps vs one process (NCCL): the
                                                                 # same losses; FSDP's tok/s, MFU, peak GB per GPU
    python bench.py --tiny                                       # the same code at test size on CPU (the tests)

  student  one optimizer step of train.py, Qwen3-1.7B shapes (GPU; 0.6B on CPU): micro-batch 2 x 512 x 16 accumulated
           (1 on CPU), BF16 autocast, FP32 master weights + AdamW, eager and --compile: tok/s, MFU (Qwen3Config.
           flops_per_token over common.peak_flops: the datasheet's dense bf16 peak of a known GPU, 989 TFLOP/s for an
           H100, else a bf16 matmul measured here) and peak memory beside 16 B per parameter; the largest micro-batch
           that fits, without and with --grad_ckpt (doubling until out of memory; GPU only).   Target: MFU >= 40%
           with --compile.
  teacher  Qwen3-30B-A3B shapes with 4 of its 48 layers, the real embedding and untied head: cache_teacher's whole
           pass (statistics included) over 8 documents of 2,048 tokens in one forward, in memory with the experts
           grouped and in a loop, and streamed layer by layer from a checkpoint (--stream_layers): positions/s and
           the MoE blocks' share of the time, each also extrapolated to 48 layers (labelled).
           Target: >= 20,000 positions/s for the whole model on one H100.
  decode   batch 1, 32-token prompt + 128 greedy tokens, bf16, Qwen3-1.7B shapes: generate.py eager and --compile
           against transformers' generate on the same weights and prompt.   Target: >= 3x with --compile.
  parity   model.py vs transformers in bf16 on the device: logits of 512 tokens, max abs and relative difference,
           for the 1.7B shapes and for the teacher's layers (grouped experts).

Needs the test requirements (transformers is the reference): pip install -r requirements-dev.txt
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# hardware: this machine's own bounds, measured in the same run (the denominators of MFU and of the GB/s fractions)

HW = {}  # filled once per run by hardware(): peak FLOP/s per dtype, copy and matrix-vector bandwidth in bytes/s


def hardware(device):
    """Matmul peak in fp32 and bf16 (common.measure_matmul_flops, the MFU denominator train.py uses too), and memory
    bandwidth two ways: a 512 MiB copy (read + write) and a 256 MiB fp32 matrix-vector product (what decoding does)."""
    if HW:
        return HW
    from common import measure_matmul_flops
    dev = torch.device(device)
    sync = sync_of(dev)
    for name, dt in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        HW[f"peak_{name}"] = max(measure_matmul_flops(dev, dt, n=2048) for _ in range(2))
    src = torch.ones(128 * 2**20, device=dev)  # 512 MiB
    dst = torch.empty_like(src)
    HW["copy_bw"] = 2 * src.numel() * 4 / interleaved_times({"copy": lambda: dst.copy_(src)}, 3, sync)["copy"]
    A, v = torch.randn(8192, 8192, device=dev), torch.randn(8192, device=dev)  # 256 MiB of fp32 weights
    HW["matvec_bw"] = A.numel() * 4 / interleaved_times({"mv": lambda: A @ v}, 5, sync)["mv"]
    return HW


def bench_hardware(args):
    hw = hardware(args.device)
    return [("peak matmul fp32 TFLOP/s", hw["peak_fp32"] / 1e12, float("nan"), float("nan"), "measured (2048^3)"),
            ("peak matmul bf16 TFLOP/s", hw["peak_bf16"] / 1e12, float("nan"), float("nan"), "measured (2048^3)"),
            ("memory bandwidth GB/s, copy", hw["copy_bw"] / 1e9, float("nan"), float("nan"), "measured (512 MiB)"),
            ("memory bandwidth GB/s, matvec", hw["matvec_bw"] / 1e9, float("nan"), float("nan"), "measured (fp32)")]


def mfu_rows(label, tok_s, flops_per_token, peak):
    """MFU of ours and of the reference at their tokens/s, against the measured peak (percent)."""
    o, r = (t * flops_per_token / peak * 100 for t in tok_s)
    return (f"{label} MFU %", o, r, o / r, f"of {peak / 1e12:.2f} TFLOP/s measured")


# -----------------------------------------------------------------------------
# model: model.py vs transformers

MODEL_CFG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=40960,
                 tie_word_embeddings=False)


def make_reference_checkpoint(folder):
    """One random checkpoint, written by transformers, that both implementations load."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**MODEL_CFG)).save_pretrained(folder)
    return folder


def rss_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


RSS_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"peak_rss_kb={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def script_peak_rss(script, *args, timeout=600):
    """Run `python script args` from the shell as a user would, and return (CompletedProcess, its peak RSS in bytes).
    A small launcher forks and execs the script and reads the child's ru_maxrss: started straight from this process,
    the child's peak would count this (large) process's memory at the fork too."""
    r = subprocess.run([sys.executable, "-c", RSS_LAUNCHER, os.path.join(ROOT, script), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    peak = re.findall(r"peak_rss_kb=(\d+)", r.stderr)
    return r, int(peak[-1]) * 1024 if peak else None


def reset_peak(device):
    """Reset the peak-memory mark so the next peak is this phase's own; returns the memory in use now.

    CPU: the kernel's peak-RSS mark (Linux /proc), with glibc told (MALLOC_MMAP_THRESHOLD_, set by run_worker)
    to return large blocks to the system at once, so RSS follows live tensors instead of malloc's caching.
    """
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS")


def peak_mem(device):
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_kb("VmHWM")


def load_pair(folder, dtype, device):
    """(ours, transformers) on the same checkpoint, each as a function idx -> logits plus its module."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from model import Qwen3
    hf_logging.disable_progress_bar()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ours = Qwen3.from_pretrained(folder, dtype=dt, device=device)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dt).to(device)
    return {"ours": (ours, ours), "transformers": (ref, lambda idx: ref(idx).logits)}


def lm_step(module, logits_of, idx, train):
    """One forward (no grad) or forward+backward with the same next-token loss for either implementation."""
    def step():
        if not train:
            with torch.no_grad():
                return logits_of(idx)
        logits = logits_of(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        module.zero_grad(set_to_none=True)
    return step


def sync_of(device):
    """What waits for a device's queued work before a timer is read: torch.cuda.synchronize on CUDA, else nothing."""
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def interleaved_times(fns, reps, sync):
    """Best (minimum) seconds of each fn over `reps`, alternating them rep by rep: drift in machine load hits
    both alike, and the minimum is the estimate least spoilt by a busy neighbour (noise only ever adds time)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def model_worker(impl, dtype, folder, device, batch, seq):
    """Runs in its own process: peak memory of one forward and one forward+backward, after a warm-up."""
    module, logits_of = load_pair(folder, dtype, device)[impl]
    idx = torch.randint(0, MODEL_CFG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    out = {}
    for name, train in [("fwd_mem", False), ("train_mem", True)]:
        module.train(train)
        step = lm_step(module, logits_of, idx, train)
        step()
        base = reset_peak(device)
        step()
        out[name] = peak_mem(device) - base
    return out


def run_worker(section, **kw):
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(dict(section=section, **kw))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench worker failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_model(args):
    folder = make_reference_checkpoint(os.path.join(args.work, "model_ref"))
    batch, seq = 2, 512
    idx = torch.randint(0, MODEL_CFG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    idx = idx.to(args.device)
    sync = sync_of(args.device)
    rows = []
    for dtype in ["fp32", "bf16"]:
        pair = load_pair(folder, dtype, args.device)
        speed = {}
        for train in [False, True]:
            for module, _ in pair.values():
                module.train(train)
            fns = {k: lm_step(m, f, idx, train) for k, (m, f) in pair.items()}
            speed[train] = {k: batch * seq / t for k, t in interleaved_times(fns, args.reps, sync).items()}
        del pair
        mem = {impl: run_worker("model", impl=impl, dtype=dtype, folder=folder, device=args.device, batch=batch,
                                seq=seq) for impl in ["ours", "transformers"]}
        from model import Qwen3Config
        cfg = Qwen3Config(**MODEL_CFG)
        for train, what in [(False, "forward"), (True, "fwd+bwd")]:
            o, t = speed[train]["ours"], speed[train]["transformers"]
            rows.append((f"model {dtype} {what} tok/s", o, t, o / t, ">= 1.0"))
            rows.append(mfu_rows(f"model {dtype} {what}", (o, t), cfg.flops_per_token(seq, backward=train),
                                 hardware(args.device)[f"peak_{dtype}"]))
        for key, what in [("fwd_mem", "forward"), ("train_mem", "fwd+bwd")]:
            o, t = mem["ours"][key] / 2**20, mem["transformers"][key] / 2**20
            rows.append((f"model {dtype} {what} peak MiB", o, t, o / t, "<= 1.0"))
    return rows


# -----------------------------------------------------------------------------
# cache: the teacher pass of cache_teacher.py vs a bare forward over the same batches


def demo_stream(work):
    """Tokens and document offsets of the bundled records, with the demo's kind of tokenizer."""
    import types
    from cache_teacher import tokenize_documents
    from common import end_tokens, load_tokenizer
    from data.tokenizer import record_texts, save, train_bpe
    tok_dir = os.path.join(work, "tokenizer")
    data = [os.path.join("data", "physics_cot.jsonl")]
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        save(train_bpe(record_texts(data), 2048), tok_dir)
    tok, tok_file = load_tokenizer(tok_dir)
    fields = dict(question="question", cot="CoT", response="response", explore="explore", examine="examine")
    a = types.SimpleNamespace(data=data, max_docs=0, too_long="skip")
    tokens, roles, offsets, _ = tokenize_documents(a, tok, fields, end_tokens(tok_file)[0][1], 4096)
    return tokens, roles, offsets


def cache_arrays(work, N, k=64):
    """The teacher arrays of a cache of N positions (top-k, T = 1, 2), as fresh memory-mapped files in `work`."""
    import numpy as np
    return {n: np.lib.format.open_memmap(os.path.join(work, n + ".npy"), mode="w+", dtype=dt, shape=sh)
            for n, dt, sh in [("topk_ids", np.uint8, (N, k // 4 * 9)), ("topk_logprobs", np.float16, (N, k)),
                              ("lse", np.float32, (N, 2)), ("target_logprob", np.float32, (N,)),
                              ("entropy", np.float32, (N,))]}


def bench_cache(args):
    import numpy as np
    from cache_teacher import cache_batches, plan_batches
    from common import pad_right
    from model import Qwen3
    folder = make_reference_checkpoint(os.path.join(args.work, "model_ref"))
    tokens, _, offsets = demo_stream(args.work)
    model = Qwen3.from_pretrained(folder, dtype=torch.float32, device=args.device).eval()
    batches = list(enumerate(plan_batches(np.diff(offsets), 4096)))
    N, k = len(tokens), 64
    arrays = cache_arrays(args.work, N, k)

    def bare():
        for _, docs in batches:
            idx = torch.from_numpy(pad_right([tokens[offsets[d]:offsets[d + 1]] for d in docs]))
            with torch.no_grad():
                model(idx.to(args.device))  # full logits, nothing kept

    def flush(b, n):
        for a in arrays.values():
            a.flush()

    def cached():
        cache_batches(model, tokens, offsets, batches, arrays, k, [1.0, 2.0], 1024, args.device, flush)

    sync = sync_of(args.device)
    t = interleaved_times({"bare": bare, "cache": cached}, max(1, args.reps // 2), sync)
    per_pos = sum(a[0].nbytes for a in arrays.values())
    return [("cache pass / bare forward (time)", t["cache"], t["bare"], t["cache"] / t["bare"], "<= 1.10"),
            ("cache teacher bytes / position", per_pos, 400, per_pos / 400, "<= 1.0 (budget 400 B)")]


# -----------------------------------------------------------------------------
# stream: cache_teacher.py --stream_layers against the in-memory pass (time), and its peak memory against the
# size of a checkpoint four times its budget

STREAM_MEM_CFG = dict(model_type="qwen3", vocab_size=2112, hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                      max_position_embeddings=4096, tie_word_embeddings=True, torch_dtype="float32")  # 1.02 GB fp32


def teacher_pass(streamed, folder, tokens, offsets, work, device):
    """One whole Phase-1 teacher pass, weights read from `folder`, rows into fresh arrays in `work`: in memory
    (from_pretrained + cache_batches) or streamed layer by layer (stream_batches). Returns the stream's summary."""
    import numpy as np
    from cache_teacher import cache_batches, plan_batches, write_stats
    from stream import stream_batches, stream_budget
    from model import Qwen3
    batches = list(enumerate(plan_batches(np.diff(offsets), 4096)))
    arrays = cache_arrays(work, len(tokens))
    if not streamed:
        model = Qwen3.from_pretrained(folder, dtype=torch.float32, device=device).eval()
        return cache_batches(model, tokens, offsets, batches, arrays, 64, [1.0, 2.0], 1024, device)
    scratch = os.path.join(work, "stream_scratch")
    shutil.rmtree(scratch, ignore_errors=True)  # no resuming from an earlier pass
    rows = lambda head, h, idx, docs: write_stats(head, h, idx, docs, offsets, arrays, 64, [1.0, 2.0], 1024)
    return stream_batches(folder, batches, tokens, offsets, rows, torch.float32, device, stream_budget(0, device),
                          scratch, log_every=1e9)


STREAM_MEM_FLAGS = ["--data", os.path.join("data", "physics_cot.jsonl"), "--max_docs", "3", "--batch_tokens", "2048",
                    "--chunk", "256", "--dtype", "float32", "--device", "cpu", "--log_every", "1e9", "--force"]


def stream_memory(teacher, tokenizer, work, budgets):
    """Peak RSS of the command-line process `cache_teacher.py --stream_layers` (CPU, fp32, the first 8 bundled
    records in batches of 2,048 tokens) for each budget (GB; 0 = the default), and of the same command with
    --teacher none (tokens only: the interpreter, torch and the data). Returns {label: peak bytes}."""
    runs = {"tokens only": ["--teacher", "none"]}
    runs.update({f"streamed, budget {b:g} GB": ["--teacher", teacher, "--stream_layers", "--stream_budget_gb", str(b)]
                 for b in budgets})
    peaks = {}
    for label, extra in runs.items():
        r, peaks[label] = script_peak_rss("cache_teacher.py", *STREAM_MEM_FLAGS, "--tokenizer", tokenizer,
                                          "--out", os.path.join(work, "stream_mem_cache"), *extra)
        if r.returncode != 0:
            raise RuntimeError(f"cache_teacher.py failed: {r.stderr[-2000:]}")
        peaks[label + (", states kept" if "kept on the device" in r.stderr else
                       ", states spilled" if "spilled" in r.stderr else "")] = peaks.pop(label)
    return peaks


def bench_stream(args):
    from model import Qwen3, Qwen3Config, weight_files
    folder = make_reference_checkpoint(os.path.join(args.work, "model_ref"))
    tokens, _, offsets = demo_stream(args.work)
    sync = sync_of(args.device)
    fns = {k: (lambda k=k: teacher_pass(k == "stream", folder, tokens, offsets, args.work, args.device))
           for k in ["memory", "stream"]}  # the warm-up run puts the checkpoint in the page cache
    t = interleaved_times(fns, max(1, args.reps // 2), sync)
    rows = [("stream pass / in-memory (time)", t["stream"], t["memory"], t["stream"] / t["memory"], "<= 1.3")]
    big = os.path.join(args.work, "stream_1gb")
    if not os.path.isfile(os.path.join(big, "config.json")):
        Qwen3(Qwen3Config(**STREAM_MEM_CFG)).init_weights(0).save_pretrained(big)
    ckpt = sum(os.path.getsize(p) for p in weight_files(big))
    peaks = stream_memory(big, os.path.join(args.work, "tokenizer"), args.work, [0, 0.065])
    base = peaks.pop("tokens only")
    for label, peak in peaks.items():  # the whole process's peak, page cache of the checkpoint's mapping included
        rows.append((f"stream RSS rise / ckpt, {label}", (peak - base) / 2**20, ckpt / 2**20, (peak - base) / ckpt,
                     "<= 0.35"))
    return rows


# -----------------------------------------------------------------------------
# topology: positions per second of the whole pass (topology.py main, report included)


def synthetic_cache(folder, N, doc_len=2500, k=64, vocab=151936, seed=0):
    """A cache folder of N positions with Qwen3-sized ids: a wandering entropy with steps, and top-k lists
    in which consecutive rows share part of their ids (so the tv signal has real unions to merge)."""
    import numpy as np
    from cache_teacher import write_cache
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        return folder
    rng = np.random.default_rng(seed)
    t = np.arange(N, dtype=np.int64)
    ids = ((t // 2 * 7919)[:, None] + np.arange(k) * 2377) % vocab  # distinct within a row
    lp = np.log(np.sort(rng.dirichlet(np.ones(k) * 0.3, size=N).astype(np.float32), 1)[:, ::-1] * 0.9 + 1e-12)
    ent = np.abs(np.cumsum(rng.normal(0, 0.05, N)) % 6 + (rng.random(N) < 0.01) * 2).astype(np.float32)
    offsets = np.append(np.arange(0, N, doc_len), N)
    lse = np.stack([np.zeros(N), np.full(N, 0.5)], 1)
    write_cache(folder, rng.integers(0, vocab, N), np.ones(N), offsets,
                dict(topk_ids=ids, topk_logprobs=lp, lse=lse, target_logprob=-ent, entropy=ent), k=k,
                source="synthetic")
    return folder


def bench_topology(args):
    import topology
    N = 2_000_000
    folder = synthetic_cache(os.path.join(args.work, "synthetic_cache"), N)
    rows = []
    for sig, target in [("entropy", 5_000_000), ("tv", 500_000)]:
        a = topology.get_parser().parse_args(["--cache", folder, "--out", os.path.join(args.work, f"topology_{sig}"),
                                              "--signal", sig, "--force", "--log_every", "1e9"])
        t0 = time.perf_counter()
        topology.main(a)
        rate = N / (time.perf_counter() - t0)
        rows.append((f"topology --signal {sig} positions/s", rate, target, rate / target, ">= 1.0 (vs target)"))
    return rows


# -----------------------------------------------------------------------------
# train: one optimizer step of train.py vs transformers' Qwen3 with a straightforward full-vocabulary loss

TRAIN_CFG = dict(MODEL_CFG, vocab_size=151936)  # Qwen3's real vocabulary: where chunking the loss matters


def train_batch(device, B=2, L=512, k=64, seed=0, vocab=TRAIN_CFG["vocab_size"]):
    """A micro-batch of B x L tokens, every row but the last trainable, with a random top-k teacher (k distinct ids per
    row: a random first id, then a fixed stride)."""
    from windows import batch_tensors
    g = torch.Generator().manual_seed(seed)
    V = vocab
    idx = torch.randint(0, V, (B, L), generator=g)
    sel = torch.cat([torch.arange(L - 1) + b * L for b in range(B)])
    ids = (torch.randint(0, V, (len(sel), 1), generator=g) + torch.arange(k) * (V // k)) % V  # (R, k)
    lp = torch.sort(torch.log_softmax(torch.randn(len(sel), k, generator=g) * 2, -1) - 0.3, descending=True).values
    lse = torch.stack([torch.zeros(len(sel)), torch.full((len(sel),), 0.4)], 1)
    return batch_tensors(device, idx=idx, sel=sel, targets=idx.flatten()[sel + 1],
                         reasoning=torch.rand(len(sel), generator=g) < 0.7, jump_w=torch.ones(len(sel)),
                         topk_ids=ids, topk_logprobs=lp, lse=lse)


def dense_kd_loss(logits, targets, w_ce, w_kd, ids, lq, Q, T, mode):
    """train.py's loss written straightforwardly over full-vocabulary logits (R, V): the reference step."""
    F = torch.nn.functional
    logits = logits.float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    lpT = F.log_softmax(logits / T, -1)
    lpK = lpT.gather(1, ids)
    if mode == "tail":
        logP = torch.log((1 - lpK.exp().sum(-1)).clamp_min(1e-30))
        kl = (lq.exp() * (lq - lpK)).sum(-1) + torch.xlogy(Q, Q) - Q * logP
    else:
        lq_n, lp_n = lq.log_softmax(-1), lpK.log_softmax(-1)
        kl = (lq_n.exp() * (lq_n - lp_n)).sum(-1)
    return (w_ce * ce + w_kd * kl).sum()


def kd_step(model, opt, batches, n_norm, world=1):
    """One optimizer step of train.py: micro_step (CE + T^2 KL over top-64 + tail, proof weights, BF16 autocast) and
    backward on each micro-batch, clip 1.0, AdamW. Returns the step's objective (summed over the processes of a DDP
    model, which syncs gradients on the last micro-batch only, as train.py)."""
    from kd import LOSS_CHUNK
    from train import micro_step
    total = 0.0
    for i, b in enumerate(batches):
        last = i == len(batches) - 1 or not hasattr(model, "no_sync")  # FSDP reduce-scatters after every one
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
            loss, _ = micro_step(model, b, alpha=0.45, w_proof=1.5, temperature=2.0, t_index=1, kd_mode="tail",
                                 n_norm=n_norm, chunk=LOSS_CHUNK, autocast=True)
            (loss * world).backward()  # DDP averages over processes; each loss is a share of the step's sum
        total += loss.detach()
    if world > 1:
        torch.distributed.all_reduce(total)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)


def train_pair(folder, device):
    """(ours, transformers): each a (model, optimizer, step function) for one full optimizer step."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from model import Qwen3
    from kd import teacher_q
    from train import configure_optimizer
    hf_logging.disable_progress_bar()
    batch = train_batch(device)
    n = len(batch["sel"])
    out = {}
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32, device=device).train()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    for name, m in [("ours", ours), ("transformers", ref)]:
        opt = configure_optimizer(m, 5e-6, 1e-3)

        def step(m=m, opt=opt, name=name):
            if name == "ours":
                return kd_step(m, opt, [batch], n)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                logits = m(batch["idx"]).logits.flatten(0, 1)[batch["sel"]]
                mult = torch.where(batch["reasoning"], 1.5, 1.0)
                lq, Q = teacher_q(batch["topk_logprobs"], batch["lse"], 1, 2.0)
                loss = dense_kd_loss(logits, batch["targets"], mult * 0.55 / n, mult * 0.45 * 4 / n,
                                     batch["topk_ids"], lq, Q, 2.0, "tail")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[name] = (m, opt, step)
    return out, batch


def train_worker(impl, folder, device):
    """Runs in its own process: peak memory of one optimizer step (after a warm-up step made the AdamW state)."""
    pair, _ = train_pair(folder, device)
    other = [k for k in pair if k != impl][0]
    del pair[other]
    step = pair[impl][2]
    step()
    base = reset_peak(device)
    step()
    return dict(mem=peak_mem(device) - base)


def bench_train(args):
    folder = os.path.join(args.work, "train_ref")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from transformers import Qwen3Config, Qwen3ForCausalLM
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**TRAIN_CFG)).save_pretrained(folder)
    sync = sync_of(args.device)
    pair, batch = train_pair(folder, args.device)
    t = interleaved_times({k: v[2] for k, v in pair.items()}, max(1, args.reps // 2), sync)
    del pair
    ntok = batch["idx"].numel()
    mem = {impl: run_worker("train", impl=impl, folder=folder, device=args.device)["mem"]
           for impl in ["ours", "transformers"]}
    o, r = ntok / t["ours"], ntok / t["transformers"]
    from model import Qwen3Config
    fpt = Qwen3Config(**TRAIN_CFG).flops_per_token(batch["idx"].shape[1])
    return [("train step tok/s (vocab 151,936)", o, r, o / r, ">= 2.0"),
            mfu_rows("train step", (o, r), fpt, hardware(args.device)["peak_bf16"]),
            ("train step peak MiB (vocab 151,936)", mem["ours"] / 2**20, mem["transformers"] / 2**20,
             mem["ours"] / mem["transformers"], "<= 0.47")]


# -----------------------------------------------------------------------------
# generate: decode tokens/s at batch 1, generate.py vs transformers' generate (greedy, same prompt and length)


def bench_generate(args, prompt_len=32, new=128):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from generate import generate
    from model import Qwen3
    hf_logging.disable_progress_bar()
    folder = make_reference_checkpoint(os.path.join(args.work, "model_ref"))
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32, device=args.device).eval()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
    prompt = torch.randint(0, MODEL_CFG["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    out = {}

    def run_ours():
        out["ours"] = list(generate(ours, prompt, new))

    def run_ref():
        with torch.no_grad():
            out["ref"] = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()

    sync = sync_of(args.device)
    t = interleaved_times({"ours": run_ours, "ref": run_ref}, max(1, args.reps // 2), sync)
    assert out["ours"] == out["ref"], "greedy outputs differ"
    o, r = new / t["ours"], new / t["ref"]
    rows = [(f"decode tok/s, batch 1 ({prompt_len}+{new}, greedy)", o, r, o / r, ">= 3.0 (vs transformers)")]
    # the bound: one token reads every weight matrix once, so a bare chain of matrix-vector products over the
    # model's own matrices is the fastest a token can be (the KV cache and the norms add a little on top)
    hw = hardware(args.device)
    for dtype in [torch.float32, torch.bfloat16]:
        model = ours if dtype == torch.float32 else Qwen3.from_pretrained(folder, dtype=dtype, device=args.device).eval()
        mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        vecs = {n: torch.randn(n, device=args.device, dtype=dtype) for n in {w.shape[1] for w in mats}}
        chain = lambda: [w @ vecs[w.shape[1]] for w in mats]
        t_tok = {}
        t_tok.update(interleaved_times({"bound": chain}, args.reps, sync))
        t_tok["ours"] = interleaved_times({"ours": lambda: list(generate(model, prompt, new))}, max(1, args.reps // 2),
                                          sync)["ours"] / new
        nbytes = sum(w.numel() * w.element_size() for w in mats)
        name = str(dtype).removeprefix("torch.")
        rows.append((f"decode {name} ms/token vs matvec bound", t_tok["ours"] * 1e3, t_tok["bound"] * 1e3,
                     t_tok["bound"] / t_tok["ours"], ">= 0.90 of the bound" if dtype == torch.float32 else "info"))
        rows.append((f"decode {name} GB/s (weights per token)", nbytes / t_tok["ours"] / 1e9, hw["matvec_bw"] / 1e9,
                     nbytes / t_tok["ours"] / hw["matvec_bw"], "fraction of measured fp32 matvec bandwidth"))
    return rows


# -----------------------------------------------------------------------------
# demo: demo.sh as a new user runs it, against its targets (time and outcome)

DEMO_TARGETS = dict(seconds=240, kl=0.06, top1=0.75)  # and the DualMind layout in every answer
DEMO_STEPS = {"4/9": "teacher training", "5/9": "teacher pass (Phase 1)", "8/9": "distillation (Phase 4)",
              "9/9": "answers"}  # the long steps; the other five take seconds
DEMO_SCALING = ("N_SYNTH", "TEACHER_STEPS", "STUDENT_STEPS", "MAX_NEW", "STOP_AFTER")  # demo.sh's smaller runs


def demo_timings(stdout):
    """demo.sh's output -> ({"1/9": seconds the step took, ...}, total seconds). Its steps print
    '== [Ns] k/9 what' when they start (N since the start; the first step counts from 0), the summary
    '== [Ns] summary', the last line 'demo finished in Ns'."""
    marks = [(int(t), name) for t, name in re.findall(r"^== \[(\d+)s\] (\S+)", stdout, re.M)]
    done = re.search(r"^demo finished in (\d+)s", stdout, re.M)
    if not marks or done is None:
        raise ValueError("demo.sh's output has no step lines or no 'demo finished' line: it did not run to the end")
    total = int(done.group(1))
    starts = [0] + [t for t, _ in marks[1:]]
    return {name: end - t for (_, name), t, end in zip(marks, starts, starts[1:] + [total])}, total


def bench_demo(args):
    from checkpoint import read_student
    out = os.path.join(args.work, "bench_demo")  # a name of its own: never a user's out/demo
    shutil.rmtree(out, ignore_errors=True)  # from nothing, as on a fresh clone
    root = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in DEMO_SCALING}  # the whole demo, whatever this shell set
    env.update(OUT=os.path.abspath(out), DEVICE=args.device, PYTHON=sys.executable)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", os.path.join(root, "demo.sh")], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"demo.sh failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    steps, _ = demo_timings(r.stdout)
    missing = [k for k in DEMO_STEPS if k not in steps]
    if missing:
        raise ValueError(f"demo.sh printed no step {', '.join(missing)}: has its numbering changed? (see DEMO_STEPS)")
    last = read_student(os.path.join(out, "student"))["last_eval"]
    with open(os.path.join(out, "answers_student.jsonl")) as f:
        layout = [json.loads(line)["check"]["ok"] for line in f]
    T = DEMO_TARGETS
    rows = [("demo.sh from an empty folder, s", wall, T["seconds"], T["seconds"] / wall, ">= 1.0 (vs target)")]
    rows += [(f"demo: {what} s (share)", steps[k], wall, steps[k] / wall, "measured")
             for k, what in DEMO_STEPS.items()]
    return rows + [
        ("demo: held-out KL after distillation", last["kl"], T["kl"], T["kl"] / last["kl"], ">= 1.0 (vs target)"),
        ("demo: top-1 agreement after distillation", last["top1"], T["top1"], last["top1"] / T["top1"],
         ">= 1.0 (vs target)"),
        ("demo: student answers in the layout", sum(layout), len(layout), sum(layout) / len(layout), ">= 1.0 (all)")]


# -----------------------------------------------------------------------------
# real: the card's shapes on one device, random weights made on the device (no downloads); --tiny: test-sized

SHAPES = {  # config.json values of the Hub models (reference: Qwen3-0.6B, -1.7B, -30B-A3B); tiny ones for tests
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, tie_word_embeddings=True),
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024, num_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False),
}
REAL_ROWS = ["student", "teacher", "decode", "parity"]


def real_plan(args):
    """What --real measures on this device: the card's shapes on a GPU, the student row at Qwen3-0.6B shapes on a
    CPU, every row at test size with --tiny (the same code, seconds on a CPU; compiled with aot_eager, no C++ build).
    --student_batch BxA replaces the student row's micro-batch and accumulation."""
    cuda = args.device.startswith("cuda")
    if args.tiny:
        plan = dict(student="tiny", teacher="tiny-moe", teacher_layers=2, batch=2, seq=64, accum=2, reps=1,
                    doc_len=128, positions=512, prompt=8, new=8, decode_dtype=torch.float32, backend="aot_eager",
                    search_cap=4, compile=True, rows=REAL_ROWS)
    else:
        plan = dict(student="qwen3-1.7b" if cuda else "qwen3-0.6b", teacher="qwen3-30b-a3b", teacher_layers=4,
                    batch=2, seq=512, accum=16 if cuda else 1, reps=3 if cuda else 1, doc_len=2048, positions=16384,
                    prompt=32, new=128, decode_dtype=torch.bfloat16, backend="inductor",
                    search_cap=256 if cuda else 0, compile=cuda, rows=REAL_ROWS if cuda else ["student"])
    if args.student_batch:
        b, _, a = args.student_batch.partition("x")
        if not (b.isdigit() and a.isdigit() and int(b) > 0 and int(a) > 0):
            raise ValueError(f"--student_batch {args.student_batch}: give micro-batch x accumulation steps, as 32x1")
        plan.update(batch=int(b), accum=int(a))
    return plan


def note(msg):
    """A progress line of --real on stderr, so a row cut short still shows how far it got."""
    print(f"[real]   {msg}", file=sys.stderr, flush=True)


def random_model(shape, device, dtype, layers=None, seed=0, std=0.02):
    """A Qwen3 of a SHAPES entry with N(0, std) matrices and unit norms, made on `device` (no host copy)."""
    from model import Qwen3, Qwen3Config
    cfg = Qwen3Config(**dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})))
    with torch.device("meta"):
        model = Qwen3(cfg).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave the embedding and the head separate Parameters
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied head is the embedding, listed once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model


def hf_twin(model):
    """transformers' model of the same config holding a copy of model's weights (its v5 layout: experts fused)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from model import SparseMoeBlock
    d = model.config.to_hf_dict()
    p = next(model.parameters())
    with torch.device(p.device):
        ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=p.dtype).eval()
    sd = dict(model.state_dict())
    for i, blk in enumerate(model.model.layers):
        if isinstance(blk.mlp, SparseMoeBlock):
            pre = f"model.layers.{i}.mlp.experts."
            sd = {k: v for k, v in sd.items() if not k.startswith(pre)}
            gate, up, down = blk.mlp.stacked  # (E, I, C), (E, I, C), (E, C, I)
            sd[pre + "gate_up_proj"], sd[pre + "down_proj"] = torch.cat([gate, up], 1), down  # gate rows first
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return ref


def largest_micro_batch(model, opt, seq, device, cap):
    """The largest micro-batch, doubling from 2 up to cap, whose step fits beside the AdamW state (lr 0: the weights
    stay). Returns (size, whether the cap ended the search)."""
    size, b = 0, 2
    while b <= cap:
        batch, oom = train_batch(device, B=b, L=seq, vocab=model.config.vocab_size, seed=b), False
        try:
            kd_step(model, opt, [batch], len(batch["sel"]))
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # out of the except block: its traceback no longer holds the step's tensors
            del batch
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return size, False
        size, b = b, 2 * b
    return size, True


def real_student(plan, device, peak):
    """One optimizer step of train.py at the card's micro-batch, eager and compiled: tok/s, MFU, peak memory; and the
    largest micro-batch that fits, without and with gradient checkpointing."""
    from train import configure_optimizer
    model = random_model(plan["student"], device, torch.float32).train()  # FP32 master weights
    opt = configure_optimizer(model, 5e-6, 1e-3)
    B, L, V = plan["batch"], plan["seq"], model.config.vocab_size
    batches = [train_batch(device, B=B, L=L, vocab=V, seed=s) for s in range(plan["accum"])]
    n_norm = sum(len(b["sel"]) for b in batches)
    sync, fpt, N = sync_of(device), model.config.flops_per_token(L), model.num_params()
    out = dict(shape=plan["student"], params=N, micro_batch=[B, L], accum=plan["accum"],
               tokens_per_step=B * L * plan["accum"], flops_per_token=fpt, mem_estimate_gb=16 * N / 1e9,
               mem_estimate="16 B per parameter: fp32 weights and grads, AdamW m and v (activations not counted)")
    for name in ["eager", "compile"]:
        if name == "compile" and not plan["compile"]:
            out[name] = None
            continue
        step_model = torch.compile(model, backend=plan["backend"]) if name == "compile" else model
        kd_step(step_model, opt, batches, n_norm)  # warm-up: the AdamW state, compilation
        times = []
        for _ in range(plan["reps"]):
            before = reset_peak(device)
            sync()
            t0 = time.perf_counter()
            loss = kd_step(step_model, opt, batches, n_norm)
            sync()
            times.append(time.perf_counter() - t0)
        tok_s = out["tokens_per_step"] / min(times)
        out[name] = dict(tok_s=tok_s, mfu=tok_s * fpt / peak, step_s=min(times), peak_mem_gb=peak_mem(device) / 1e9,
                         mem_before_step_gb=before / 1e9, loss=loss)
        note(f"student {name}: {out[name]['step_s']:.3g} s per step, {tok_s:,.0f} tok/s, MFU {out[name]['mfu']:.1%}")
    for ckpt in [False, True]:
        model.gradient_checkpointing = ckpt
        key = "max_micro_batch" + ("_grad_ckpt" if ckpt else "")
        out[key] = None
        if plan["search_cap"]:
            size, capped = largest_micro_batch(model, opt, L, device, plan["search_cap"])
            out[key] = dict(size=size, capped=capped)
            note(f"student {key}: {size}{' (the cap)' if capped else ''}")
    return out


def timed_modules(model, classes, fn, sync):
    """Run fn once with the device synchronised around every module of `classes`: (seconds, {class: seconds})."""
    spent, start, hooks = {c: 0.0 for c in classes}, {}, []

    def pre(mod, args):
        sync()
        start[mod] = time.perf_counter()

    def post(mod, args, out):
        sync()
        spent[type(mod)] += time.perf_counter() - start[mod]

    for m in model.modules():
        if type(m) in classes:
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    t0 = time.perf_counter()
    fn()
    sync()
    total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return total, spent


def real_teacher(plan, device, work):
    """Phase 1 on a few of the teacher's layers with its real embedding and lm_head: cache_teacher's whole pass
    (forward, top-64, logsumexp at T = 1, 2, target log-prob, entropy) over one batch of documents, in memory with
    either way of running the experts, and streamed layer by layer from a checkpoint (--stream_layers; the checkpoint
    just written, so in the page cache). Times are measured on the layers run and extrapolated to all the layers:
    the layers' share scales, the embedding, head and statistics do not."""
    import numpy as np
    from cache_teacher import cache_batches, plan_batches, write_stats
    from stream import stream_batches, stream_budget
    from model import Block, SparseMoeBlock
    layers, all_layers = plan["teacher_layers"], SHAPES[plan["teacher"]]["num_hidden_layers"]
    scale = all_layers / layers
    model = random_model(plan["teacher"], device, torch.bfloat16, layers=layers).eval()
    P, k = plan["positions"], 64
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, P).astype(np.uint32)
    offsets = np.arange(0, P + 1, plan["doc_len"])
    batches = list(enumerate(plan_batches(np.diff(offsets), P)))  # one forward of P positions
    arrays = dict(topk_ids=np.empty((P, k // 4 * 9), np.uint8), topk_logprobs=np.empty((P, k), np.float16),
                  lse=np.empty((P, 2), np.float32), target_logprob=np.empty(P, np.float32),
                  entropy=np.empty(P, np.float32))

    def in_memory():
        cache_batches(model, tokens, offsets, batches, arrays, k, [1.0, 2.0], 1024, device)

    sync = sync_of(device)
    out = dict(shape=plan["teacher"], layers_run=layers, layers_total=all_layers, positions=P, doc_len=plan["doc_len"])
    for impl in ["grouped", "loop"]:
        model.set_moe_impl(impl)
        t = interleaved_times({impl: in_memory}, plan["reps"], sync)[impl]
        total, spent = timed_modules(model, {Block, SparseMoeBlock}, in_memory, sync)
        f_layers, f_moe = spent[Block] / total, spent[SparseMoeBlock] / total  # shares of the pass
        t_all = t * (1 - f_layers + f_layers * scale)
        out[impl] = dict(positions_s=P / t, moe_share=f_moe, positions_s_all_layers=P / t_all,
                         moe_share_all_layers=f_moe * scale * t / t_all, fixed_s=t * (1 - f_layers),
                         finite=bool(np.isfinite(arrays["lse"]).all()))
        note(f"teacher {impl}: {P / t:,.0f} positions/s over {layers} layers")
    folder, scratch = os.path.join(work, f"real_{plan['teacher']}_{layers}"), os.path.join(work, "real_scratch")
    model.save_pretrained(folder)  # bf16 safetensors, read back one layer at a time
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the stream's budget is a share of the free memory

    def streamed():
        shutil.rmtree(scratch, ignore_errors=True)  # no resuming from the previous run
        rows = lambda head, h, idx, docs: write_stats(head, h, idx, docs, offsets, arrays, k, [1.0, 2.0], 1024)
        stream_batches(folder, batches, tokens, offsets, rows, torch.bfloat16, device, stream_budget(0, device),
                       scratch, log_every=1e9)

    t = interleaved_times({"stream": streamed}, plan["reps"], sync)["stream"]
    fixed = min(out["grouped"]["fixed_s"], t)  # embedding, head and statistics, as measured in memory
    out["streamed"] = dict(positions_s=P / t, positions_s_all_layers=P / (fixed + (t - fixed) * scale),
                           finite=bool(np.isfinite(arrays["lse"]).all()))
    shutil.rmtree(folder)
    return out


def real_decode(plan, device):
    """Decoding at batch 1 (prompt + new tokens, greedy, prefill included): generate.py eager and with its compiled
    decode step (generate.py --compile), against transformers' generate on the same weights and prompt."""
    from generate import decode_step, generate
    model = random_model(plan["student"], device, plan["decode_dtype"]).eval()
    ref = hf_twin(model)
    P, new, got = plan["prompt"], plan["new"], {}
    prompt = torch.randint(0, model.config.vocab_size, (1, P), generator=torch.Generator().manual_seed(1)).to(device)
    step = torch.compile(decode_step, backend=plan["backend"])

    def ours(name, step_fn=None):
        def run():
            got[name] = list(generate(model, prompt, new, step_fn=step_fn))
        return run

    def theirs():
        with torch.no_grad():
            got["transformers"] = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                               min_new_tokens=new, do_sample=False, pad_token_id=0)[0, P:].tolist()

    note("decode: warm-up (compiles the decode step), then the timed runs")
    t = interleaved_times({"eager": ours("eager"), "compile": ours("compile", step), "transformers": theirs},
                          plan["reps"], sync_of(device))
    agree = {n: next((i for i, (a, b) in enumerate(zip(got[n], got["transformers"])) if a != b), new)
             for n in ["eager", "compile"]}
    return dict(shape=plan["student"], dtype=str(plan["decode_dtype"]).removeprefix("torch."), prompt=P, new=new,
                **{f"{n}_tok_s": new / s for n, s in t.items()}, tokens_equal_before_first_difference=agree,
                compile_vs_transformers=t["transformers"] / t["compile"])


def logits_parity(model, seq):
    """model.py vs transformers on the same weights and tokens: logits in the model's dtype, on its device."""
    ref = hf_twin(model)
    idx = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        idx = idx.to(next(model.parameters()).device)
        a, b = ref(idx).logits.float(), model(idx).float()
    return dict(tokens=seq, max_abs=(a - b).abs().max().item(), max_rel=((a - b).abs().max() / a.abs().max()).item(),
                max_abs_logit=a.abs().max().item())


def real_parity(plan, device):
    """model.py vs transformers in bf16: the student's shapes, and the teacher's layers with the grouped experts."""
    student = random_model(plan["student"], device, torch.bfloat16).eval()
    out = dict(student=dict(shape=plan["student"], **logits_parity(student, plan["seq"])))
    del student
    teacher = random_model(plan["teacher"], device, torch.bfloat16, layers=plan["teacher_layers"]).eval()
    out["teacher"] = dict(shape=plan["teacher"], layers=plan["teacher_layers"],
                          **logits_parity(teacher.set_moe_impl("grouped"), plan["seq"]))
    return out


def real_distributed(plan, args, steps=2, lr=1e-3):
    """Under torchrun: two optimizer steps of the student with DDP, and with FSDP (train.py --fsdp: bf16 compute),
    each process taking its share of the micro-batches, against the same two steps in one process (each process first
    computes that reference alone, then frees it); FSDP's second step timed (tok/s, MFU, peak memory per GPU).
    lr is high enough that the second step's loss shows the first step's gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from common import close_distributed, init_distributed, peak_flops
    from model import Qwen3Config
    from checkpoint import shard_model
    from train import configure_optimizer
    rank, world, device = init_distributed(args.device)
    cuda, sync = device.startswith("cuda"), sync_of(device)
    if plan["accum"] % world:
        raise ValueError(f"{world} processes do not divide the {plan['accum']} micro-batches of a step")
    batches = [train_batch(device, B=plan["batch"], L=plan["seq"], vocab=SHAPES[plan["student"]]["vocab_size"],
                           seed=s) for s in range(plan["accum"])]
    n_norm = sum(len(b["sel"]) for b in batches)
    losses, seconds = {}, []
    for name, procs in [("one_process", 1), ("ddp", world), ("fsdp", world)]:
        model = random_model(plan["student"], "cpu" if name == "fsdp" else device, torch.float32).train()
        if name == "fsdp":  # as train.py --fsdp: sharded on the host, then each process's shards to its device
            model = shard_model(model, "bfloat16").to(device)
        opt = configure_optimizer(model, lr, 1e-3)
        step_model = model if procs == 1 or name == "fsdp" else DDP(model, device_ids=[torch.device(device).index]
                                                                    if cuda else None)
        mine = batches if procs == 1 else batches[rank::world]
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        losses[name] = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            losses[name].append(kd_step(step_model, opt, mine, n_norm, procs))
            sync()
            seconds.append(time.perf_counter() - t0)  # the last one: FSDP's second step
        del step_model, model, opt
    one, ddp, fsdp = losses["one_process"], losses["ddp"], losses["fsdp"]
    tokens = plan["batch"] * plan["seq"] * plan["accum"]  # a step, every process together
    flops = tokens * Qwen3Config(**SHAPES[plan["student"]]).flops_per_token(plan["seq"])
    peak = peak_flops(torch.device(device), torch.bfloat16)[0]
    out = dict(world=world, backend=torch.distributed.get_backend(), steps=steps, lr=lr, **losses,
               max_rel_diff=max(abs(a - b) / abs(a) for a, b in zip(one, ddp)),
               fsdp_max_rel_diff=max(abs(a - b) / abs(a) for a, b in zip(one, fsdp)),
               fsdp_tok_s=tokens / seconds[-1], fsdp_mfu=flops / seconds[-1] / (peak * world),
               fsdp_peak_gb_per_gpu=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None)
    close_distributed()
    return out if rank == 0 else None


def rate(x):
    """1,234 or 5.17: whole numbers from 100 up, three significant digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def real_table(res):
    """The figures of a --real run as (what, value, target) lines."""
    lines = []
    s = res.get("student")
    if s:
        B, L = s["micro_batch"]
        for name in ["eager", "compile"]:
            r = s[name]
            what = f"student {s['shape']} step ({s['accum']} x {B} x {L}), {name}"
            lines.append((what, "not run on a CPU" if r is None else
                          f"{rate(r['tok_s'])} tok/s | MFU {r['mfu']:.1%} | peak {r['peak_mem_gb']:.2f} GB "
                          f"(16 B/param: {s['mem_estimate_gb']:.2f} GB)", "MFU >= 40%" if name == "compile" else ""))
        for key, what in [("max_micro_batch", "plain"), ("max_micro_batch_grad_ckpt", "--grad_ckpt")]:
            r = s[key]
            lines.append((f"student largest micro-batch x {L}, {what}", "searched on a GPU only" if r is None else
                          f"{r['size']}{' (the cap)' if r['capped'] else ''}", ""))
    t = res.get("teacher")
    if t:
        for impl in ["grouped", "loop"]:
            r = t[impl]
            lines.append((f"teacher {t['shape']}, {t['layers_run']} of {t['layers_total']} layers, {impl} experts",
                          f"{rate(r['positions_s'])} positions/s | MoE blocks {r['moe_share']:.0%} of the time", ""))
            lines.append((f"  extrapolated to all {t['layers_total']} layers", f"{rate(r['positions_s_all_layers'])} "
                          f"positions/s | MoE blocks {r['moe_share_all_layers']:.0%}",
                          ">= 20,000 positions/s" if impl == "grouped" else ""))
        r = t["streamed"]
        lines.append((f"teacher {t['shape']}, {t['layers_run']} layers, streamed (--stream_layers)",
                      f"{rate(r['positions_s'])} positions/s | all {t['layers_total']} layers, extrapolated: "
                      f"{rate(r['positions_s_all_layers'])} positions/s", ""))
    d = res.get("decode")
    if d:
        lines.append((f"decode {d['shape']} batch 1 ({d['prompt']}+{d['new']} greedy, {d['dtype']})",
                      f"eager {rate(d['eager_tok_s'])} | compile {rate(d['compile_tok_s'])} | transformers "
                      f"{rate(d['transformers_tok_s'])} tok/s | compile {d['compile_vs_transformers']:.2f}x", ">= 3x"))
    p = res.get("parity")
    if p:
        for key in ["student", "teacher"]:
            r = p[key]
            lines.append((f"parity bf16 vs transformers, {r['shape']}" + (f" ({r['layers']} layers)" if key == "teacher"
                                                                          else ""),
                          f"max abs {r['max_abs']:.3g} | max rel {r['max_rel']:.2e} (of |logit| <= "
                          f"{r['max_abs_logit']:.3g})", ""))
    g = res.get("distributed")
    if g:
        lines.append((f"torchrun x {g['world']} ({g['backend']}) vs one process, {g['steps']} steps",
                      f"losses {', '.join(f'{x:.6f}' for x in g['ddp'])} | max rel diff {g['max_rel_diff']:.1e}",
                      "<= 1e-4"))
        mem = f"{g['fsdp_peak_gb_per_gpu']:.1f} GB per GPU" if g["fsdp_peak_gb_per_gpu"] else "peak memory: GPU only"
        lines.append((f"FSDP x {g['world']}, bf16 compute: second step",
                      f"losses {', '.join(f'{x:.6f}' for x in g['fsdp'])} | max rel diff {g['fsdp_max_rel_diff']:.1e}"
                      f" | {rate(g['fsdp_tok_s'])} tok/s | MFU {g['fsdp_mfu']:.1%} | {mem}", "losses <= 1e-3 (bf16)"))
    return lines


def real_main(args):
    """--real / --tiny: the rows of the plan (or --only), one table, and the same figures in a JSON file."""
    from common import write_json
    plan, cuda = real_plan(args), args.device.startswith("cuda")
    os.makedirs(args.work, exist_ok=True)
    res = dict(mode="tiny" if args.tiny else "real", device=args.device, torch=torch.__version__,
               threads=torch.get_num_threads(), device_name=torch.cuda.get_device_name(args.device) if cuda else "cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: the DDP row only, reported by rank 0
        res["distributed"] = real_distributed(plan, args)
        if res["distributed"] is None:
            return None
    else:
        rows = args.only.split(",") if args.only else plan["rows"]
        if set(rows) - set(REAL_ROWS):
            raise ValueError(f"--only {args.only}: with --real, choose among {', '.join(REAL_ROWS)}")
        from common import peak_flops
        peak, res["peak_source"] = peak_flops(torch.device(args.device), torch.bfloat16)
        res["peak_bf16_flops"], res["seconds"] = peak, {}
        run = dict(student=lambda: real_student(plan, args.device, peak),
                   teacher=lambda: real_teacher(plan, args.device, args.work),
                   decode=lambda: real_decode(plan, args.device),
                   parity=lambda: real_parity(plan, args.device))
        for row in REAL_ROWS:
            res[row] = None
            if row in rows:
                print(f"[real] {row} ...", file=sys.stderr, flush=True)
                t0 = time.time()
                res[row] = run[row]()
                res["seconds"][row] = time.time() - t0
    path = os.path.join(args.work, "real" + ("_tiny" if args.tiny else "") +
                        ("_torchrun" if "distributed" in res else "") + ".json")
    write_json(path, res)
    peak = (f"; bf16 peak {res['peak_bf16_flops'] / 1e12:.3g} TFLOP/s ({res['peak_source']})"
            if "peak_source" in res else "")
    print(f"{res['mode']} shapes on {args.device} ({res['device_name']}), torch {res['torch']}, {res['threads']} "
          f"threads{peak}")
    for what, value, target in real_table(res):
        print(f"{what:<58} {value:<84} {target}".rstrip())
    print(f"-> {path}")
    return res


SECTIONS = {"hardware": bench_hardware, "model": bench_model, "cache": bench_cache, "stream": bench_stream,
            "topology": bench_topology, "train": bench_train, "generate": bench_generate, "demo": bench_demo}
WORKERS = {"model": model_worker, "train": train_worker}


def main(args):
    from common import check_device, check_ranges
    check_ranges(args, reps="[1, inf)")
    check_device(args.device)
    if args.real or args.tiny:
        return real_main(args)
    if args.student_batch:
        raise ValueError(f"--student_batch {args.student_batch}: only with --real or --tiny (the student row)")
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"--only {args.only}: unknown section(s) {unknown} (sections: {', '.join(SECTIONS)})")
    os.makedirs(args.work, exist_ok=True)
    print(f"bench on {args.device}: torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'metric':<42} {'ours':>10} {'reference':>10} {'ratio':>8}  target")
    num = lambda x: f"{x:>10.4f}" if abs(x) < 1 else f"{x:>10.2f}"  # a KL of 0.0529 keeps its digits
    for name in names:
        for metric, ours, ref, ratio, target in SECTIONS[name](args):
            print(f"{metric:<42} {num(ours)} {num(ref)} {ratio:>7.2f}x  {target}", flush=True)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}; with "
                   f"--real, rows of: {', '.join(REAL_ROWS)}")
    p.add_argument("--real", action="store_true", help="the card's shapes on --device, random weights (see above)")
    p.add_argument("--tiny", action="store_true", help="--real's code at test size (seconds on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--student_batch", default="", help="--real's student row: micro-batch x accumulation steps, "
                   "as 32x1 (default 2x16 on a GPU, the card's; 2x1 on a CPU; 2x2 with --tiny)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (the best is reported)")
    p.add_argument("--work", default=os.path.join("out", "bench"), help="scratch folder: benchmark checkpoints, "
                   "real.json, the demo section's run (bench_demo/, deleted first)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    args = get_parser().parse_args()
    if args._worker:
        kw = json.loads(args._worker)
        print(json.dumps(WORKERS[kw.pop("section")](**kw)))
    else:
        try:
            main(args)
        except ValueError as e:
            sys.exit(f"bench.py: error: {e}")
