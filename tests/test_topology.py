"""topology.py: the DISC operators on signals with known structure, brute-force references, the pass on a real cache."""

import json
import os

import numpy as np
import pytest

from cache_teacher import TeacherCache, write_cache
from conftest import run_script
from topology import (BLOCK, SIGNALS, block_channels, deltas, discrepancy, doc_last_rows, jump_threshold,
                      jumps_and_weights, tv_consecutive)


def analyse(f, doc_len=None, offsets=None, block=BLOCK):
    """The pass of topology.py on an in-memory signal, in one piece: delta, disc, jumps, weights, block channels."""
    n = len(f)
    offsets = np.append(np.arange(0, n, doc_len), n) if offsets is None else np.asarray(offsets)
    last = doc_last_rows(offsets, 0, n)
    d = deltas(f, last)
    disc = discrepancy(f, last)
    valid = ~last
    thr = jump_threshold(d, valid)
    jump, weight = jumps_and_weights(d, valid, thr)
    pad = -n % block
    P = lambda x, v: np.concatenate([x, np.full(pad, v, dtype=x.dtype)])
    ch = block_channels(P(d, 0), P(jump, False), P(valid, False), P(disc, 0), block)
    return dict(delta=d, disc=disc, jump=jump, weight=weight, blocks=ch, thr=thr, last=last)


# --- synthetic signals with known structure -------------------------------------------------------------

def test_planted_steps_are_found():
    """Every planted step is a jump and at least 90% of reported jumps are planted; 1.25x lands after each."""
    rng = np.random.default_rng(0)
    n = 40_000
    f = rng.normal(0, 0.05, n).astype(np.float32)
    steps = np.sort(rng.choice(np.arange(100, n - 100), 100, replace=False))
    for s in steps:
        f[s + 1:] += rng.choice([-2.0, 2.0])  # the signal changes between rows s and s+1
    r = analyse(f, doc_len=n)
    found = np.flatnonzero(r["jump"])
    assert set(steps) <= set(found)
    assert np.isin(found, steps).mean() >= 0.9
    assert (r["weight"][steps + 1] == 1.25).all() and (r["weight"] == 1.25).sum() == len(found)
    # and their variation sits in the jump channel: 100 steps of 2
    assert r["blocks"]["jump"].sum() == pytest.approx(2.0 * len(steps), rel=0.05)


def test_linear_trend_is_smooth():
    """A steady trend: no jumps, disc equal to its slope, its variation in the smooth channel."""
    n, slope = 20_000, 1 / 128  # i/128 is exact in float32: every delta is exactly the slope
    f = (np.arange(n) % 5000 * slope).astype(np.float32)
    r = analyse(f, doc_len=5000)
    assert not r["jump"].any()
    inner = ~np.isin(np.arange(n) % 5000, [4999])
    assert np.allclose(r["disc"][inner], slope, rtol=1e-5)
    ch = r["blocks"]
    assert ch["drift"].sum() < 0.1 * ch["tv"].sum() and ch["smooth"].sum() > 0.9 * ch["tv"].sum()
    # with noise on top the allocation holds
    rng = np.random.default_rng(1)
    noisy = f + rng.normal(0, 0.0005, n).astype(np.float32)
    ch = analyse(noisy, doc_len=5000)["blocks"]
    assert ch["drift"].sum() < 0.1 * ch["tv"].sum()


def cantor(x, depth=30):
    """The Cantor function (devil's staircase) on [0, 1]."""
    y = np.zeros_like(x)
    scale = 0.5
    x = x.copy()
    done = np.zeros(len(x), dtype=bool)
    for _ in range(depth):
        x = x * 3
        digit = np.floor(x)
        x -= digit
        y += np.where(~done & (digit >= 1), scale, 0)  # digit 1: the staircase is flat from here on
        done |= digit == 1
        scale /= 2
    return y


def test_devils_staircase_is_drift():
    """A Cantor-function drift, each step below the jump threshold, lands in the drift channel block by block: each
    block's G is the staircase's rise over that block, nothing in its flat middle third, half the rise in each
    outer third. Sparse noise (isolated up-and-down spikes) would put G where it spikes, not along these values."""
    x = np.linspace(0, 1, 4096, endpoint=False)  # 64 blocks of 64 rows: block b covers x in [b/64, (b+1)/64)
    c = cantor(x)
    # the Cantor function itself, at hand-derived points: 1/9 -> 1/4, 1/4 -> 1/3, [1/3, 2/3] -> 1/2, 3/4 -> 2/3
    assert cantor(np.array([1 / 9, 0.25, 1 / 3, 0.5, 2 / 3 - 1e-9, 0.75])) == pytest.approx([0.25, 1 / 3, 0.5, 0.5, 0.5,
                                                                                           2 / 3], abs=1e-6)
    assert (np.diff(c) >= 0).all() and c[-1] > 0.99  # a monotone staircase from 0 to (nearly) 1
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.3, 20_000).astype(np.float32)  # a noisy document sets the stream's threshold
    stair = (20 * c).astype(np.float32)
    f = np.concatenate([noise, stair])
    offsets = np.array([0, len(noise), len(f)])
    last = doc_last_rows(offsets, 0, len(f))
    d = deltas(f, last)
    valid = ~last
    thr = jump_threshold(d, valid)
    sd = d[len(noise):]
    assert (sd > 0).sum() > 50 and sd.max() < thr  # many steps, each below the threshold
    jump, _ = jumps_and_weights(d, valid, thr)
    assert not jump[len(noise):].any()
    disc = discrepancy(f, last)
    ch = block_channels(d[len(noise):], jump[len(noise):], valid[len(noise):], disc[len(noise):])
    # block b's deltas sum to stair[64b + 64] - stair[64b] (the last block stops at the document's end)
    edges = np.append(stair[::64], stair[-1]).astype(np.float64)
    rise = np.diff(edges)
    assert np.allclose(ch["drift"], rise, atol=1e-4) and ch["jump"].sum() == 0 and ch["smooth"].max() < 1e-6
    # blocks 0-21 reach x = 22/64 > 1/3, blocks 22-41 lie inside [1/3, 2/3], blocks 42-63 start before 2/3
    assert ch["drift"][:22].sum() == pytest.approx(10, abs=1e-4)  # the first third climbs 0 -> 1/2
    assert ch["drift"][22:42].sum() == 0  # the flat middle third: no drift at all
    assert ch["drift"][42:].sum() == pytest.approx(20 * c[-1] - 10, abs=1e-4)  # the last third: 1/2 -> c(1)


# --- brute-force references --------------------------------------------------------------------------------

def test_discrepancy_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, K = int(rng.integers(1, 80)), int(rng.integers(1, 12))
        f = rng.normal(size=n).astype(np.float32)
        last = rng.random(n) < 0.1
        ref = np.zeros(n)
        for i in range(n):
            e = i
            while e < n - 1 and not last[e]:
                e += 1
            js = [j for j in range(1, K + 1) if i + j <= e]
            ref[i] = np.mean([abs(f[i + j] - f[i]) / j for j in js]) if js else 0.0
        assert np.allclose(discrepancy(f, last, K), ref, atol=1e-5)


def test_isolated_jump_gives_harmonic_fraction():
    """At an isolated jump of size J, disc = J * H_K / K (0.34 J for K = 8)."""
    f = np.zeros(100, np.float32)
    f[51:] = 3.0
    d = discrepancy(f, np.eye(1, 100, 99, dtype=bool)[0], K=8)
    assert d[50] == pytest.approx(3.0 * sum(1 / j for j in range(1, 9)) / 8, rel=1e-5)


def test_block_channels_match_brute_force():
    rng = np.random.default_rng(4)
    n = 64 * 30
    d = np.abs(rng.normal(size=n)).astype(np.float32) * (rng.random(n) < 0.7)
    jump = rng.random(n) < 0.05
    valid = rng.random(n) < 0.95
    disc = rng.random(n).astype(np.float32)
    ch = block_channels(d, jump, valid, disc)
    for b in range(30):
        s = slice(64 * b, 64 * b + 64)
        v, j = valid[s], jump[s] & valid[s]
        tv = d[s][v].sum()
        jp = d[s][j].sum()
        sm = d[s][v & ~jump[s]]
        A = len(sm) * min(np.median(sm), np.mean(sm)) if len(sm) else 0.0
        assert ch["tv"][b] == pytest.approx(tv, rel=1e-5)
        assert ch["jump"][b] == pytest.approx(jp, rel=1e-5, abs=1e-6)
        assert ch["smooth"][b] == pytest.approx(A, rel=1e-5, abs=1e-6)
        assert ch["drift"][b] == pytest.approx(tv - jp - A, rel=1e-4, abs=1e-5)
        assert ch["edisc"][b] == pytest.approx(0.5 * (disc[s] ** 2).sum(), rel=1e-5)


def test_tv_matches_dense_reference():
    """tv on random sparse top-k distributions agrees with a slow dense computation over the union."""
    rng = np.random.default_rng(5)
    V, k, n = 300, 16, 60
    ids, lps = [], []
    for t in range(n):
        p = rng.dirichlet(np.ones(V) * 0.1)
        if t % 2:  # make consecutive rows share part of their support
            p = 0.5 * p + 0.5 * prev
        prev = p
        top = np.argsort(-p)[:k]
        ids.append(top)
        lps.append(np.log(p[top]))
    ids, lps = np.array(ids), np.array(lps, dtype=np.float32)
    last = np.zeros(n, bool)
    last[29] = True
    got = tv_consecutive(ids, lps, last)
    for t in range(n - 1):
        if last[t]:
            assert got[t] == 0
            continue
        a = dict(zip(ids[t], np.exp(lps[t].astype(np.float64))))
        b = dict(zip(ids[t + 1], np.exp(lps[t + 1].astype(np.float64))))
        qa, qb = 1 - sum(a.values()), 1 - sum(b.values())
        ref = 0.5 * (sum(abs(a.get(i, 0) - b.get(i, 0)) for i in set(a) | set(b)) + abs(qa - qb))
        assert got[t] == pytest.approx(ref, abs=1e-5)
    assert (got[:-1][~last[:-1]] > 0).all()


# --- the pass over a real cache ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def topo(tiny_topology):
    return tiny_topology


def test_pass_outputs_and_report(topo, tiny_cache):
    """Files, dtypes, the chunked multi-threaded pass equal to the one-piece computation, and the report."""
    cache = TeacherCache(tiny_cache)
    N = len(cache)
    load = lambda n: np.load(os.path.join(topo, n + ".npy"))
    f, delta, disc, jump, weight = (load(n) for n in ["f", "delta", "disc", "jump", "weight"])
    assert f.dtype == np.float32 and jump.dtype == bool and weight.dtype == np.float32 and len(f) == N
    assert np.array_equal(f, np.asarray(cache.arrays["entropy"]))
    r = analyse(f, offsets=cache.doc_offsets)
    assert np.array_equal(delta, r["delta"]) and np.allclose(disc, r["disc"], atol=1e-6)
    assert np.array_equal(jump, r["jump"]) and np.array_equal(weight, r["weight"]) and jump.sum() > 10
    m = json.load(open(os.path.join(topo, "manifest.json")))
    assert m["threshold"] == pytest.approx(r["thr"], rel=1e-6)
    for c in ["tv", "jump", "smooth", "drift", "gap_density", "edisc", "edisc_density"]:
        assert np.allclose(load("block_" + c), r["blocks"][c], rtol=1e-5, atol=1e-6), c
    assert np.allclose(load("block_edisc_density"), load("block_edisc") / 64, rtol=1e-6)  # the promised density
    assert delta[r["last"]].max() == 0 and not jump[r["last"]].any()
    rep = json.load(open(os.path.join(topo, "report.json")))
    assert list(rep["signals"]) == list(SIGNALS)  # every signal of the table, compared on this stream
    for s in rep["signals"].values():
        assert 0 <= s["firing_rate"] < 0.1 and s["delta_std"] > 0
    assert rep["jumps"] == int(jump.sum()) and 0 < rep["tail_mass"]["T=2"]["mean"] < 1
    # per document, beside its jumps, E_disc density and TV: its gap energy, the drift of its own 64-token blocks
    assert len(rep["per_document"]) == cache.n_docs
    for doc in [0, 7, cache.n_docs - 1]:
        a, b = cache.doc_range(doc)
        pd = rep["per_document"][doc]
        G = 0.0
        for s in range(a, b, 64):  # brute force: one block at a time, padded with rows that count for nothing
            e, pad = min(s + 64, b), 64 - (min(s + 64, b) - s)
            P = lambda x, v: np.concatenate([x[s:e], np.full(pad, v, dtype=x.dtype)])
            G += block_channels(P(delta, 0), P(jump, False), P(~r["last"], False), P(disc, 0))["drift"][0]
        assert pd["length"] == b - a and pd["jumps"] == int(jump[a:b].sum()) and G > 0
        assert pd["gap_energy"] == pytest.approx(G, rel=1e-5) and pd["gap_density"] == pytest.approx(G / (b - a), rel=1e-5)
        assert pd["tv"] == pytest.approx(delta[a:b].astype(np.float64).sum(), rel=1e-5)
        assert pd["edisc_density"] == pytest.approx(0.5 * (disc[a:b].astype(np.float64) ** 2).sum() / (b - a), rel=1e-5)
    html = open(os.path.join(topo, "report.html"), encoding="utf-8").read()
    assert html.count("<span") > 100 and "<svg" in html and "http" not in html  # self-contained
    assert m["complete"] and m["upstream"]["cache"] == cache.fingerprint


def test_chunked_pass_equals_one_piece_with_small_chunks(tmp_path, tiny_cache, topo):
    """Chunks of ~600 rows (many chunk borders, some inside 64-token blocks' neighbourhoods) change nothing."""
    out = tmp_path / "small_chunks"
    run_script("topology.py", "--cache", tiny_cache, "--out", out, "--chunk", "600", "--threads", "2")
    for n in ["delta", "disc", "jump", "weight", "block_drift", "block_smooth"]:
        assert np.array_equal(np.load(out / f"{n}.npy"), np.load(os.path.join(topo, n + ".npy"))), n


def test_bad_settings_are_refused(tmp_path, tiny_cache):
    r = run_script("topology.py", "--cache", tiny_cache, "--out", tmp_path / "o", "--K", "0", check=False)
    assert r.returncode != 0 and "--K 0: must be >= 1" in r.stderr and not (tmp_path / "o").exists()


def test_signals_tv_and_surprisal_run(tmp_path, tiny_cache, tiny_teacher):
    """--signal surprisal is the teacher's log-loss on the real next token, recomputed here from the teacher's dense
    logits (a document's last row, which has no next token, holds the value before it); --signal tv stays in [0, 1]."""
    import torch
    from model import Qwen3
    for sig in ["tv", "surprisal"]:
        run_script("topology.py", "--cache", tiny_cache, "--out", tmp_path / sig, "--signal", sig)
    f = np.load(tmp_path / "surprisal" / "f.npy")
    cache = TeacherCache(tiny_cache)
    teacher = Qwen3.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    for d in [0, cache.n_docs - 1]:
        a, b = cache.doc_range(d)
        tokens = torch.from_numpy(np.asarray(cache.tokens[a:b]).astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(teacher(tokens[None])[0].double(), -1)  # (n, V) this document alone
        ref = -logp[torch.arange(b - a - 1), tokens[1:]].numpy()
        assert np.abs(f[a:b - 1] - ref).max() < 1e-4 and f[b - 1] == f[b - 2]
    tv_steps = np.load(tmp_path / "tv" / "delta.npy")
    assert tv_steps.max() <= 1.0 + 1e-6 and tv_steps.mean() > 0.3  # consecutive distributions differ a lot


def test_a_new_signal_is_one_function_and_one_entry(tmp_path, tiny_cache, monkeypatch):
    """The extension point: a signal added to SIGNALS alone (here the teacher's top-1 minus top-2 log-prob) is a
    --signal choice, drives the pass (f.npy equals it on TeacherCache.rows) and joins report.json's comparison.
    Breaks if the pass or the report picks a signal's inputs by its name, or the flag's choices are a fixed list."""
    import topology
    from conftest import run_main
    margin = lambda rows, last: rows["topk_logprobs"][:, 0] - rows["topk_logprobs"][:, 1]
    monkeypatch.setitem(topology.SIGNALS, "example_margin", margin)
    out = tmp_path / "example_margin"
    run_main(topology, "--cache", tiny_cache, "--out", out, "--signal", "example_margin", "--report_positions", "2048")
    cache = TeacherCache(tiny_cache)
    rows = cache.rows(0, len(cache))
    assert np.array_equal(np.load(out / "f.npy"), rows["topk_logprobs"][:, 0] - rows["topk_logprobs"][:, 1])
    rep = json.load(open(out / "report.json"))
    assert rep["signal"] == "example_margin"
    assert list(rep["signals"]) == list(topology.SIGNALS)  # the new signal last, with the rest
    assert rep["signals"]["example_margin"]["delta_std"] > 0


def test_block_flag(tmp_path, tiny_cache):
    """--block 32: the block arrays are the one-piece channels over 32-row blocks, and the manifest says 32."""
    import topology
    from conftest import run_main
    out = tmp_path / "b32"
    run_main(topology, "--cache", tiny_cache, "--out", out, "--block", "32", "--report_positions", "2048")
    t = topology.load(str(out), tiny_cache)
    cache = TeacherCache(tiny_cache)
    r = analyse(np.asarray(t.arrays["f"]), offsets=cache.doc_offsets, block=32)
    assert t.block == 32 and len(t.arrays["block_drift"]) == -(-len(cache) // 32)
    for c in ["drift", "edisc", "edisc_density", "gap_density"]:
        assert np.allclose(t.arrays["block_" + c], r["blocks"][c], rtol=1e-5, atol=1e-6), c


def test_refuses_cache_without_teacher_and_changed_cache(tmp_path, tiny_cache, topo):
    n = 100
    write_cache(str(tmp_path / "sup"), np.arange(n) % 7, np.ones(n), [0, 50, n])
    r = run_script("topology.py", "--cache", tmp_path / "sup", "--out", tmp_path / "o", check=False)
    assert r.returncode != 0 and "--teacher none" in r.stderr
    # same output folder, different cache: refused instead of mixed
    rng = np.random.default_rng(0)
    t = dict(topk_ids=np.tile(np.arange(64), (n, 1)), topk_logprobs=np.full((n, 64), -5.0), lse=np.zeros((n, 2)),
             target_logprob=-rng.random(n), entropy=rng.random(n))
    write_cache(str(tmp_path / "other"), np.arange(n) % 7, np.ones(n), [0, 50, n], t)
    r = run_script("topology.py", "--cache", tmp_path / "other", "--out", topo, check=False)
    assert r.returncode != 0 and "built from other inputs" in r.stderr


def test_numpy_phases_import_without_torch():
    """topology.py and windows.py (and the cache reader they use) need numpy only: with torch unimportable they still
    import. Breaks if any of them, common.py or cache_teacher.py's reader imports torch at module level."""
    import subprocess
    import sys
    from conftest import ROOT
    code = "import sys; sys.modules['torch'] = None; import topology, windows, common, cache_teacher; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
