"""train.py --fsdp: the student sharded over torchrun's processes with FSDP2 (gloo on CPU here, NCCL on GPUs): the
same losses as one process, a final Hugging Face folder that transformers loads, sharded checkpoints that resume
after kill -9 (with the same or another process count), and one line for --fsdp without torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import find_checkpoint
from conftest import ROOT, assert_one_line_error, run_script, train_args


def torchrun(n, args, **kw):
    """train.py under `torchrun --standalone --nproc_per_node=n`, as a user starts it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            os.path.join(ROOT, "train.py"), *map(str, args)]


def run_torchrun(n, args):
    r = subprocess.run(torchrun(n, args), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def step_lines(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl") if '"step"' in line]


def greedy(folder, n=8):
    """n greedy tokens of a prompt from the student as transformers loads it."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.tensor([[5, 17, 300, 42, 7, 99]])
    return m.generate(idx, max_new_tokens=n, do_sample=False)[0].tolist()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_cache, tiny_topology, tiny_windows, student_config):
    """The same 6 steps in one process and with --fsdp in two (fp32, checkpoints every 2 steps)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    base = lambda out: train_args(out, tiny_cache, tiny_topology, tiny_windows, student_config, "--max_steps", 6,
                                  "--ckpt_every", 2, "--eval_every", 3, "--eval_windows", 2)
    run_script("train.py", *base(tmp / "one"))
    run_torchrun(2, [*base(tmp / "fsdp"), "--fsdp"])
    return tmp, base


def test_fsdp_two_processes_match_one_process(fsdp_runs):
    """Per-step CE, KL and loss within 1e-4 relative of one process without --fsdp; the final folder (gathered on
    rank 0) loads in transformers and gives the same greedy tokens."""
    tmp, _ = fsdp_runs
    one, two = step_lines(tmp / "one"), step_lines(tmp / "fsdp")
    assert [e["step"] for e in one] == [e["step"] for e in two] == list(range(1, 7))
    for a, b in zip(one, two):
        for k in ("ce", "kl", "loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]), (a["step"], k, a[k], b[k])
    assert json.load(open(tmp / "fsdp" / "manifest.json"))["complete"]
    assert not (tmp / "fsdp" / "ckpt").exists()
    assert greedy(tmp / "fsdp") == greedy(tmp / "one")


def test_fsdp_kill9_then_resume_gives_the_same_weights(fsdp_runs):
    """kill -9 of the whole torchrun job once its first sharded checkpoint (step 2) is in place, then --resume:
    with 2 processes the final weights are byte-identical to the uninterrupted run; with 1 process (another count
    that divides the step) the same up to the reduction order."""
    from safetensors.torch import load_file
    tmp, base = fsdp_runs
    straight = load_file(tmp / "fsdp" / "model.safetensors")
    for n in (2, 1):
        out = tmp / f"killed_{n}"
        p = subprocess.Popen(torchrun(2, [*base(out), "--fsdp"]), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 300 and not (out / "ckpt" / "state.json").exists():
            time.sleep(0.002)
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers at once
        p.wait()
        ckpt = find_checkpoint(str(out / "ckpt"))  # step 2, or 4 if the kill came late (the swap may be half done)
        assert ckpt and os.path.isfile(os.path.join(ckpt, ".metadata")) and not (out / "model.safetensors").exists()
        run_torchrun(n, [*base(out), "--fsdp", "--resume"])
        resumed = load_file(out / "model.safetensors")
        if n == 2:
            assert (out / "model.safetensors").read_bytes() == (tmp / "fsdp" / "model.safetensors").read_bytes()
        else:
            assert all(torch.allclose(resumed[k], straight[k], rtol=1e-4, atol=1e-6) for k in straight)
        assert [e["step"] for e in step_lines(out)] == list(range(1, 7))


def test_fsdp_needs_torchrun(tmp_path, tiny_cache, tiny_topology, tiny_windows, student_config):
    r = run_script("train.py", *train_args(tmp_path / "s", tiny_cache, tiny_topology, tiny_windows, student_config,
                                           "--max_steps", 1, "--fsdp"), check=False)
    assert_one_line_error(r, "train.py", "--fsdp", "torchrun --nproc_per_node=N")
    assert not (tmp_path / "s").exists()
