"""Tests for the bundled physics CoT data (data/physics_cot.jsonl) and the templated generator (data/synth.py).

Run from the repo root:

    .venv/bin/python -m pytest -q tests/test_data.py

Answers are re-derived here from each record's params with formulas written out in this file, never through
the generator's own code, so a wrong formula or a wrong constant in data/synth.py makes a test fail.
"""

import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from decimal import Decimal

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import examine_segment, is_trigger, segments, split_cot  # noqa: E402  (the kit's own rule)
from data.synth import generate  # noqa: E402

BUNDLED = os.path.join(ROOT, "data", "physics_cot.jsonl")
DOMAINS = {"differential_equations", "theoretical_mechanics", "electromagnetism", "general_relativity"}
FIELDS = ("domain", "question", "CoT", "response")


def sentences(text):
    """The segments of the <examine> split (common.segments): sentences and lines."""
    text = text.strip()
    return [text[a:b] for a, b in segments(text)]


def trigger_indices(text):
    return [i for i, s in enumerate(sentences(text)) if is_trigger(s)]


# -----------------------------------------------------------------------------
# Bundled hand-written data


@pytest.fixture(scope="module")
def bundled():
    with open(BUNDLED, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    return [json.loads(ln) for ln in lines]


def test_bundled_schema_and_counts(bundled):
    assert len(bundled) >= 32
    for r in bundled:
        assert r["domain"] in DOMAINS
        for k in FIELDS:
            assert isinstance(r[k], str) and r[k].strip(), (k, r.get("question", "")[:60])
    counts = Counter(r["domain"] for r in bundled)
    assert all(counts[d] >= 8 for d in DOMAINS), counts
    questions = [r["question"].strip() for r in bundled]
    assert len(set(questions)) == len(questions), "duplicate questions"


def test_bundled_cot_shape(bundled):
    """8-60 CoT segments, short responses, and both branches of the <examine> split are exercised."""
    late, none = 0, 0
    for r in bundled:
        sents = sentences(r["CoT"])
        assert 8 <= len(sents) <= 60, (len(sents), r["question"][:60])
        assert 1 <= len(sentences(r["response"])) <= 4, r["response"][:80]
        how, i = examine_segment(r["CoT"].strip(), segments(r["CoT"].strip()))
        if how == "trigger":
            late += 1
            assert i < len(sents) - 1, "the check should be followed by a conclusion"
        elif not trigger_indices(r["CoT"]):
            none += 1
    assert late >= 30, late          # most records carry a verification passage in the second half
    assert none >= 3, none           # a few have no trigger at all, for the 70/30 fallback


def test_bundled_realistic_records(bundled):
    """At least 8 records, over the four domains, shaped like long-reasoning traces: paragraphs, display equations on
    lines of their own, inline math, numbered steps, an early aside, a closing **Final Answer** with a boxed value."""
    real = [r for r in bundled if "\n" in r["CoT"]]
    assert len(real) >= 8 and {r["domain"] for r in real} == DOMAINS
    for r in real:
        cot = r["CoT"]
        assert "\\(" in cot and "\n**Final Answer**\n" in cot and "\\boxed{" in cot, r["question"][:50]
        assert re.search(r"^(\\\[|\$\$)$", cot, re.M), r["question"][:50]  # a display equation opens a line
    count = lambda pattern: sum(bool(re.search(pattern, r["CoT"], re.M)) for r in real)
    assert count("\n\n") >= 8 and count(r"^\d\. ") >= 3  # paragraphs, numbered steps
    assert sum(bool(re.search(r"(?:Wait|Hmm)[,:]", r["CoT"][:len(r["CoT"]) // 2])) for r in real) >= 6  # early asides


# -----------------------------------------------------------------------------
# Generator


G_ACC, K_E, EPS0, MU0 = 9.81, 8.99e9, 8.85e-12, 4 * math.pi * 1e-7
G_N, C, M_SUN, R_SUN = 6.674e-11, 2.998e8, 1.989e30, 6.957e8


def _rs(m_solar):
    return 2 * G_N * m_solar * M_SUN / C ** 2  # metres


def _rc_charge(p):
    tau = p["R_kohm"] * 1e3 * p["C_uF"] * 1e-6
    return p["C_uF"] * 1e-6 * p["V"] * (1 - math.exp(-p["t"] / tau)) * 1e6  # μC


# Each template's answer from its params, in the unit the question asks for.
EXPECTED = {
    "exp_decay": lambda p: p["y0"] * math.exp(-p["k"] * p["t"]),
    "newton_cooling": lambda p: p["Ta"] + (p["T0"] - p["Ta"]) * math.exp(-p["k"] * p["t"]),
    "damped_oscillator": lambda p: math.sqrt(p["k"] / p["m"] - (p["b"] / (2 * p["m"])) ** 2),
    "logistic_growth": lambda p: p["K"] * p["P0"] / (p["P0"] + (p["K"] - p["P0"]) * math.exp(-p["r"] * p["t"])),
    "projectile_range": lambda p: p["v0"] ** 2 * math.sin(2 * math.radians(p["theta_deg"])) / G_ACC,
    "pendulum_period": lambda p: 2 * math.pi * math.sqrt(p["L"] / G_ACC),
    "spring_energy": lambda p: p["A"] * math.sqrt(p["k"] / p["m"]),
    "incline_friction": lambda p: G_ACC * (math.sin(math.radians(p["theta_deg"]))
                                           - p["mu"] * math.cos(math.radians(p["theta_deg"]))),
    "coulomb_force": lambda p: K_E * abs(p["q1_uC"] * 1e-6 * p["q2_uC"] * 1e-6) / p["r"] ** 2,
    "capacitor_energy": lambda p: 0.5 * EPS0 * p["A"] / (p["d_mm"] / 1000) * p["V"] ** 2 * 1e6,  # μJ
    "rc_charging": _rc_charge,
    "solenoid_field": lambda p: MU0 * p["N"] / p["L"] * p["I"] * 1e3,  # mT
    "schwarzschild_radius": lambda p: _rs(p["M_solar"]) / 1000,  # km
    "time_dilation": lambda p: math.sqrt(1 - _rs(p["M_solar"]) / (p["r_km"] * 1000)),
    "grav_redshift": lambda p: 1 / math.sqrt(1 - _rs(p["M_solar"]) / (p["R_km"] * 1000)) - 1,
    "light_deflection": lambda p: 4 * G_N * p["M_solar"] * M_SUN / (C ** 2 * p["b_solar_radii"] * R_SUN)
    * 180 * 3600 / math.pi,  # arcsec
}


def fmt3(x):
    """3 significant figures in plain decimal notation, the way the response states the answer."""
    s = f"{x:.3g}"
    return format(Decimal(s), "f") if "e" in s else s


@pytest.fixture(scope="module")
def sample():
    return generate(200)


def test_generate_deterministic_and_seeded():
    a, b = generate(50, seed=3), generate(50, seed=3)
    assert a == b
    assert len(a) == 50
    assert generate(50, seed=4) != a
    # A private Random: the global random state is left alone.
    random.seed(123)
    x = random.random()
    random.seed(123)
    generate(20, seed=9)
    assert random.random() == x


def test_templates_cover_domains(sample):
    names = Counter(r["template"] for r in sample)
    assert set(names) == set(EXPECTED), set(names) ^ set(EXPECTED)
    per_domain = Counter()
    for name in names:
        doms = {r["domain"] for r in sample if r["template"] == name}
        assert len(doms) == 1 and doms <= DOMAINS, (name, doms)
        per_domain[doms.pop()] += 1
    assert len(names) >= 12
    assert all(per_domain[d] >= 3 for d in DOMAINS), per_domain


def test_generated_fields(sample):
    for r in sample:
        for k in FIELDS + ("template",):
            assert isinstance(r[k], str) and r[k].strip(), k
        assert isinstance(r["answer"], float) and math.isfinite(r["answer"]) and r["answer"] > 0
        assert isinstance(r["params"], dict) and r["params"]
        words = len(f"{r['question']} {r['CoT']} {r['response']}".split())
        assert 50 <= words <= 170, (r["template"], words)


def test_answers_recomputed_from_params(sample):
    for r in sample:
        want = EXPECTED[r["template"]](r["params"])
        assert math.isclose(r["answer"], want, rel_tol=1e-6), (r["template"], r["params"], r["answer"], want)
        shown = fmt3(r["answer"])
        assert re.search(rf"(?<![\d.]){re.escape(shown)}(?!\d)", r["response"]), (shown, r["response"])
        assert shown in sentences(r["CoT"])[-1], ("the CoT should end on the answer", shown, r["CoT"][-120:])
        if "**Final Answer**" in r["CoT"]:
            assert f"\\boxed{{{shown}" in r["CoT"]


def test_generated_cot_has_late_check(sample):
    """Exactly one trigger, in the second half, followed by the answer: the <examine> split lands on it."""
    for r in sample:
        sents = sentences(r["CoT"])
        idx = trigger_indices(r["CoT"])
        assert len(idx) == 1, ("exactly one trigger, so the split lands on the check", r["CoT"])
        assert examine_segment(r["CoT"].strip(), segments(r["CoT"].strip())) == ("trigger", idx[0]), r["template"]
        assert idx[0] < len(sents) - 1, "the answer sentence follows the check"


def test_generated_layouts(sample):
    """About half of the records are laid out like a long-reasoning trace (paragraphs, the boxed answer as a display
    equation under a **Final Answer** header), the rest as one line; both survive the split byte for byte."""
    traces = [r for r in sample if "\n" in r["CoT"]]
    assert 0.3 * len(sample) <= len(traces) <= 0.7 * len(sample)
    for r in traces:
        cot = r["CoT"]
        assert cot.count("\n\n") >= 4 and re.search(r"\*\*Final Answer\*\*\n(\\\[|\$\$)\n\\boxed\{.*\}\n(\\\]|\$\$)$", cot)
    for r in sample:
        explore, examine = split_cot(r["CoT"])
        sep = r["CoT"][len(explore):len(r["CoT"]) - len(examine)]
        assert explore + sep + examine == r["CoT"] and not sep.strip()


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "sub" / "synth.jsonl"
    proc = subprocess.run([sys.executable, "data/synth.py", "--n", "40", "--seed", "5", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "40" in proc.stdout
    rows = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert rows == generate(40, seed=5)
    assert [p.name for p in out.parent.iterdir()] == ["synth.jsonl"], "temp file left behind"
    help_ = subprocess.run([sys.executable, "data/synth.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert help_.returncode == 0 and "--seed" in help_.stdout and "--out" in help_.stdout


def test_new_questions_are_outside_the_demo_training_data():
    """data/new_questions.jsonl, the layout check's 16 questions: readable by generate.py, distinct, and none of them
    a question of the bundled records or of the demo's 1,500 generated ones (data/synth.py --n 1500 --seed 0)."""
    import generate as generate_script
    path = os.path.join(ROOT, "data", "new_questions.jsonl")
    questions = generate_script.read_prompts(generate_script.get_parser().parse_args(["--model", "-",
                                                                                      "--prompts_jsonl", path]))
    assert len(questions) == len(set(questions)) == 16
    bundled = [json.loads(line) for line in open(BUNDLED, encoding="utf-8")]
    seen = {r["question"].strip() for r in bundled + generate(1500, seed=0)}
    assert not [q for q in questions if q.strip() in seen]
