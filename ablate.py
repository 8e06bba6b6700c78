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
Every variant trains the demo's student (2 layers, hidden 128, from scratch) for the same --steps optimizer steps
of 32 windows with the same seeds (--seeds: the student's init and the curriculum shuffles) and the same held-out
documents (--split_seed fixes train.py's split for every seed).

Metrics per run, all on the same rows whatever the variant: the held-out documents cut by the demo's topology
windows, the teacher's KL always the exact top-k + tail one at T=2, and the jump rows taken from the demo's topology:
  kl, ce, top1       KL to the teacher (T=2), CE on the real next token, top-1 agreement (train.evaluate)
  kl_jump            the KL over rows right after a topology jump (jump weight > 1), where TKD claims its gain ...
  kl_reasoning       ... over explore/examine targets (the rows the proof weight multiplies) ...
  kl_response        ... and over response targets
  layout             the share of greedy answers to --prompts held-out questions that hold <explore>, <examine>,
                     <response> in order (generate.dualmind_check)
The table gives, per variant, the mean +- std (sample std) over seeds, the difference to full TKD, and * when that
difference exceeds two standard errors of a difference of two means, sqrt(s1^2/n1 + s2^2/n2).

Inputs   --demo (default out/demo): the demo's cache/, topology/ and windows/ (and tokenizer), built by
         `STOP_AFTER=windows bash demo.sh` when missing; --config (the student's config.json)
Outputs  in --out (default out/ablation):
  windows_fixed/                    windows.py --fixed_stride (shared by standard_kd and fixed_windows)
  runs/<variant>/seed<s>/           train.py's student folder (manifest.json, train_log.jsonl, report.html), its
                                    printed lines (train.log) and metrics.json (this harness's measurements, with
                                    the train.py command line); a run with metrics.json is complete and skipped
  ablation.json                     config, machine, wall time, every run's metrics, the summary statistics
  ablation.html                     one chart per metric (a dot per seed, the mean, +- std), and the table

Run
  python ablate.py                                  # 7 variants x 3 seeds, sized for <= 30 min on 2 CPU cores
  python ablate.py --variants full standard_kd --seeds 1 2 3 4 5    # a sharper look at the headline comparison
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
# the demo's student recipe (demo.sh's learning rates: a student from scratch, which the card's 5e-6 would not move),
# in float32 rather than the demo's bf16 autocast, so that the differences between variants are not bf16 rounding
SCRATCH = ["--lr", "3e-3", "--min_lr", "3e-4", "--warmup", "10", "--dtype", "float32", "--save_dtype", "float32",
           "--device", "cpu", "--log_every", "25", "--eval_every", "0", "--ckpt_every", "50"]
# the defaults, and what --quick puts in place of every one that is not given
DEFAULTS = dict(variants=list(VARIANTS), seeds=[1, 2, 3], steps=120, grad_accum=16, prompts=8, max_new_tokens=300,
                eval_windows=0)
QUICK = dict(variants=["full", "standard_kd"], seeds=[1, 2], steps=2, grad_accum=1, prompts=2, max_new_tokens=8,
             eval_windows=4)

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
    """Per variant and metric, over the seeds: n, mean, std, and against the baseline variant diff (mean minus the
    baseline's mean), se = sqrt(s^2/n + s_b^2/n_b) (the standard error of a difference of two means) and
    sig = |diff| > 2 se (None where a std is missing). runs: dicts with variant and metrics."""
    out = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        out[v] = {}
        for k in metrics:
            n, m, s = mean_std([r["metrics"].get(k) for r in runs if r["variant"] == v])
            out[v][k] = dict(n=n, mean=m, std=s, diff=None, se=None, sig=None)
    for v in out:
        for k, c in out[v].items():
            b = out.get(baseline, {}).get(k)
            if v == baseline or not b or c["mean"] is None or b["mean"] is None:
                continue
            c["diff"] = c["mean"] - b["mean"]
            if c["std"] is not None and b["std"] is not None:
                c["se"] = math.sqrt(c["std"] ** 2 / c["n"] + b["std"] ** 2 / b["n"])
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


def ensure_demo(demo):
    """The demo's cache, topology and windows, checked; built with `STOP_AFTER=windows bash demo.sh` when missing."""
    cache_dir, topo_dir, win_dir = (os.path.join(demo, p) for p in ("cache", "topology", "windows"))
    try:
        load_windows(win_dir, cache_dir, topo_dir, needed_by="ablate.py")
    except ValueError as e:
        print(f"ablate: the demo's artifacts are not complete ({e}); building them with demo.sh", flush=True)
        env = dict(os.environ, OUT=os.path.abspath(demo), STOP_AFTER="windows", PYTHON=sys.executable)
        subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, check=True)
        load_windows(win_dir, cache_dir, topo_dir, needed_by="ablate.py")
    return cache_dir, topo_dir, win_dir


def train_command(a, variant, seed, cache_dir, topo_dir, win_dir, fixed_dir, out):
    """train.py's command line for one run (its arguments after `python train.py`): the demo's student recipe plus
    the variant's flags."""
    flags, fixed, _ = VARIANTS[variant]
    return ["--init", "scratch", "--config", a.config, "--cache", cache_dir, "--topology", topo_dir,
            "--windows", fixed_dir if fixed else win_dir, "--max_steps", str(a.steps),
            "--grad_accum", str(a.grad_accum), "--val_fraction", str(a.val_fraction),
            "--eval_windows", str(a.eval_windows or 32),  # train.py's own start/end evaluations, for its report.html
            "--seed", str(seed), "--split_seed", str(a.split_seed), *SCRATCH, *flags, "--out", out, "--resume"]


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


def measure(folder, batches, val, questions, max_new_tokens, t_index):
    """The metrics of one trained student: train.evaluate on the held-out windows (exact KL at T=2, the groups),
    and the DualMind layout rate of greedy answers to `questions`."""
    model, tok, eos = load_model(folder, "cpu", torch.float32)
    ev = evaluate(model, batches, val, temperature=2.0, t_index=t_index, kd_mode="tail", chunk=LOSS_CHUNK,
                  device=torch.device("cpu"), autocast=False)
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
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants {' '.join(unknown)}: unknown; choose from {', '.join(VARIANTS)}")
    if "full" not in args.variants:
        raise ValueError("--variants must include full: every difference is measured against it")
    check_ranges(args, steps="[1, inf)", grad_accum="[1, inf)", split_seed="[0, inf)", val_fraction="(0, 1)",
                 eval_windows="[0, inf)", prompts="[0, inf)", max_new_tokens="[1, inf)")
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
    metrics = measure(folder, held["batches"], held["val"], held["questions"], args.max_new_tokens, held["t_index"])
    run = dict(variant=variant, seed=seed, folder=folder, command=cmd, metrics=metrics, train_s=t1 - t0,
               measure_s=time.time() - t1, train_cpu_s=c1 - c0, measure_cpu_s=time.process_time() - c1)
    write_json(mpath, run)  # written last: a run folder with metrics.json is complete
    return run, True


def main(args):
    settle_args(args)
    if args.force:
        shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    t_start, c_start, load_start = time.time(), time.process_time(), os.getloadavg()
    cache_dir, topo_dir, win_dir = ensure_demo(args.demo)
    fixed_dir = os.path.join(args.out, "windows_fixed")
    if any(VARIANTS[v][1] for v in args.variants):  # the fixed-stride windows, built once for every run using them
        run_script(windows, ["--cache", cache_dir, "--fixed_stride", "--out", fixed_dir],
                   os.path.join(fixed_dir, "windows.log"))
    held = held_out_set(args, cache_dir, topo_dir, win_dir)

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
                  runs=runs, summary=summary)
    write_json(os.path.join(args.out, "ablation.json"), result)
    with atomic_write(os.path.join(args.out, "ablation.html")) as f:
        f.write(ablation_page(result, {v: label for v, (_, _, label) in VARIANTS.items()}, METRICS, cell))
    print(table(summary))
    print(f"ablate: {len(runs)} runs ({len(args.variants)} variants x {len(args.seeds)} seeds, {args.steps} steps "
          f"each) in {fmt_time(result['runs_wall_s'])} ({fmt_time(result['runs_cpu_s'])} CPU, "
          f"{torch.get_num_threads()} threads, "
          f"load average {load_start[1]:.1f} -> {os.getloadavg()[1]:.1f}); * = difference to full TKD beyond two "
          f"standard errors "
          f"-> {args.out}/ablation.json, {args.out}/ablation.html")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="out/demo", help="the demo's folder: cache/, topology/, windows/ (built if "
                   "missing, as demo.sh does)")
    p.add_argument("--config", default=os.path.join(ROOT, "data", "student_config.json"), help="the student's "
                   "config.json (from scratch; default the demo's: 2 layers, hidden 128)")
    p.add_argument("--out", default="out/ablation", help="output folder")
    p.add_argument("--variants", nargs="+", default=None, help=f"of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds: init and curriculum shuffles "
                   f"(default {' '.join(map(str, DEFAULTS['seeds']))})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default "
                   f"{DEFAULTS['steps']}: 7 variants x 3 seeds in <= 30 min on 2 CPU cores)")
    p.add_argument("--grad_accum", type=int, default=None,
                   help="micro-batches of 2 windows on average per step (default 16)")
    p.add_argument("--split_seed", type=int, default=1337, help="the held-out split, the same for every run")
    p.add_argument("--val_fraction", type=float, default=0.05, help="documents held out (train.py's split)")
    p.add_argument("--eval_windows", type=int, default=None, help="held-out windows measured (0: all)")
    p.add_argument("--prompts", type=int, default=None, help="held-out questions answered greedily (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens per answer (default 300)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 variants x 2 seeds, 2 steps, 2 short "
                   "answers (flags given explicitly still win)")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    return p


if __name__ == "__main__":
    cli("ablate.py", main, get_parser, "rerun the same command (it skips the runs already complete)")
