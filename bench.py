"""
Side-by-side speed and memory of the kit against the reference implementation, printed as ratios.

    python bench.py                     # every section (a few minutes on a 2-core CPU)
    python bench.py --only model        # one section: model
    python bench.py --device cuda       # the same on a GPU

Sections and what each compares (higher ratio = better for us; memory ratios are ours / theirs, lower = better):
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

Needs the test requirements (transformers is the reference): pip install -r requirements-dev.txt
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

# -----------------------------------------------------------------------------
# hardware: this machine's own bounds, measured in the same run (the denominators of MFU and of the GB/s fractions)

HW = {}  # filled once per run by hardware(): peak FLOP/s per dtype, copy and matrix-vector bandwidth in bytes/s


def hardware(device):
    """Matmul peak in fp32 and bf16 (train.measure_matmul_flops, the MFU denominator train.py uses too), and memory
    bandwidth two ways: a 512 MiB copy (read + write) and a 256 MiB fp32 matrix-vector product (what decoding does)."""
    if HW:
        return HW
    from train import measure_matmul_flops
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
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
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
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
    arrays = {n: np.lib.format.open_memmap(os.path.join(args.work, n + ".npy"), mode="w+", dtype=dt, shape=sh)
              for n, dt, sh in [("topk_ids", np.uint8, (N, 144)), ("topk_logprobs", np.float16, (N, k)),
                                ("lse", np.float32, (N, 2)), ("target_logprob", np.float32, (N,)),
                                ("entropy", np.float32, (N,))]}

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

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t = interleaved_times({"bare": bare, "cache": cached}, max(1, args.reps // 2), sync)
    per_pos = sum(a[0].nbytes for a in arrays.values())
    return [("cache pass / bare forward (time)", t["cache"], t["bare"], t["cache"] / t["bare"], "<= 1.10"),
            ("cache teacher bytes / position", per_pos, 400, per_pos / 400, "<= 1.0 (budget 400 B)")]


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


def train_batch(device, B=2, L=512, k=64, seed=0):
    """A micro-batch of 2 x 512 tokens, every row but the last trainable, with a random top-64 teacher."""
    from train import batch_tensors
    g = torch.Generator().manual_seed(seed)
    V = TRAIN_CFG["vocab_size"]
    idx = torch.randint(0, V, (B, L), generator=g)
    sel = torch.cat([torch.arange(L - 1) + b * L for b in range(B)])
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(len(sel))])
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


def train_pair(folder, device):
    """(ours, transformers): each a (model, optimizer, step function) for one full optimizer step."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from model import Qwen3
    from train import configure_optimizer, micro_step, teacher_q
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
                loss, _ = micro_step(m, batch, alpha=0.45, w_proof=1.5, temperature=2.0, t_index=1, kd_mode="tail",
                                     n_norm=n, chunk=256, autocast=True)
            else:
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
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
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
             mem["ours"] / mem["transformers"], "<= 0.8")]


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

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
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


SECTIONS = {"hardware": bench_hardware, "model": bench_model, "cache": bench_cache, "topology": bench_topology,
            "train": bench_train, "generate": bench_generate}
WORKERS = {"model": model_worker, "train": train_worker}


def main(args):
    from common import check_device, check_ranges
    check_ranges(args, reps="[1, inf)")
    check_device(args.device)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"--only {args.only}: unknown section(s) {unknown} (sections: {', '.join(SECTIONS)})")
    os.makedirs(args.work, exist_ok=True)
    print(f"bench on {args.device}: torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'metric':<42} {'ours':>10} {'reference':>10} {'ratio':>8}  target")
    for name in names:
        for metric, ours, ref, ratio, target in SECTIONS[name](args):
            print(f"{metric:<42} {ours:>10.2f} {ref:>10.2f} {ratio:>7.2f}x  {target}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (the best is reported)")
    p.add_argument("--work", default=os.path.join("out", "bench"), help="scratch folder for benchmark checkpoints")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        kw = json.loads(args._worker)
        print(json.dumps(WORKERS[kw.pop("section")](**kw)))
    else:
        try:
            main(args)
        except ValueError as e:
            sys.exit(f"bench.py: error: {e}")
