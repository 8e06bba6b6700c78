"""demo.sh, scaled down: every phase runs end to end through the same scripts and leaves a complete folder."""

import json
import os
import subprocess

from bench import DEMO_STEPS, demo_timings
from conftest import ROOT


def test_scaled_down_demo(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OUT=str(out), N_SYNTH="40", TEACHER_STEPS="3", STUDENT_STEPS="3", MAX_NEW="12")
    r = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for folder, phase in [("cache_tokens", "cache"), ("teacher", "student"), ("cache", "cache"),
                          ("topology", "topology"), ("windows", "windows"), ("student", "student")]:
        m = json.load(open(out / folder / "manifest.json"))
        assert m["complete"] is True and m["phase"] == phase, folder
    for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_log.jsonl"]:
        assert (out / "student" / f).exists()
    # one pad token: generation_config.json pads with the token that tokenizer_config.json names
    read = lambda name: json.load(open(out / "student" / name))
    pad = read("tokenizer_config.json")["pad_token"]
    ids = {t["content"]: t["id"] for t in read("tokenizer.json")["added_tokens"]}
    assert pad == "<|endoftext|>" and read("generation_config.json")["pad_token_id"] == ids[pad]
    assert "student held-out KL to the teacher" in r.stdout and "DualMind layout" in r.stdout
    assert "DualMind check:" in r.stdout  # the generation step ran and reported
    for who in ["student", "teacher"]:
        assert len(open(out / f"answers_{who}.jsonl").readlines()) == 4
    # bench.py's demo row reads the step times off this output: every step, each time its own, adding up
    steps, total = demo_timings(r.stdout)
    assert list(steps) == [f"{i}/9" for i in range(1, 10)] + ["summary"], steps
    assert min(steps.values()) >= 0 and sum(steps.values()) == total and total > 0
    assert set(DEMO_STEPS) <= set(steps)  # the long steps bench.py names are still these
    # a second run finds every phase complete and redoes nothing
    r2 = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0 and r2.stdout.count("nothing to do") == 6 and r2.stdout.splitlines().count("already there") == 2
