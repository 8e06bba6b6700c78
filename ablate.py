"""
Does topology help? The seeded ablation harness: the recipe with each ingredient removed, several seeds each,
measured on the same held-out documents, as a table of mean +- std and a picture.

Variants (--variants; each one is a real train.py command line, so its manifest records its flags):
  full             the recipe: topology windows + curriculum, 1.25x after jumps, proof weight, exact top-k + tail KL
  standard_kd      plain KD: fixed-stride windows (windows.py --fixed_stride), --no_jumps --no_proof_weight
                   --no_curriculum
  no_jumps, no_proof_weight, no_curriculum      one ingredient removed, the rest kept
  fixed_windows    windows.py --fixed_stride windows alone (without topology windows there is no difficulty, so no
                   curriculum either: all fixed windows are in every pool)
  renorm           --kd_mode renorm: KL over the renormalised top-k instead of top-k + tail bucket
The student (--init):
  warm (default)   as on the card, a pretrained student that distillation refines: per seed, the demo's student shape
                   first trained on plain next-token loss (train.py --kd_alpha 0, --pretrain_steps, fixed windows of
                   the training documents only), its held-out CE curve on the page; every variant of that seed starts
                   from that same checkpoint (train.py --init FOLDER) and distils for --epochs, so the curriculum's four
                   phases and the alpha ramp play out
  scratch          the demo's student from random weights, --steps optimizer steps (the harness before warm starts)
Every run has the same seeds (--seeds: the init, the pretraining and the curriculum shuffles), the same step of
--batch_size x --grad_accum = 32 windows, and the same held-out documents (--split_seed fixes train.py's split).

Metrics per run, all on the same rows whatever the variant: the held-out documents cut by the demo's topology
windows, the teacher's KL always the exact top-k + tail one at T=2, and the jump rows taken from the demo's topology:
  kl, ce, top1       KL to the teacher (T=2), CE on the real next token, top-1 agreement (train.evaluate)
  kl_jump            the KL over rows right after a topology jump (jump weight > 1), where TKD claims its gain ...
  kl_reasoning       ... over explore/examine targets (the rows the proof weight multiplies) ...
  kl_response        ... and over response targets
  layout             the share of greedy answers to --prompts held-out questions that hold <explore>, <examine>,
                     <response> in order (generate.dualmind_check)
The table gives, per variant, the mean +- std (sample std) over seeds and the paired difference to full TKD: the
mean over seeds of (variant - full TKD) of the same seed, both runs having started from the same checkpoint, with *
when it exceeds two standard errors of that mean, sd(differences) / sqrt(seeds).

Inputs   --demo (default out/demo): the demo's cache/, topology/ and windows/ (and tokenizer), built by
         `STOP_AFTER=windows bash demo.sh` when missing; --config (the student's config.json)
Outputs  in --out (default out/ablation):
  windows_fixed/                    windows.py --fixed_stride (shared by standard_kd and fixed_windows)
  runs/pretrain/seed<s>/            the warm start of seed s (train.py --kd_alpha 0): the init of every variant
  runs/<variant>/seed<s>/           train.py's student folder (manifest.json, train_log.jsonl, report.html), its
                                    printed lines (train.log) and metrics.json (this harness's measurements, with
                                    the train.py command line); a run with metrics.json is complete and skipped
  ablation.json                     config, machine, wall time, every run's metrics, the summary statistics
  ablation.html                     the table, one chart per metric (each seed's paired difference to full TKD as a
                                    dot, their mean +- 2 SE) and the pretraining's held-out CE curves

Run
  python ablate.py                                  # warm start, 5 variants x 5 seeds, 4 x 8 windows a step
  python ablate.py --batch_size 8 --grad_accum 4 --out out/ablation_8x4    # the same, another micro-batch split
  python ablate.py --init scratch --seeds 1 2 3 --variants full standard_kd no_jumps no_proof_weight \
      no_curriculum fixed_windows renorm --steps 120 --out out/ablation_scratch      # from scratch, as before
  python ablate.py --device cuda --scale large --demo out/demo_large   # a teacher ~15x and a student ~20x larger
      (data/*_large_config.json; demo.sh builds out/demo_large with them on the GPU): sized for about 10 minutes on
      one H100, unmeasured
  python ablate.py --quick --out /tmp/abl           # a smoke run: 2 variants x 2 seeds, 2 steps (the tests)
"""

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from cache_teacher import TeacherCache
from checkpoint import read_log, read_student
from common import BLOCKS, USER, atomic_write, check_ranges, cli, dualmind_prompt, fmt_time, write_json
import train
import windows
from generate import complete, dualmind_check, load as load_model
from pages import ablation_page
from topology import load as load_topology
from train import LOSS_CHUNK, evaluate, split_docs
from windows import WindowBatches, load as load_windows

ROOT = os.path.dirname(os.path.abspath(__file__))
# variant -> (train.py flags, fixed-stride windows?, label in the table)
VARIANTS = {
    "full": ([], False, "full TKD"),
    "standard_kd": (["--no_jumps", "--no_proof_weight", "--no_curriculum"], True, "standard KD"),
    "no_jumps": (["--no_jumps"], False, "no jumps"),
    "no_proof_weight": (["--no_proof_weight"], False, "no proof weight"),
    "no_curriculum": (["--no_curriculum"], False, "no curriculum"),
    "fixed_windows": ([], True, "no topology windows"),
    "renorm": (["--kd_mode", "renorm"], False, "renorm KL"),
}
# metric -> (name, better when higher); the order of the table's columns and of the page's charts
METRICS = {
    "kl": ("KL to teacher (T=2)", False), "kl_jump": ("KL after a jump", False),
    "kl_reasoning": ("KL explore/examine", False), "kl_response": ("KL response", False),
    "ce": ("CE (nats)", False), "top1": ("top-1 agreement", True), "layout": ("DualMind layout rate", True),
}
# every run in float32 rather than the demo's bf16 autocast, so that the differences between variants are not bf16
# rounding; the learning rates: demo.sh's for a student from random weights (the card's 5e-6 would not move it), a
# third of them for a warm student, which distillation refines rather than relearns
COMMON = ["--dtype", "float32", "--save_dtype", "float32", "--log_every", "25", "--ckpt_every", "50"]
LR = dict(scratch=["--lr", "3e-3", "--min_lr", "3e-4", "--warmup", "10"],
          warm=["--lr", "1e-3", "--min_lr", "1e-4", "--warmup", "10"])
CONFIGS = dict(small="student_config.json", large="student_large_config.json")  # --scale: the student, in data/
# the defaults, and what --quick puts in place of every one that is not given
DEFAULTS = dict(variants=["full", "standard_kd", "no_jumps", "no_curriculum", "renorm"], seeds=[1, 2, 3, 4, 5],
                steps=0, epochs=2.0, pretrain_steps=150, batch_size=4, grad_accum=8, prompts=4, max_new_tokens=200,
                eval_windows=0)
QUICK = dict(variants=["full", "standard_kd"], seeds=[1, 2], steps=2, epochs=1.0, pretrain_steps=2, batch_size=2,
             grad_accum=1, prompts=2, max_new_tokens=8, eval_windows=4)

# -----------------------------------------------------------------------------
# Statistics (pure)


def mean_std(values):
    """(n, mean, sample standard deviation) of the values that are not None; std is None below two values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return 0, None, None
    m = sum(v) / len(v)
    return len(v), m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None)


def summarize(runs, metrics=tuple(METRICS), baseline="full"):
    """Per variant and metric, over the seeds: n, mean, std; and paired against the baseline variant: diffs (seed ->
    the variant's value minus the baseline's of the same seed), diff (their mean), se (their sample std / sqrt of
    their count: the standard error of that mean) and sig = |diff| > 2 se (None below two pairs).
    runs: dicts with variant, seed and metrics."""
    out = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        out[v] = {}
        for k in metrics:
            got = {r["seed"]: r["metrics"].get(k) for r in runs if r["variant"] == v}
            n, mean, std = mean_std(got.values())
            c = out[v][k] = dict(n=n, mean=mean, std=std, diffs={}, diff=None, se=None, sig=None)
            base = {r["seed"]: r["metrics"].get(k) for r in runs if r["variant"] == baseline}
            if v == baseline:
                continue
            c["diffs"] = {s: got[s] - base[s] for s in got if got[s] is not None and base.get(s) is not None}
            n_d, c["diff"], sd = mean_std(c["diffs"].values())
            if sd is not None:
                c["se"] = sd / math.sqrt(n_d)
                c["sig"] = abs(c["diff"]) > 2 * c["se"]
    return out


def cell(c, digits=4):
    """One table cell: 'mean ± std (diff*)', * when |diff| > 2 standard errors."""
    if c["mean"] is None:
        return "n/a"
    s = f"{c['mean']:.{digits}f}" + (f" ± {c['std']:.{digits}f}" if c["std"] is not None else "")
    if c["diff"] is not None:
        s += f" ({c['diff']:+.{digits}f}{'*' if c['sig'] else ''})"
    return s


def table(summary, metrics=tuple(METRICS)):
    """The summary as a Markdown table: a row per variant, a column per metric."""
    head = "| variant | " + " | ".join(METRICS[k][0] for k in metrics) + " |"
    rows = [head, "|" + "---|" * (len(metrics) + 1)]
    for v, cells in summary.items():
        rows.append(f"| {VARIANTS[v][2]} | " + " | ".join(cell(cells[k], 3 if k == "layout" else 4)
                                                         for k in metrics) + " |")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# The runs


def ensure_demo(demo, scale="small", device="cpu"):
    """The demo's cache, topology and windows, checked; built with `STOP_AFTER=windows bash demo.sh` when missing
    (with --scale large, from the larger teacher of data/teacher_large_config.json, on `device`)."""
    cache_dir, topo_dir, win_dir = (os.path.join(demo, p) for p in ("cache", "topology", "windows"))
    try:
        load_windows(win_dir, cache_dir, topo_dir, needed_by="ablate.py")
    except ValueError as e:
        print(f"ablate: the demo's artifacts are not complete ({e}); building them with demo.sh", flush=True)
        env = dict(os.environ, OUT=os.path.abspath(demo), STOP_AFTER="windows", PYTHON=sys.executable, DEVICE=device,
                   TEACHER_CONFIG=os.path.join(ROOT, "data", f"teacher{'_large' if scale == 'large' else ''}"
                                                             "_config.json"))
        subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, check=True)
        load_windows(win_dir, cache_dir, topo_dir, needed_by="ablate.py")
    return cache_dir, topo_dir, win_dir


def shared_flags(a, seed):
    """The flags every run of the harness shares: the step's split, the held-out split, the seed, the device."""
    return ["--batch_size", str(a.batch_size), "--grad_accum", str(a.grad_accum), "--val_fraction",
            str(a.val_fraction), "--split_seed", str(a.split_seed), "--seed", str(seed), "--device", a.device, *COMMON]


def pretrain_command(a, seed, cache_dir, out):
    """train.py's command line for the warm start of one seed: plain next-token training of the student from random
    weights on fixed windows of the training documents (the held-out ones are never seen), its held-out CE logged
    six times for the curve."""
    return ["--init", "scratch", "--config", a.config, "--cache", cache_dir, "--kd_alpha", "0", "--no_proof_weight",
            "--max_steps", str(a.pretrain_steps), "--eval_every", str(max(a.pretrain_steps // 6, 1)),
            "--eval_windows", "32", *shared_flags(a, seed), *LR["scratch"], "--out", out, "--resume"]


def train_command(a, variant, seed, cache_dir, topo_dir, win_dir, fixed_dir, out):
    """train.py's command line for one run (its arguments after `python train.py`): the student (the seed's warm
    start, or random weights), the variant's flags, --epochs or --steps."""
    flags, fixed, _ = VARIANTS[variant]
    init = (["--init", os.path.join(a.out, "runs", "pretrain", f"seed{seed}")] if a.init == "warm" else
            ["--init", "scratch", "--config", a.config])
    length = ["--max_steps", str(a.steps)] if a.steps else ["--epochs", str(a.epochs)]
    return [*init, "--cache", cache_dir, "--topology", topo_dir, "--windows", fixed_dir if fixed else win_dir,
            *length, "--eval_every", "0", "--eval_windows", str(a.eval_windows or 32),  # its report's first/last
            *shared_flags(a, seed), *LR[a.init], *flags, "--out", out, "--resume"]


def run_script(module, argv, log):
    """module.main on argv parsed by the script's own parser, as `python module.py argv` would run it (in this
    process: no interpreter and torch start-up per run), its printed lines going to the file `log`."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        print(f"$ python {module.__name__}.py {shlex.join(argv)}", flush=True)
        module.main(module.get_parser().parse_args(argv))


def held_out_questions(cache, docs, n):
    """The questions of the first n held-out documents, decoded from their prompt tokens (common.PROMPT)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(cache.tokenizer_path)
    out = []
    for d in docs[:n]:
        a, b = cache.doc_range(int(d))
        roles = np.asarray(cache.roles[a:b])
        text = tok.decode([int(t) for t in cache.tokens[a:a + int((roles == 0).sum())]])
        out.append(text.removeprefix(USER).strip())
    return out


def measure(folder, batches, val, questions, max_new_tokens, t_index, device="cpu"):
    """The metrics of one trained student: train.evaluate on the held-out windows (exact KL at T=2, the groups),
    and the DualMind layout rate of greedy answers to `questions`."""
    model, tok, eos = load_model(folder, device, torch.float32)
    ev = evaluate(model, batches, val, temperature=2.0, t_index=t_index, kd_mode="tail", chunk=LOSS_CHUNK,
                  device=torch.device(device), autocast=False)
    ok = []
    for q in questions:
        prompt = dualmind_prompt(q)
        answer, _ = complete(model, tok, tok.encode(prompt, add_special_tokens=False).ids, max_new_tokens, eos,
                             [f"</{BLOCKS[-1]}>"])
        ok.append(dualmind_check(prompt + answer)["ok"])
    return dict(ev, layout=sum(ok) / max(len(ok), 1), layout_ok=ok)


def machine():
    """What the figures were measured on."""
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(), system=platform.platform())


# -----------------------------------------------------------------------------
# main


def settle_args(args):
    """Fill the flags not given (from QUICK under --quick, else DEFAULTS) and refuse what cannot run."""
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.init == "scratch" and not args.steps:
        args.steps = 120  # the from-scratch harness as it was: 120 steps
    args.config = args.config or os.path.join(ROOT, "data", CONFIGS[args.scale])
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants {' '.join(unknown)}: unknown; choose from {', '.join(VARIANTS)}")
    if "full" not in args.variants:
        raise ValueError("--variants must include full: every difference is measured against it")
    check_ranges(args, steps="[0, inf)", epochs="(0, inf)", pretrain_steps="[1, inf)", batch_size="[1, inf)",
                 grad_accum="[1, inf)", split_seed="[0, inf)", val_fraction="(0, 1)", eval_windows="[0, inf)",
                 prompts="[0, inf)", max_new_tokens="[1, inf)")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds {args.seeds}: must be >= 0 and differ from each other")


def held_out_set(args, cache_dir, topo_dir, win_dir):
    """The held-out rows every run is measured on: the demo's topology windows of the held-out documents, and the
    held-out questions. A dict of is_train (D,) bool, val (window indices), batches, questions, t_index (of T=2)."""
    cache = TeacherCache(cache_dir)
    topo = load_topology(topo_dir, cache_dir, needed_by="ablate.py")
    win = load_windows(win_dir, cache_dir, topo_dir, needed_by="ablate.py")
    is_train = split_docs(cache.n_docs, args.val_fraction, args.split_seed)
    val = np.flatnonzero(~is_train[win.windows[:, 0]])
    val = val[:args.eval_windows] if args.eval_windows else val
    batches = WindowBatches(cache, win.windows, np.asarray(topo.arrays["weight"]))
    questions = held_out_questions(cache, np.flatnonzero(~is_train), args.prompts)
    if not len(val) or len(questions) < args.prompts:
        raise ValueError(f"--val_fraction {args.val_fraction} holds out {int((~is_train).sum())} of {cache.n_docs} "
                         f"documents: too few for {args.prompts} prompts (or none at all)")
    return dict(is_train=is_train, val=val, batches=batches, questions=questions, t_index=cache.temperature_index(2.0))


def run_one(args, variant, seed, dirs, held, label):
    """One run: train.py with the variant's flags, then its measurements into metrics.json (written last: a run
    folder holding it is complete, and is read back instead of trained again). Returns (the run's dict, whether it
    was trained now)."""
    folder = os.path.join(args.out, "runs", variant, f"seed{seed}")
    cmd = train_command(args, variant, seed, *dirs, folder)
    mpath = os.path.join(folder, "metrics.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            run = json.load(f)
        if run["command"] != cmd:
            raise ValueError(f"{mpath}: made by another command line (other --steps or inputs?); "
                             "choose another --out or pass --force")
        print(f"{label} {variant} seed {seed}: complete, skipped", flush=True)
        return run, False
    print(f"{label} {variant} seed {seed}: python train.py {shlex.join(cmd)}", flush=True)
    t0, c0 = time.time(), time.process_time()  # wall and CPU seconds (CPU: what a busy machine does not change)
    run_script(train, cmd, os.path.join(folder, "train.log"))
    t1, c1 = time.time(), time.process_time()
    metrics = measure(folder, held["batches"], held["val"], held["questions"], args.max_new_tokens, held["t_index"],
                      args.device)
    run = dict(variant=variant, seed=seed, folder=folder, command=cmd, metrics=metrics, train_s=t1 - t0,
               measure_s=time.time() - t1, train_cpu_s=c1 - c0, measure_cpu_s=time.process_time() - c1)
    write_json(mpath, run)  # written last: a run folder with metrics.json is complete
    return run, True


def pretrain_students(args, cache_dir):
    """The warm start of every seed (runs/pretrain/seed<s>, skipped when complete). Returns {seed: its held-out
    CE curve [[step, ce], ...], its manifest's fingerprint}."""
    out = {}
    for seed in args.seeds:
        folder = os.path.join(args.out, "runs", "pretrain", f"seed{seed}")
        cmd = pretrain_command(args, seed, cache_dir, folder)
        print(f"[pretrain seed {seed}] python train.py {shlex.join(cmd)}", flush=True)
        run_script(train, cmd, os.path.join(folder, "train.log"))
        curve = [[e["eval_step"], e["ce"]] for e in read_log(os.path.join(folder, "train_log.jsonl"))[1]]
        out[seed] = dict(ce_curve=curve, fingerprint=read_student(folder)["fingerprint"])
        print(f"    held-out CE {' -> '.join(f'{ce:.3f}' for _, ce in curve)}", flush=True)
    return out


def commit():
    """The git commit the harness ran at (None outside a git checkout)."""
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main(args):
    settle_args(args)
    if args.force:
        shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    t_start, c_start, load_start = time.time(), time.process_time(), os.getloadavg()
    cache_dir, topo_dir, win_dir = ensure_demo(args.demo, args.scale, args.device)
    fixed_dir = os.path.join(args.out, "windows_fixed")
    if any(VARIANTS[v][1] for v in args.variants):  # the fixed-stride windows, built once for every run using them
        run_script(windows, ["--cache", cache_dir, "--fixed_stride", "--out", fixed_dir],
                   os.path.join(fixed_dir, "windows.log"))
    held = held_out_set(args, cache_dir, topo_dir, win_dir)
    pretrain = pretrain_students(args, cache_dir) if args.init == "warm" else {}

    runs, plan = [], [(s, v) for s in args.seeds for v in args.variants]  # seed-major: early stops hold whole seeds
    for i, (seed, variant) in enumerate(plan):
        dirs = (cache_dir, topo_dir, win_dir, fixed_dir)
        run, trained = run_one(args, variant, seed, dirs, held, f"[{i + 1}/{len(plan)}]")
        runs.append(run)
        if not trained:
            continue
        metrics = run["metrics"]
        done = [x for x in runs if "train_s" in x]
        per_run = sum(x["train_s"] + x["measure_s"] for x in done) / len(done)
        kl_jump = "n/a" if metrics["kl_jump"] is None else f"{metrics['kl_jump']:.4f}"
        print(f"    kl {metrics['kl']:.4f} | kl after jumps {kl_jump} | "
              f"ce {metrics['ce']:.4f} | top-1 {metrics['top1']:.3f} | layout {metrics['layout']:.2f} | "
              f"train {run['train_s']:.0f}s + measure {run['measure_s']:.0f}s (CPU {run['train_cpu_s']:.0f}s + "
              f"{run['measure_cpu_s']:.0f}s) | ETA "
              f"{fmt_time(per_run * (len(plan) - i - 1))}", flush=True)

    summary = summarize(runs)
    # this call's wall and CPU time, and the runs' own (which also counts runs finished by an earlier call)
    result = dict(config=dict(vars(args)), machine=machine(), wall_s=time.time() - t_start,
                  cpu_s=time.process_time() - c_start, load_average=dict(start=load_start, end=os.getloadavg()),
                  runs_wall_s=sum(r["train_s"] + r["measure_s"] for r in runs),
                  runs_cpu_s=sum(r["train_cpu_s"] + r["measure_cpu_s"] for r in runs),
                  held_out=dict(documents=int((~held["is_train"]).sum()), windows=len(held["val"]),
                                rows=held["batches"].count(held["val"]), prompts=len(held["questions"])),
                  pretrain=pretrain, commit=commit(), runs=runs, summary=summary)
    write_json(os.path.join(args.out, "ablation.json"), result)
    with atomic_write(os.path.join(args.out, "ablation.html")) as f:
        f.write(ablation_page(result, {v: label for v, (_, _, label) in VARIANTS.items()}, METRICS, cell))
    print(table(summary))
    length = f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs"
    print(f"ablate: {len(runs)} runs ({len(args.variants)} variants x {len(args.seeds)} seeds, {args.init} start, "
          f"{length} of {args.batch_size} x {args.grad_accum} windows each) in {fmt_time(result['runs_wall_s'])} "
          f"({fmt_time(result['runs_cpu_s'])} CPU, {torch.get_num_threads()} threads, "
          f"load average {load_start[1]:.1f} -> {os.getloadavg()[1]:.1f}); * = paired difference to full TKD "
          f"beyond two standard errors "
          f"-> {args.out}/ablation.json, {args.out}/ablation.html")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="out/demo", help="the demo's folder: cache/, topology/, windows/ (built if "
                   "missing, as demo.sh does)")
    p.add_argument("--init", choices=["warm", "scratch"], default="warm", help="every variant of a seed starts from "
                   "that seed's pretrained student (warm, as on the card) or from random weights (scratch)")
    p.add_argument("--scale", choices=["small", "large"], default="small", help="the demo's student (small) or one "
                   "about 20x larger (large, data/student_large_config.json; with --device cuda and a --demo built "
                   "from data/teacher_large_config.json, about 15x the demo's teacher)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", default=None, help="the student's config.json (default: --scale's, in data/)")
    p.add_argument("--out", default="out/ablation", help="output folder")
    p.add_argument("--variants", nargs="+", default=None, help=f"of {', '.join(VARIANTS)} (default: "
                   f"{' '.join(DEFAULTS['variants'])})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds: init, pretraining and "
                   f"curriculum shuffles (default {' '.join(map(str, DEFAULTS['seeds']))})")
    p.add_argument("--epochs", type=float, default=None, help="distillation epochs of every run, warm start "
                   f"(default {DEFAULTS['epochs']:g})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run instead of --epochs "
                   "(default with --init scratch: 120)")
    p.add_argument("--pretrain_steps", type=int, default=None, help="steps of the warm start's next-token training "
                   f"(default {DEFAULTS['pretrain_steps']})")
    p.add_argument("--batch_size", type=int, default=None, help=f"windows per micro-batch (default "
                   f"{DEFAULTS['batch_size']}; a step is --batch_size x --grad_accum windows)")
    p.add_argument("--grad_accum", type=int, default=None, help=f"micro-batches per step (default "
                   f"{DEFAULTS['grad_accum']})")
    p.add_argument("--split_seed", type=int, default=1337, help="the held-out split, the same for every run")
    p.add_argument("--val_fraction", type=float, default=0.05, help="documents held out (train.py's split)")
    p.add_argument("--eval_windows", type=int, default=None, help="held-out windows measured (0: all)")
    p.add_argument("--prompts", type=int, default=None, help="held-out questions answered greedily (default "
                   f"{DEFAULTS['prompts']})")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens per answer (default "
                   f"{DEFAULTS['max_new_tokens']})")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 variants x 2 seeds, 2 steps, 2 short "
                   "answers (flags given explicitly still win)")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    return p


if __name__ == "__main__":
    cli("ablate.py", main, get_parser, "rerun the same command (it skips the runs already complete)")
