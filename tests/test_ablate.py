"""ablate.py and the pictures: statistics by hand, the evaluation groups against a brute force, the harness end to end
in --quick mode (every variant x seed, the flags each variant claims), report.html and ablation.html parsed."""

import json
import math
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import ablate
from cache_teacher import TeacherCache
from conftest import run_main
from model import Qwen3, Qwen3Config
from kd import teacher_q
from pages import REPORT_CHARTS, svg_chart, training_page
from train import evaluate
from windows import WindowBatches
from windows import step_phase

# --- a small HTML tree, so the pages are checked as parsed documents, not as strings ----------------------------

VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.items = tag, dict(attrs), parent, []  # items: text and child nodes

    def find_all(self, tag):
        for c in self.items:
            if isinstance(c, Node):
                if c.tag == tag:
                    yield c
                yield from c.find_all(tag)

    def text(self):
        """The text inside, in document order."""
        return "".join(c if isinstance(c, str) else c.text() for c in self.items)


class Tree(HTMLParser):
    """Parses a page into Nodes and fails on any tag closed out of order or left open."""

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {})
        self.feed(page)
        self.close()
        assert self.cur is self.root, f"<{self.cur.tag}> never closed"

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.items.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.items.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        assert tag not in VOID and tag == self.cur.tag, f"</{tag}> closes <{self.cur.tag}>"
        self.cur = self.cur.parent

    def handle_data(self, data):
        self.cur.items.append(data)


def figures(root):
    """{data-metric: figure node} of a page; every figure holds exactly one chart."""
    figs = {f.attrs["data-metric"]: f for f in root.find_all("figure")}
    for k, f in figs.items():
        assert len(list(f.find_all("svg"))) == 1, k
    return figs


def titles(node):
    return [t.text() for t in node.find_all("title")]


# --- statistics by hand ---------------------------------------------------------------------------------------------

def test_summary_statistics_by_hand():
    """mean and sample std per variant; the paired difference to full TKD (same seed), its mean, its standard error
    sd(differences) / sqrt(n) and the 2-SE flag, all worked out by hand."""
    runs = [dict(variant=v, seed=s, metrics=dict(kl=x, ce=c))
            for v, xs, cs in [("full", [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]),
                              ("standard_kd", [1.5, 2.7, 3.4], [5.0, 5.0, 5.0]),
                              ("renorm", [2.0, 1.0, 4.5], [4.0, 4.0, None])]
            for s, x, c in zip([1, 2, 3], xs, cs)]
    s = ablate.summarize(runs, metrics=("kl", "ce"))
    full, std_kd, renorm = s["full"]["kl"], s["standard_kd"]["kl"], s["renorm"]["kl"]
    assert (full["n"], full["mean"], full["std"], full["diff"], full["sig"]) == (3, 2.0, 1.0, None, None)
    # standard_kd: seed by seed 0.5, 0.7, 0.4 -> mean 0.5333, sd 0.1528, se 0.0882: 0.53 > 2 x 0.088, flagged,
    # although the unpaired spreads (std 1.0 and 0.95) would hide it
    assert std_kd["diffs"] == {1: 0.5, 2: pytest.approx(0.7), 3: pytest.approx(0.4)}
    assert std_kd["diff"] == pytest.approx(1.6 / 3) and std_kd["se"] == pytest.approx(0.15275 / math.sqrt(3), 1e-4)
    assert std_kd["sig"] is True
    # renorm: 1.0, -1.0, 1.5 -> mean 0.5, sd 1.3229, se 0.7638: within two standard errors
    assert renorm["diff"] == pytest.approx(0.5) and renorm["se"] == pytest.approx(1.3229 / math.sqrt(3), 1e-4)
    assert renorm["sig"] is False
    # a missing value leaves its seed out of the pairs (2 pairs); constant differences give se 0, flagged if not 0
    ce = s["renorm"]["ce"]
    assert (ce["n"], ce["mean"], ce["std"], ce["diff"], ce["se"], ce["sig"]) == (2, 4.0, 0.0, -1.0, 0.0, True)
    assert s["standard_kd"]["ce"]["sig"] is False  # 0 difference, se 0
    assert ablate.cell(std_kd) == "2.5333 ± 0.9609 (+0.5333*)" and ablate.cell(renorm) == "2.5000 ± 1.8028 (+0.5000)"
    one = ablate.summarize([dict(variant="full", seed=1, metrics=dict(kl=1.0)),
                            dict(variant="renorm", seed=1, metrics=dict(kl=2.0))], metrics=("kl",))
    assert one["renorm"]["kl"]["std"] is None and one["renorm"]["kl"]["sig"] is None  # one seed: no spread, no flag
    assert ablate.cell(one["renorm"]["kl"]) == "2.0000 (+1.0000)"
    md = ablate.table(s, metrics=("kl", "ce")).splitlines()
    assert md[0] == "| variant | KL to teacher (T=2) | CE (nats) |" and md[3].startswith("| standard KD | 2.5333 ± 0.9609")


def test_every_variant_command_line():
    """Each variant's train.py command line, parsed by train.py's own parser, has exactly the ablation it claims,
    and the same steps, seed and held-out split as full TKD."""
    import train
    a = ablate.get_parser().parse_args([])
    ablate.settle_args(a)
    claims = dict(full=(), standard_kd=("no_jumps", "no_proof_weight", "no_curriculum", "fixed"),
                  no_jumps=("no_jumps",), no_proof_weight=("no_proof_weight",), no_curriculum=("no_curriculum",),
                  fixed_windows=("fixed",), renorm=("renorm",))
    assert set(claims) == set(ablate.VARIANTS)
    for variant, claim in claims.items():
        t = train.get_parser().parse_args(ablate.train_command(a, variant, 7, "C", "T", "W", "F", "O"))
        got = tuple(f for f in ("no_jumps", "no_proof_weight", "no_curriculum") if getattr(t, f))
        got += ("fixed",) * (t.windows == "F") + ("renorm",) * (t.kd_mode == "renorm")
        assert got == claim, variant
        assert (t.epochs, t.seed, t.split_seed, t.topology, t.cache) == (a.epochs, 7, a.split_seed, "T", "C")
        assert (t.batch_size, t.grad_accum, t.init) == (4, 8, os.path.join(a.out, "runs", "pretrain", "seed7"))


# --- the evaluation groups against a brute force ----------------------------------------------------------------

def test_evaluate_groups_match_brute_force(tiny_cache, tiny_topology, tiny_windows, student_config):
    """kl_jump / kl_reasoning / kl_response are the mean exact KL over the rows right after a jump (from the topology's
    weights), over explore/examine targets and over response targets, recomputed densely here window by window."""
    import topology
    import windows as windows_mod
    cache = TeacherCache(tiny_cache)
    weight = np.asarray(topology.load(tiny_topology, tiny_cache).arrays["weight"])
    batches = WindowBatches(cache, windows_mod.load(tiny_windows, tiny_cache).windows, weight)
    val = np.array([w for w in range(len(batches.windows)) if (weight[batches.rows_of(w)] > 1).any()][:3])
    assert len(val) == 3
    model = Qwen3(Qwen3Config.from_json(student_config)).init_weights(0)
    ev = evaluate(model, batches, val, temperature=2.0, t_index=1, kd_mode="tail", chunk=64,
                  device=torch.device("cpu"), autocast=False)
    kl, rows = [], []
    with torch.no_grad():
        for w in val:
            b = batches.batch([w], torch.device("cpu"))
            logits = model(b["idx"]).flatten(0, 1)[b["sel"]].double()
            lq, Q = teacher_q(b["topk_logprobs"], b["lse"], 1, 2.0)
            pK = torch.softmax(logits / 2.0, -1).gather(1, b["topk_ids"])
            qb, pb = torch.cat([lq.exp(), Q[:, None]], 1).double(), torch.cat([pK, 1 - pK.sum(-1, keepdim=True)], 1)
            kl.append((torch.xlogy(qb, qb) - qb * pb.log()).sum(-1).numpy())
            rows.append(batches.rows_of(w))
    kl, rows = np.concatenate(kl), np.concatenate(rows)
    groups = dict(jump=weight[rows] > 1, reasoning=np.isin(cache.roles[rows + 1], [1, 2]),
                  response=cache.roles[rows + 1] == 3)
    assert groups["jump"].any() and groups["reasoning"].any() and groups["response"].any()
    assert ev["kl"] == pytest.approx(kl.mean(), rel=1e-4)
    for g, mask in groups.items():
        assert ev[f"kl_{g}"] == pytest.approx(kl[mask].mean(), rel=1e-4), g
        assert ev[f"rows_{g}"] == mask.sum()
    no_jumps = WindowBatches(cache, batches.windows, None)  # a run without jump weights has no jump group
    assert evaluate(model, no_jumps, val[:1], temperature=2.0, t_index=1, kd_mode="tail", chunk=64,
                    device=torch.device("cpu"), autocast=False)["kl_jump"] is None


# --- report.html from a hand-made log ------------------------------------------------------------------------------

def test_report_page_from_a_log():
    """One chart per logged quantity, the curriculum's three phase boundaries and every evaluation marked, the
    evaluations as dots with their values and in the table; a well-formed page."""
    total = 40
    steps = [dict(step=s + 1, total=total, phase=step_phase(s, total), ce=5.0 - 0.1 * s, kl=0.5 / (s + 1),
                  top1=0.01 * s, loss=4.0 - 0.05 * s, alpha=0.01 * s, proof_weight=2.25 - 0.02 * s, lr=1e-3)
             for s in range(total)]
    evals = [dict(eval_step=0, ce=7.5, kl=0.9876, top1=0.01, tail_gap=0.1),
             dict(eval_step=20, ce=3.25, kl=0.4321, top1=0.3, tail_gap=0.05, kl_jump=0.6543),
             dict(eval_step=40, ce=1.125, kl=0.1234, top1=0.7, tail_gap=0.01, kl_jump=0.2345)]
    root = Tree(training_page(steps, evals, total, "run x", [("seed", 7)], step_phase)).root
    figs = figures(root)
    assert list(figs) == [k for k, _, _ in REPORT_CHARTS]
    for k, f in figs.items():
        marks = titles(f)
        assert [m for m in marks if m.startswith("curriculum phase")] == [
            "curriculum phase 1 starts after step 10", "curriculum phase 2 starts after step 20",
            "curriculum phase 3 starts after step 30"], k
        assert [m for m in marks if m.startswith("evaluation at")] == [f"evaluation at step {s}" for s in (0, 20, 40)]
        assert len(list(f.find_all("polyline"))) == 1  # the per-step line
    dots = lambda k: [t for t in titles(figs[k]) if t.startswith("step ")]
    assert dots("kl") == ["step 0: 0.9876", "step 20: 0.4321", "step 40: 0.1234"] and dots("alpha") == []
    table = [t for t in root.find_all("table") if t.attrs.get("class") == "evals"][0]
    cells = [[td.text() for td in tr.find_all("td")] for tr in table.find_all("tr")][1:]
    assert cells[2][:3] == ["40", "1.1250", "0.1234"] and cells[0][-1] == ""  # kl_jump absent at step 0
    assert "40 of 40 optimizer steps" in root.text()


def test_legend_stays_inside_the_chart():
    """Five labelled lines in the ablation page's 535 px chart: every legend box inside the plot (at 110 px an entry
    the first one fell off the left edge), in order, as far apart as the plot allows; two keep 110 px."""
    boxes = lambda n, width: [float(x) for x in re.findall(r'<rect x="([-0-9.]+)" y="7" width="9"', svg_chart(
        [dict(x=[0, 1], y=[1.0, 2.0], color="#000", label=f"seed {i}") for i in range(n)], width=width))]
    five = boxes(5, 535)
    assert len(five) == 5 and five[0] >= 58 and five[-1] + 50 <= 535  # plot from x = 58; "seed 4" fits after it
    assert all(b - a >= 80 for a, b in zip(five, five[1:]))
    two = boxes(2, 480)
    assert two[1] - two[0] == 110 and two[1] == 480 - 10 - 8 - 110 + 10


# --- the harness end to end --------------------------------------------------------------------------------------

def test_quick_harness_end_to_end(tmp_path, tiny_cache, tiny_topology, tiny_windows, student_config, capsys):
    """--quick on the tiny pipeline: ablation.json holds every variant x seed with every metric; each variant's
    manifests show the flags it claims (standard KD on fixed-stride windows); the pages parse, with the run's
    figures in them; a second call finds every run complete."""
    demo, out = os.path.dirname(tiny_cache), tmp_path / "abl"
    args = ["--quick", "--demo", demo, "--out", out, "--config", student_config, "--val_fraction", "0.1"]
    run_main(ablate, *args)
    res = json.load(open(out / "ablation.json"))
    assert sorted((r["variant"], r["seed"]) for r in res["runs"]) == sorted(
        (v, s) for v in ablate.QUICK["variants"] for s in ablate.QUICK["seeds"])
    for r in res["runs"]:
        m = r["metrics"]
        assert all(m[k] is not None and math.isfinite(m[k]) for k in ablate.METRICS), r
        assert m["rows_jump"] > 0 and len(m["layout_ok"]) == 2
    # every run measured on the same rows: the same held-out split, whatever the seed
    assert len({r["metrics"]["rows_reasoning"] + r["metrics"]["rows_response"] for r in res["runs"]}) == 1
    # the flags each variant claims, from train.py's and windows.py's own manifests
    cache = TeacherCache(tiny_cache)
    from windows import fixed_windows
    for r in res["runs"]:
        a = json.load(open(os.path.join(r["folder"], "manifest.json")))["args"]
        fixed = json.load(open(os.path.join(a["windows"], "manifest.json")))["settings"]["fixed_stride"]
        claimed = (a["no_jumps"], a["no_proof_weight"], a["no_curriculum"], fixed, a["kd_mode"])
        assert claimed == {"full": (False, False, False, False, "tail"),
                           "standard_kd": (True, True, True, True, "tail")}[r["variant"]], r["variant"]
        assert (a["seed"], a["split_seed"], a["max_steps"]) == (r["seed"], 1337, ablate.QUICK["steps"])
        # the warm start: every variant of a seed from that seed's pretrained student, named with its fingerprint
        m = json.load(open(os.path.join(r["folder"], "manifest.json")))
        pre = json.load(open(out / "runs" / "pretrain" / f"seed{r['seed']}" / "manifest.json"))
        assert m["init"]["name"] == str(out / "runs" / "pretrain" / f"seed{r['seed']}")
        assert m["init"]["fingerprint"] == pre["fingerprint"] == res["pretrain"][str(r["seed"])]["fingerprint"]
        assert m["init"]["sha256"] == pre["sha256"] and pre["args"]["kd_alpha"] == 0
        if fixed:
            assert np.array_equal(np.load(os.path.join(a["windows"], "windows.npy")), fixed_windows(cache))
    assert len({res["pretrain"][str(s)]["fingerprint"] for s in ablate.QUICK["seeds"]}) == 2  # one per seed
    # the printed table: a row per variant with mean +- std over the two seeds
    printed = capsys.readouterr().out
    assert "| full TKD | " in printed and "| standard KD | " in printed
    # ablation.html: one chart per metric, a dot per run, the table's cells are the summary's numbers
    root = Tree(open(out / "ablation.html").read()).root
    figs = figures(root)
    assert list(figs) == list(ablate.METRICS) + ["pretrain"]
    for k in ablate.METRICS:  # a dot per seed and variant but full TKD: each seed's paired difference
        assert len(list(figs[k].find_all("circle"))) == len(res["runs"]) - len(ablate.QUICK["seeds"]), k
    cells = [td.text() for td in next(root.find_all("table")).find_all("td")]
    for v, per in res["summary"].items():
        for k, c in per.items():
            assert ablate.cell(c, 3 if k == "layout" else 4) in cells, (v, k)
    # each run's report.html: one chart per quantity, its evaluations' figures in the table
    for r in res["runs"]:
        rep = Tree(open(os.path.join(r["folder"], "report.html")).read()).root
        assert list(figures(rep)) == [k for k, _, _ in REPORT_CHARTS]
        last = json.load(open(os.path.join(r["folder"], "manifest.json")))["last_eval"]
        cells = [td.text() for td in rep.find_all("td")]
        assert f"{last['kl']:.4f}" in cells and f"{last['ce']:.4f}" in cells
    # resumable: a second call trains nothing
    run_main(ablate, *args)
    assert capsys.readouterr().out.count("complete, skipped") == len(res["runs"])
