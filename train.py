"""
Phase 4: curriculum-ordered knowledge distillation into the student, in a plain PyTorch BF16 loop.

The loss (kd.py states the math, with a plain and a fused implementation), per trainable row:
    m * ((1 - alpha) * CE + alpha * T^2 * KL_{k+1}(teacher_T || student_T)),  summed / the step's trainable rows
with m = w_proof(step) on explore/examine targets (1.0 on response) x 1.25 right after a topology jump.
Schedules over optimizer steps: alpha 0 until 15% of training, linear to 0.45 at 45%; w_proof linear 2.25 -> 1.1;
lr warmup over 30 steps to 5e-6, cosine to 5e-7. Curriculum: four phases of equal steps; phase p draws from the
easiest 30%, 55%, 80%, 100% of the training windows (windows.py's difficulty; no repeat within a shuffled pass).
AdamW (weight decay 1e-3 on matrices), clip 1.0, 2 x 16 = 32 windows per step whatever the process count, FP32
master weights, BF16 autocast. Each step logs its loss parts, lr, tok/s and MFU (model FLOPs over --peak_flops).
NaN guard: a non-finite loss part or gradient is not applied, non-finite weights are not saved, a non-finite
evaluation is never marked complete; the run stops naming the step.

Inputs   --init (Hub id, folder, or `scratch` with --config), --cache, --topology, --windows
Outputs  in --out (default out/student): the student in Hugging Face layout (loads in transformers), train_log.jsonl
         (a JSON line per step and per evaluation), report.html (the run's curves, redrawn at each evaluation),
         draws.npy int32 [W] (times each window was drawn), ckpt/ (resumable) while training

Run
  python train.py --init scratch --config data/student_config.json --cache out/cache --topology out/topology \\
      --windows out/windows --lr 3e-3 --min_lr 3e-4 --max_steps 150                       # a student from scratch
  python train.py --init Qwen/Qwen3-1.7B --cache out/cache --topology out/topology --windows out/windows \\
      --device cuda --batch_size 32 --grad_accum 1 --compile     # one 80 GB GPU: the card's step, one micro-batch
  torchrun --nproc_per_node=8 train.py ... --device cuda                              # same 32-window step
  python train.py ... --resume                                                        # after a kill
  python train.py --init scratch --config data/teacher_config.json --cache out/cache_tokens --kd_alpha 0  # plain LM
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from cache_teacher import TeacherCache
from checkpoint import (RunLog, find_checkpoint, folder_manifest, gather_weights, load_checkpoint, non_finite, read_log,
                        save_checkpoint, save_student, shard_model, sharded, stopped, unwrap, wrap_model)
from common import (FORMAT_VERSION, atomic_write, check_device, check_ranges, checksums, cli, close_distributed,
                    doc_line, fmt_time, init_distributed, peak_flops, prepare_out, save_npy, sha256_json, stop_requests,
                    verify_folder, write_json)
from kd import DIVERGENCES, LOSS_CHUNK, ROW_STATS, check_impl, kd_loss, kd_stats, teacher_q
from model import Qwen3, Qwen3Config
from pages import training_page
from topology import load as load_topology
from windows import (POOLS, WindowBatches, draw_schedule, draws_summary, fixed_windows, load as load_windows,
                     parse_pools, pool_phases, split_micro, step_phase)

STEP_STATS = ("ce", "kl", "agree", "tail_gap", "rows", "tokens", "objective")  # what one optimizer step sums up

# -----------------------------------------------------------------------------
# Schedules (pure functions of the step)


def kd_alpha(step, total, target=0.45, start=0.15, full=0.45):
    """0 until `start` of training, linear to `target` at `full`, constant after (a step when start == full)."""
    f = step / max(total - 1, 1)
    if f < start:
        return 0.0
    return target * min(1.0, (f - start) / (full - start)) if full > start else target


def proof_weight(step, total, first=2.25, last=1.1):
    """Loss multiplier of explore/examine targets, linear from `first` to `last` over training."""
    return first + (last - first) * step / max(total - 1, 1)


def learning_rate(step, total, peak=5e-6, floor=5e-7, warmup=30):
    """Linear warmup over `warmup` steps to `peak`, then cosine to `floor` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    f = (step - warmup) / max(total - 1 - warmup, 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(f, 1.0)))


# -----------------------------------------------------------------------------
# One micro-batch: forward and loss; the held-out evaluation


def batch_teacher(batch, t_index, T):
    """(ids, log q_T on them, tail mass Q_T) per trainable row, or None without a teacher (CE only, alpha 0)."""
    if "topk_ids" not in batch:
        return None
    return (batch["topk_ids"], *teacher_q(batch["topk_logprobs"].float(), batch["lse"].float(), t_index, T))


def micro_step(model, batch, *, alpha, w_proof, temperature, t_index, kd_mode, n_norm, chunk, use_jumps=True,
               use_proof=True, autocast=False, kd_impl="fused"):
    """Forward + loss of one micro-batch (the caller runs backward). Returns (loss, sums): loss is already divided
    by n_norm, the trainable rows of the whole optimizer step; sums (5,) float64 = ROW_STATS summed, then rows."""
    T, R = temperature, len(batch["sel"])  # R trainable rows
    with torch.autocast(batch["idx"].device.type, dtype=torch.bfloat16, enabled=bool(autocast)):
        # the loss multiplier m per row: proof weight on explore/examine targets, x 1.25 right after a jump
        m = torch.ones(R, device=batch["idx"].device)
        if use_proof:
            m = torch.where(batch["reasoning"], torch.full_like(m, w_proof), m)
        if use_jumps:
            m = m * batch["jump_w"].float()
        # m ((1 - alpha) CE + alpha T^2 KL), divided by the step's trainable rows (not by sum m: that cancels m)
        w_ce, w_kd = m * (1 - alpha) / n_norm, m * alpha * T * T / n_norm
        teacher = batch_teacher(batch, t_index, T)
        # h (B, L, C) final-normed hidden states -> the trainable rows (R, C), through the lm_head W (V, C)
        loss, sums = with_head(model, batch["idx"], lambda h, W: kd_loss(
            h.flatten(0, 1)[batch["sel"]], W, batch["targets"], w_ce, w_kd, teacher, T, kd_mode, chunk, kd_impl))
    return loss, torch.cat([sums, sums.new_tensor([R])])


def with_head(model, idx, fn):
    """fn(h (B, L, C) final-normed hidden states of idx, the lm_head weight (V, C)): inside forward when FSDP shards
    the head (it gathers the weight there, and reduces its gradient), else on what forward returns."""
    if sharded(model):
        return model(idx, head_fn=fn)
    return fn(model(idx, hidden_only=True), unwrap(model).lm_head.weight)


EVAL_GROUPS = ("jump", "reasoning", "response")  # the rows where TKD claims its gain, each with its own mean KL


@torch.no_grad()
def evaluate(model, batches, val, *, temperature, t_index, kd_mode, chunk, device, autocast, batch_size=2,
             kd_impl="fused"):
    """Held-out windows: mean CE, KL to the teacher at T, top-1 agreement, tail-mass gap, and per EVAL_GROUPS group
    its mean KL and row count (kl_jump, rows_jump, ...; the KL None where the group is empty)."""
    model.eval()
    sums = dict.fromkeys(ROW_STATS + ("rows",), 0.0)
    group_kl, group_rows = dict.fromkeys(EVAL_GROUPS, 0.0), dict.fromkeys(EVAL_GROUPS, 0)
    for i in range(0, len(val), batch_size):
        b = batches.batch(val[i:i + batch_size], device)
        # masks (R,) of the EVAL_GROUPS rows: right after a topology jump (jump weight > 1), explore/examine targets,
        # response targets (every other row: prompt targets never reach a batch's rows)
        groups = dict(jump=b["jump_w"] > 1, reasoning=b["reasoning"], response=~b["reasoning"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            teacher = batch_teacher(b, t_index, temperature)
            # [(row slice, per-row stats)] of the trainable rows (R, C) of h (B, L, C)
            chunks = with_head(model, b["idx"], lambda h, W: list(kd_stats(
                h.flatten(0, 1)[b["sel"]], W, b["targets"], teacher, temperature, kd_mode, chunk, kd_impl)))
            for sl, st in chunks:
                for n in ROW_STATS:
                    sums[n] += st[n].double().sum().item()
                for g, mask in groups.items():
                    group_kl[g] += st["kl"].double()[mask[sl]].sum().item()
        sums["rows"] += len(b["sel"])
        for g, mask in groups.items():
            group_rows[g] += int(mask.sum())
    model.train()
    n = max(sums["rows"], 1)
    ev = dict(ce=sums["ce"] / n, kl=sums["kl"] / n, top1=sums["agree"] / n, tail_gap=sums["tail_gap"] / n)
    for g in EVAL_GROUPS:
        ev[f"kl_{g}"] = group_kl[g] / group_rows[g] if group_rows[g] else None
        ev[f"rows_{g}"] = group_rows[g]
    return ev


# -----------------------------------------------------------------------------
# Setup: inputs, the held-out split, the student, the optimizer


def load_inputs(args):
    """Cache, topology jump weights and windows, checked to belong together. Returns (cache, jump weight (N,) or
    None, windows (W, 4), difficulty (W,) or None (no curriculum), upstream fingerprints)."""
    cache = TeacherCache(args.cache, verify=not args.no_verify)
    if not os.path.isfile(cache.tokenizer_path):
        raise ValueError(f"{args.cache}: no tokenizer.json (the student is saved with the cache's tokenizer)")
    if args.kd_alpha > 0 and not cache.has_teacher:
        raise ValueError(f"{args.cache}: made with --teacher none, so --kd_alpha must be 0 (got {args.kd_alpha})")
    weight, topo_fp, win_fp = None, None, None
    if args.topology and not args.no_jumps:
        topo = load_topology(args.topology, args.cache, needed_by="train.py", verify=not args.no_verify)
        weight, topo_fp = topo.arrays["weight"], topo.fingerprint
    elif not args.no_jumps and cache.has_teacher and args.kd_alpha > 0:
        raise ValueError("--topology is needed for the jump weights (or pass --no_jumps)")
    if args.windows:
        w = load_windows(args.windows, args.cache, args.topology if topo_fp else None, needed_by="train.py",
                         verify=not args.no_verify)
        windows, win_fp = w.windows, w.fingerprint
        difficulty = w.difficulty if w.manifest.get("curriculum") else None
    else:  # plain fixed-stride windows, no curriculum
        windows, difficulty = fixed_windows(cache), None
    return cache, weight, windows, difficulty, dict(cache=cache.fingerprint, topology=topo_fp, windows=win_fp)


def split_docs(n_docs, fraction, seed):
    """A seeded document-level held-out split: (train mask over documents)."""
    n_val = 0 if fraction <= 0 or n_docs < 2 else max(1, round(fraction * n_docs))
    val = np.random.default_rng(seed).permutation(n_docs)[:n_val]
    mask = np.ones(n_docs, dtype=bool)
    mask[val] = False
    return mask


def build_student(args, cache, device):
    """The student in FP32 master weights on `device`; with --fsdp built on the host, sharded, and each process's
    shards moved to the device alone."""
    on = torch.device("cpu") if args.fsdp else device  # where it is built
    if args.init == "scratch":
        if not args.config:
            raise ValueError("--init scratch needs --config (a config.json)")
        cfg = Qwen3Config.from_json(args.config)
        with torch.device(on):
            model = Qwen3(cfg).init_weights(args.seed).to(on)
    else:
        if not args.no_verify and os.path.isdir(args.init):  # a student of an earlier run: against its checksums
            verify_folder(args.init)
        model = Qwen3.from_pretrained(args.init, dtype=torch.float32, device=on)
    tok_vocab = int(np.asarray(cache.tokens).max()) + 1
    need = max(tok_vocab, cache.manifest.get("teacher_vocab_size") or 0)
    if model.config.vocab_size < need:
        raise ValueError(f"student vocabulary {model.config.vocab_size} is smaller than the teacher's ids / tokens "
                         f"(need {need}; cache {args.cache})")
    if args.fsdp:
        model = shard_model(model, args.dtype).to(device)
    model.gradient_checkpointing = args.grad_ckpt
    return model


def configure_optimizer(model, lr, weight_decay):
    """AdamW with weight decay on matrices only. Fused (one pass over each parameter, its gradient and state) on CPU
    and CUDA, as transformers' Trainer defaults to: 6x faster on a CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, fused=params[0].device.type in ("cpu", "cuda"))


# -----------------------------------------------------------------------------
# The run's picture: report.html beside train_log.jsonl, redrawn at every evaluation

def write_report(run):
    """report.html beside train_log.jsonl, from the log as it stands (atomic: a browser never sees half a page)."""
    a = run.args
    steps, evals = read_log(run.log.path)
    flags = [f for f in ("no_jumps", "no_proof_weight", "no_curriculum") if getattr(a, f)]
    facts = [("student", a.init if a.init != "scratch" else f"scratch, {a.config}"), ("cache", a.cache),
             ("windows", a.windows or "fixed 512-token windows"), ("KL", f"{a.kd_mode}, T = {a.temperature}"),
             ("ablations", ", ".join("--" + f for f in flags) or "none (full TKD)"),
             ("seed", f"{a.seed} (held-out split {a.seed if a.split_seed is None else a.split_seed})")]
    page = training_page(steps, evals, run.total, f"Training run {a.out}", facts, step_phase)
    with atomic_write(os.path.join(a.out, "report.html")) as f:
        f.write(page)


@dataclass
class Run:
    """What the evaluation needs to know about the run (built once in main)."""
    batches: WindowBatches
    val: np.ndarray  # held-out window indices
    args: argparse.Namespace
    t_index: int
    device: torch.device
    autocast: bool
    log: RunLog
    master: bool
    total: int  # optimizer steps of the run


def run_eval(run, model, step):
    """Evaluate on the held-out windows (rank 0; every process with --fsdp, whose forward is collective), log the
    line, print it and redraw report.html; None when there is nothing to evaluate."""
    a = run.args
    if not ((run.master or sharded(model)) and len(run.val) and a.eval_every >= 0):
        if run.master:
            write_report(run)
        return None
    ev = evaluate(model, run.batches, run.val, temperature=a.temperature, t_index=run.t_index, kd_mode=a.kd_mode,
                  chunk=a.loss_chunk, device=run.device, autocast=run.autocast, batch_size=a.batch_size,
                  kd_impl=a.kd_impl)
    has_teacher = run.batches.cache.has_teacher
    if not has_teacher:
        ev = dict(ce=ev["ce"])
    run.log.record(dict(eval_step=step, **ev))
    # never a student marked complete with a nan evaluation (a row group with no rows is None, not nan)
    if not all(math.isfinite(v) for v in ev.values() if v is not None):
        raise ValueError(f"NaN guard at the evaluation of step {step}: " + ", ".join(f"{k} {v}" for k, v in
                         ev.items()) + " on the held-out windows; the run stops here and is not marked complete")
    if not run.master:
        return ev
    kd = (f" | kl {ev['kl']:.4f} | top-1 agreement {ev['top1']:.3f} | tail gap {ev['tail_gap']:+.4f}"
          if has_teacher else "")
    print(f"eval step {step}: ce {ev['ce']:.4f}{kd} ({len(run.val)} held-out windows)", flush=True)
    write_report(run)
    return ev


# -----------------------------------------------------------------------------
# main


def accumulate(run, train_model, micro, n_norm, alpha, w_proof, world):
    """Forward and backward of this process's micro-batches (window-index arrays) of one optimizer step, the
    gradients summed in place. Returns (STEP_STATS sums over every process, this process's model FLOPs)."""
    a, ddp = run.args, world > 1
    model = unwrap(train_model)
    fsdp = sharded(model)
    sums, flops = dict.fromkeys(STEP_STATS, 0.0), 0.0
    for i, mb in enumerate(micro):
        batch = run.batches.batch(mb, run.device)
        # DDP all-reduces the gradients on the last micro-batch only; FSDP reduce-scatters after each, which keeps
        # the gradients sharded (skipping it would hold them whole until the last micro-batch)
        sync = not ddp or fsdp or i == len(micro) - 1
        with (train_model.no_sync() if not sync else contextlib.nullcontext()):
            loss, s = micro_step(train_model, batch, alpha=alpha, w_proof=w_proof, temperature=a.temperature,
                                 t_index=run.t_index, kd_mode=a.kd_mode, n_norm=n_norm, chunk=a.loss_chunk,
                                 use_jumps=not a.no_jumps, use_proof=not a.no_proof_weight, autocast=run.autocast,
                                 kd_impl=a.kd_impl)
            (loss * world).backward()  # DDP and FSDP average over processes; the loss is already a share of the sum
        for n, v in zip(ROW_STATS + ("rows",), s.tolist()):
            sums[n] += v
        sums["tokens"] += batch["ntok"]
        # model FLOPs of the real tokens, each window's attention at its own length (padding is not useful work)
        flops += sum(n * model.config.flops_per_token(n) for n in batch["lengths"])  # this process's share
        sums["objective"] += loss.item()
    if ddp:  # every process's sums, added up (NCCL reduces device tensors only)
        import torch.distributed as dist
        vec = torch.tensor([sums[n] for n in STEP_STATS], dtype=torch.float64, device=run.device)
        dist.all_reduce(vec)
        sums = dict(zip(STEP_STATS, vec.tolist()))
    return sums, flops


def guarded_update(model, opt, grad_clip, losses, describe, step, ckpt_dir, checkpoint):
    """Clip, then AdamW, behind the NaN guard: a non-finite loss part or gradient never reaches the weights, and
    non-finite weights are never saved. describe(grad_norm): the step, for the message; checkpoint(step) saves the
    weights before this step (None on processes that do not write). Returns the norm before clipping."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    guard = describe(gnorm)
    if not all(map(math.isfinite, (*losses, gnorm))):
        opt.zero_grad(set_to_none=True)
        kept = ""
        if checkpoint:  # the weights before this step: finite, as checked after every update
            try:
                checkpoint(step)
                kept = f"; the weights before it are in {ckpt_dir} (step {step})"
            except ValueError as e:  # an optimizer moment is not finite: the checkpoint in place stays
                kept = f"; {e}"
        raise ValueError(f"NaN guard {guard}: a non-finite loss or gradient; the step was not applied{kept}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    if non_finite(dict(model.named_parameters())):
        last = find_checkpoint(ckpt_dir) if checkpoint else None
        if last:
            with open(os.path.join(last, "state.json")) as f:
                last = f"{last} (step {json.load(f)['step']})"
        raise ValueError(f"NaN guard {guard}: the update made the weights non-finite; they are not saved"
                         + (f"; the last finite checkpoint is {last}" if last else "; no checkpoint was written"))
    return gnorm


def check_args(args):
    """Flag values a run cannot start with: a ValueError naming the flag and the value."""
    check_ranges(args, kd_alpha="[0, 1]", temperature="(0, inf)", lr="(0, 1]", min_lr="[0, 1]", warmup="[0, inf)",
                 weight_decay="[0, inf)", grad_clip="(0, inf]", batch_size="[1, inf)", grad_accum="[1, inf)",
                 epochs="(0, inf)", max_steps="[0, inf)", val_fraction="[0, 1)", eval_windows="[0, inf)",
                 eval_every="[-1, inf)", ckpt_every="[0, inf)", log_every="[1, inf)", loss_chunk="[1, inf)",
                 seed="[0, inf)", peak_flops="[0, inf)")
    if args.split_seed is not None:
        check_ranges(args, split_seed="[0, inf)")
    if args.min_lr > args.lr:
        raise ValueError(f"--min_lr {args.min_lr}: above --lr {args.lr} (the cosine goes down to it)")
    if not all(0 < w < math.inf for w in args.proof_weight):
        raise ValueError(f"--proof_weight {args.proof_weight}: both must be positive and finite")
    parse_pools(args.pools)  # a ValueError for a bad --pools, before any work
    if not 0 <= args.alpha_start <= args.alpha_full <= 1:
        raise ValueError(f"--alpha_start {args.alpha_start} and --alpha_full {args.alpha_full}: need 0 <= start <= full"
                         " <= 1 (fractions of training)")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    if args.grad_accum % world:
        raise ValueError(f"--grad_accum {args.grad_accum} must be divisible by the {world} processes")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp needs torchrun: torchrun --nproc_per_node=N train.py --fsdp ...")
    default_impl, args.kd_impl = check_impl(args.kd_mode, None), check_impl(args.kd_mode, args.kd_impl)
    return default_impl  # the fingerprint leaves --kd_impl out at its mode's default


def plan_curriculum(args, cache, windows, difficulty, step_batch):
    """The held-out split and the whole run's draws, fixed at the start by the seed.
    Returns (held-out windows, nested pools per phase, steps, schedule (steps, step_batch), alpha per step)."""
    split_seed = args.seed if args.split_seed is None else args.split_seed
    is_train = split_docs(cache.n_docs, args.val_fraction, split_seed)[windows[:, 0]]  # (W,) by document
    train_w, val_w = np.flatnonzero(is_train), np.flatnonzero(~is_train)[:args.eval_windows]
    if len(train_w) == 0:
        raise ValueError(f"no training windows (all {len(windows)} held out: lower --val_fraction)")
    # phase p draws from the easiest pool_fractions[p] of the training windows (nested pools, ranked over the
    # training windows only: the held-out ones would shift the fractions), or from all of them
    pool_fractions = parse_pools(args.pools)
    n_phases = len(pool_fractions)
    if difficulty is None or args.no_curriculum:
        pools = [train_w] * n_phases
    else:
        first = pool_phases(difficulty[train_w], pool_fractions)  # (len(train_w),) first pool of each window
        pools = [train_w[first <= p] for p in range(n_phases)]
    total = args.max_steps or math.ceil(args.epochs * len(train_w) / step_batch)
    schedule = draw_schedule(pools, total, step_batch, args.seed)  # (total, step_batch) window indices
    alphas = np.array([kd_alpha(s, total, args.kd_alpha, args.alpha_start, args.alpha_full) for s in range(total)])
    return val_w, pools, total, schedule, alphas


def run_fingerprint(args, upstream, step_batch, default_impl):
    """What the run's result depends on: not how a step's windows are cut into micro-batches (step_batch is the
    step), so a run stopped by an out-of-memory error resumes with a smaller --batch_size, a larger --grad_accum."""
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "log_every", "eval_every", "ckpt_every",
                                                                  "device", "compile", "out", "force", "peak_flops",
                                                                  "batch_size", "grad_accum", "no_verify", "fsdp")}
    if args.split_seed is None:  # the split follows --seed, as before --split_seed existed: older runs still resume
        del settings["split_seed"]
    if args.kd_impl == default_impl:  # likewise for runs made before --kd_impl
        del settings["kd_impl"]
    run_id = lambda s: sha256_json(dict(settings=s, upstream=upstream, world_batch=step_batch))
    made = folder_manifest(args.out)  # a folder made before the split left the fingerprint: the same run, if its
    then = made.get("args") or {}     # fingerprint is the old one, computed with the split it was made with
    legacy = run_id(dict(settings, batch_size=then.get("batch_size"), grad_accum=then.get("grad_accum")))
    return legacy if made.get("fingerprint") == legacy else run_id(settings)


def open_run(args, model, opt, fingerprint, total, rank, world):
    """The output folder (refused if another run's) and the checkpoint to resume from.
    Returns (start step, the first evaluation kept in the checkpoint), or None when the student is already there."""
    state = prepare_out(args.out, "student", fingerprint, args.force, rank, world)
    if state == "done":
        if rank == 0:
            print(f"{args.out}: a complete student of the same run is already there; nothing to do")
        return None
    if rank == 0 and state == "fresh":
        write_json(os.path.join(args.out, "manifest.json"), dict(phase="student", version=FORMAT_VERSION,
                   fingerprint=fingerprint, args=vars(args), complete=False))
    found = find_checkpoint(os.path.join(args.out, "ckpt"))
    if found and not args.resume:
        raise ValueError(f"{found}: a checkpoint is there; pass --resume to continue it or remove it")
    if not found:
        if args.resume and rank == 0:
            print(f"--resume: no checkpoint in {args.out}, starting from step 0")
        return 0, None
    st = load_checkpoint(found, model, opt, fingerprint)
    if rank == 0:
        print(f"resuming from {found} at step {st['step']}/{total}")
    return st["step"], st.get("first_eval")


def step_micro_batches(batches, ws, args, rank, accum):
    """This process's micro-batches of one step's windows ws (step_batch,), and the step's trainable rows. Windows of
    similar length share a micro-batch, cut where the fewest tokens are padding (split_micro)."""
    lengths = batches.lengths(ws)
    order = np.argsort(lengths, kind="stable")
    ws, cuts = ws[order], split_micro(lengths[order], args.grad_accum, args.batch_size)
    micro = [ws[a:b] for a, b in zip(cuts[:-1], cuts[1:])][rank * accum:(rank + 1) * accum]
    return micro, max(batches.count(ws), 1)  # the rows: the same on every process


def summary_line(args, steps, step_batch, tokens, seconds, first_eval, last_eval):
    held = ""
    if first_eval and last_eval:
        held = "; held-out " + ", ".join(f"{k.upper()} {first_eval[k]:.4f} -> {last_eval[k]:.4f}"
                                         for k in ["kl", "ce"] if k in last_eval)
    return f"train: {steps} steps of {step_batch} windows, {tokens:,} tokens, {seconds:.0f}s{held} -> {args.out}"


def mfu_peak(args, model, windows, device, autocast, master):
    """The MFU denominator (peak_flops), printed with where it comes from and the model's FLOPs per token."""
    peak, peak_source = peak_flops(device, torch.bfloat16 if autocast else torch.float32, args.peak_flops)
    if master:
        mean_len = int(np.mean(windows[:, 3] - windows[:, 1]))
        print(f"MFU against a peak of {peak / 1e12:.3g} TFLOP/s ({peak_source}); the model takes "
              f"{model.config.flops_per_token(mean_len) / 1e6:,.1f} MFLOP per trained token at the mean window "
              f"length {mean_len} (Qwen3Config.flops_per_token)", flush=True)
    return peak


def step_schedules(args, opt, alphas, step, total):
    """This step's alpha, proof weight and learning rate (the lr set on the optimizer)."""
    lr = learning_rate(step, total, args.lr, args.min_lr, args.warmup)
    for g in opt.param_groups:
        g["lr"] = lr
    return float(alphas[step]), proof_weight(step, total, *args.proof_weight), lr


def log_step(run, step, n_phases, sums, values, mfu_flops, tokens_done, start, t0, t_start):
    """One log line per step (its loss parts per trainable row, the schedules' `values`, tok/s and MFU); a printed
    line every --log_every steps (and the first and last). mfu_flops: this step's model FLOPs over the peak."""
    n, total, dt = max(sums["rows"], 1), run.total, time.time() - t0
    entry = dict(step=step + 1, total=total, phase=step_phase(step, total, n_phases), ce=sums["ce"] / n,
                 kl=sums["kl"] / n, top1=sums["agree"] / n if run.batches.cache.has_teacher else None,
                 loss=sums["objective"], alpha=values["alpha"], proof_weight=values["proof_weight"], lr=values["lr"],
                 grad_norm=values["grad_norm"], tok_s=tokens_done / max(time.time() - t_start, 1e-9),
                 mfu=mfu_flops / dt, rows=int(n), dt=dt)
    run.log.record(entry)
    step, total = entry["step"], entry["total"]
    if run.master and (step % run.args.log_every == 0 or step == total or step - 1 == start):
        eta = (total - step) * (time.time() - t_start) / (step - start)
        print(f"step {step}/{total} | phase {entry['phase']} | ce {entry['ce']:.4f} | kl {entry['kl']:.4f} | "
              f"loss {entry['loss']:.4f} | alpha {entry['alpha']:.3f} | w_proof {entry['proof_weight']:.3f} | "
              f"lr {entry['lr']:.2e} | gnorm {entry['grad_norm']:.3f} | {entry['tok_s']:,.0f} tok/s | "
              f"MFU {entry['mfu']:.1%} | ETA {fmt_time(eta)}", flush=True)


def finish(run, model, fingerprint, upstream, pools, schedule, alphas, tokens_done, first_eval, last_eval,
           weights=None):
    """The student folder, draws.npy, the complete manifest; the checkpoint is removed (the student supersedes it).
    weights: a sharded model's, gathered (checkpoint.gather_weights)."""
    args = run.args
    save_student(args.out, model, run.batches.cache, args.save_dtype, weights)
    run.log.close()
    # the curriculum as drawn: draws.npy, how often each window was drawn, and per difficulty band a summary
    save_npy(os.path.join(args.out, "draws.npy"),
             np.bincount(schedule.ravel(), minlength=len(run.batches.windows)).astype(np.int32))
    bands = [np.setdiff1d(pools[p], pools[p - 1] if p else []) for p in range(len(pools))]
    curriculum = dict(pools=list(parse_pools(args.pools)), pool_windows=[len(p) for p in pools], ranked_over="training "
                      "windows", bands=draws_summary(schedule, bands, alphas))
    made = folder_manifest(args.init) if os.path.isdir(args.init) else {}  # a student folder of an earlier run
    write_json(os.path.join(args.out, "manifest.json"), dict(
        phase="student", version=FORMAT_VERSION, fingerprint=fingerprint, args=vars(args), upstream=upstream,
        init=dict(name=args.init, fingerprint=made.get("fingerprint"), sha256=made.get("sha256")), steps=run.total,
        tokens=tokens_done, first_eval=first_eval, last_eval=last_eval, curriculum=curriculum, complete=True,
        sha256=checksums(args.out, sorted(f for f in os.listdir(args.out) if f.endswith(".safetensors") or f in
                                          ("config.json", "model.safetensors.index.json")))))
    ckpt_dir = os.path.join(args.out, "ckpt")
    for f in [ckpt_dir, ckpt_dir + ".tmp", ckpt_dir + ".old"]:
        shutil.rmtree(f, ignore_errors=True)


def main(args):
    # --- 1. the flags, processes, device and the run's size ---------------------------------------------------
    default_impl = check_args(args)
    check_device(args.device)  # before any folder: cuda on a machine without it is one line, not a traceback
    rank, world, args.device = init_distributed(args.device, always=args.fsdp)
    ddp, master, fsdp = world > 1, rank == 0, args.fsdp
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    accum = args.grad_accum // world  # micro-batches per process: the global batch stays batch x grad_accum
    step_batch = args.batch_size * args.grad_accum  # windows per optimizer step, all processes together

    # --- 2. inputs, the held-out split and the curriculum schedule ---------------------------------------------
    cache, weight, windows, difficulty, upstream = load_inputs(args)
    t_index = cache.temperature_index(args.temperature) if cache.has_teacher else 0
    batches = WindowBatches(cache, windows, None if weight is None else np.asarray(weight))
    val_w, pools, total, schedule, alphas = plan_curriculum(args, cache, windows, difficulty, step_batch)

    # --- 3. the student, its optimizer, the output folder, resume -----------------------------------------------
    model = build_student(args, cache, device)
    opt = configure_optimizer(model, args.lr, args.weight_decay)
    fingerprint = run_fingerprint(args, upstream, step_batch, default_impl)
    opened = open_run(args, model, opt, fingerprint, total, rank, world)
    if opened is None:
        return
    start, first_eval = opened
    train_model = wrap_model(model, args.compile, ddp, device)
    autocast = args.dtype == "bfloat16"
    log = RunLog(os.path.join(args.out, "train_log.jsonl"), start, enabled=master)
    peak = mfu_peak(args, model, windows, device, autocast, master)
    run = Run(batches, val_w, args, t_index, device, autocast, log, master, total)
    ckpt_dir = os.path.join(args.out, "ckpt")
    checkpoint = lambda step: save_checkpoint(ckpt_dir, model, opt, dict(step=step, fingerprint=fingerprint,
                                                                         total=total, first_eval=first_eval))

    # --- 4. the training loop ------------------------------------------------------------------------------------
    if start == 0:
        first_eval = run_eval(run, model, 0)
    t_start, tokens_done = time.time(), 0
    model.train()
    (got, restore_handlers), stop = stop_requests(), False
    for step in range(start, total):
        t0 = time.time()
        alpha, w_proof, lr = step_schedules(args, opt, alphas, step, total)
        # this step's windows, cut into micro-batches; this process forwards and backwards its share of them
        micro, n_norm = step_micro_batches(batches, schedule[step], args, rank, accum)
        sums, flops = accumulate(run, train_model, micro, n_norm, alpha, w_proof, world)
        n = max(sums["rows"], 1)
        ce, kl = sums["ce"] / n, sums["kl"] / n  # per trainable row
        # clip and AdamW, behind the NaN guard
        gnorm = guarded_update(model, opt, args.grad_clip, (ce, kl, sums["objective"]), lambda g: (
            f"at step {step + 1}/{total}: ce {ce:.6g}, kl {kl:.6g}, loss {sums['objective']:.6g}, grad norm {g:.6g} "
            f"(alpha {alpha:.3f}, lr {lr:.3g})"), step, ckpt_dir, checkpoint if master or fsdp else None)
        tokens_done += int(sums["tokens"])
        log_step(run, step, len(pools), sums, dict(alpha=alpha, proof_weight=w_proof, lr=lr, grad_norm=gnorm),
                 flops / peak, tokens_done, start, t0, t_start)
        # evaluation, then the checkpoint (so a resume from it keeps the evaluation of its step)
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 < total:
            run_eval(run, model, step + 1)
        stop = step + 1 < total and stopped(got, ddp, device)  # SIGTERM / SIGINT: save this step and leave
        due = args.ckpt_every > 0 and (step + 1) % args.ckpt_every == 0 and step + 1 < total
        if (master or fsdp) and (stop or due):  # rank 0 writes it; with --fsdp each process its shards
            checkpoint(step + 1)
        if stop:
            break
    restore_handlers()
    if not stop:  # --- 5. the student folder and the summary ----------------------------------------------------
        last_eval = run_eval(run, model, total)
        weights = gather_weights(model, getattr(torch, args.save_dtype)) if fsdp else None  # every process
        if master:
            finish(run, model, fingerprint, upstream, pools, schedule, alphas, tokens_done, first_eval, last_eval,
                   weights)
            print(summary_line(args, total - start, step_batch, tokens_done, time.time() - t_start, first_eval,
                               last_eval))
    if ddp or fsdp:
        del train_model  # the DDP wrapper holds the process group (see close_distributed)
        close_distributed()
    if stop:
        raise SystemExit(f"train.py: stopped by {got[0]} after step {step + 1}/{total}; the checkpoint is in "
                         f"{ckpt_dir}: run the same command with --resume to go on")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="student: Hub id, local folder, or 'scratch' (with --config)")
    p.add_argument("--config", default=None, help="config.json of a student trained from scratch")
    p.add_argument("--cache", default="out/cache", help="cache_teacher.py folder")
    p.add_argument("--topology", default=None, help="topology.py folder (jump weights)")
    p.add_argument("--windows", default=None, help="windows.py folder (else fixed 512-token windows, no curriculum)")
    p.add_argument("--out", default="out/student", help="output folder")
    # the model card's numbers
    p.add_argument("--kd_alpha", type=float, default=0.45, help="KD weight reached at --alpha_full (card: 0.45)")
    p.add_argument("--alpha_start", type=float, default=0.15, help="fraction of training before which the KD weight "
                   "is 0 (card: 15%%)")
    p.add_argument("--alpha_full", type=float, default=0.45, help="fraction of training at which the KD weight reaches "
                   "--kd_alpha, linearly from --alpha_start (card: 45%%; equal to it: a step)")
    p.add_argument("--pools", default=",".join(f"{f:.2f}" for f in POOLS), help="curriculum: phase p of equal steps "
                   "draws from the easiest pools[p] of the training windows (card: 30/55/80/100%%)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature (card: 2.0)")
    p.add_argument("--proof_weight", type=float, nargs=2, default=[2.25, 1.1], help="explore/examine loss "
                   "multiplier, first and last step (card: 2.25 -> 1.1)")
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (card: 5e-6)")
    p.add_argument("--min_lr", type=float, default=5e-7, help="final learning rate of the cosine (card: 5e-7)")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps (card: 30)")
    p.add_argument("--weight_decay", type=float, default=1e-3, help="AdamW weight decay, matrices only (card: 1e-3)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (card: 1.0)")
    p.add_argument("--batch_size", type=int, default=2, help="windows per micro-batch on average (card: 2); a step's "
                   "windows are cut by length into the micro-batches with the fewest padded tokens, none over "
                   "batch_size x the step's longest window")
    p.add_argument("--grad_accum", type=int, default=16, help="micro-batches per step, all processes together (card: "
                   "16); --resume may change it and --batch_size (after running out of memory) if their product stays")
    # run length, ablations, mechanics
    p.add_argument("--epochs", type=float, default=1.0, help="sets the steps: epochs x training windows draws (the "
                   "curriculum draws easy windows more often; see draws.npy)")
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    p.add_argument("--kd_mode", choices=list(DIVERGENCES), default="tail", help="the divergence, from kd.DIVERGENCES: "
                   + "; ".join(f"{k}: {doc_line(f)}" for k, f in DIVERGENCES.items()))
    p.add_argument("--kd_impl", choices=["fused", "plain"], default=None, help="the loss's implementation (kd.py): "
                   "fused (fast, closed-form gradient) or plain (autograd); default: fused where the mode has it")
    p.add_argument("--no_jumps", action="store_true", help="ablation: no 1.25x after topology jumps")
    p.add_argument("--no_proof_weight", action="store_true", help="ablation: explore/examine weighted 1.0")
    p.add_argument("--no_curriculum", action="store_true", help="ablation: every phase draws from all windows")
    p.add_argument("--val_fraction", type=float, default=0.05, help="documents held out for evaluation (seeded)")
    p.add_argument("--eval_windows", type=int, default=64, help="at most this many held-out windows per evaluation")
    p.add_argument("--eval_every", type=int, default=50, help="evaluate every N steps (0: start and end, -1: never)")
    p.add_argument("--ckpt_every", type=int, default=50, help="resumable checkpoint every N steps (0: never)")
    p.add_argument("--no_verify", action="store_true", help="skip the checksums of the input folders' files")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--log_every", type=int, default=1, help="print a step line every N steps")
    p.add_argument("--loss_chunk", type=int, default=LOSS_CHUNK, help="rows whose full logits exist at once")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="autocast dtype (weights fp32)")
    p.add_argument("--save_dtype", choices=["bfloat16", "float32"], default="bfloat16", help="saved student's dtype")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (recompute each layer)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the student's weights, gradients and "
                   "AdamW state over the processes (FSDP2), for a student larger than one GPU")
    p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s for the MFU (0: a known GPU's "
                   "datasheet, else a matmul measured at start)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=1337, help="split, curriculum shuffles and scratch init")
    p.add_argument("--split_seed", type=int, default=None, help="seed of the held-out split alone (default: --seed; "
                   "ablate.py fixes it, so every seed is measured on the same held-out documents)")
    return p


if __name__ == "__main__":
    cli("train.py", main, get_parser, "run the same command with --resume (it goes on from the last checkpoint)")
