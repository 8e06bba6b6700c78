"""windows.py: coverage, boundaries, calm cuts, overlaps, curriculum pools, refusal of stale folders."""

import json
import os

import numpy as np
import pytest

from cache_teacher import TeacherCache
from conftest import DATA, run_script
from topology import block_channels
from windows import cut_document, fixed_document, parse_pools, pool_phases, smooth3, window_difficulty


def check_windows(windows, cache, jump=None, window=512):
    """The invariants of a windows file against its cache (and topology jumps)."""
    offsets = np.asarray(cache.doc_offsets)
    covered = np.zeros(len(cache), dtype=np.int64)
    for d, s, l, e in windows:
        a, b = offsets[d], offsets[d + 1]
        assert a <= s <= l < e <= b, (d, s, l, e)  # inside its document
        assert l < b - 1, (d, s, l, e)  # a row to train: not only the document's last row, which has no target
        assert e - s <= window
        covered[l:e] += 1
        if jump is not None and e < b:  # a cut inside the document: not at or beside a jump
            assert not jump[e - 2:e + 1].any(), (e, np.flatnonzero(jump[e - 3:e + 2]))
        if l > s:
            assert 32 <= l - s <= 128  # overlap is context only, 32-128 tokens
    assert (covered == 1).all()  # every row trained exactly once per epoch


@pytest.fixture(scope="module")
def built(tiny_windows):
    from pathlib import Path
    return Path(tiny_windows).parent  # holds cache/, topology/ and windows/


def test_windows_on_real_cache(built, tiny_cache):
    """The invariants, and each overlap starts at the calmest place allowed: the lowest 3-token mean of disc among
    the starts 32-128 tokens before the cut (first one on a tie)."""
    cache = TeacherCache(tiny_cache)
    w = np.load(built / "windows" / "windows.npy")
    jump = np.load(built / "topology" / "jump.npy")
    disc = np.load(built / "topology" / "disc.npy")
    check_windows(w, cache, jump)
    assert (w[:, 2] > w[:, 1]).sum() > 5  # long documents were cut and overlapped
    for d, s, l, e in w[w[:, 2] > w[:, 1]]:
        a, b = cache.doc_range(d)
        sm = smooth3(disc[a:b])
        assert s - a == (l - a - 128) + int(np.argmin(sm[l - a - 128:l - a - 32 + 1]))
    html = open(built / "windows" / "report.html", encoding="utf-8").read()
    assert 'class="cut"' in html


def test_curriculum_pools_nested_and_ordered(built):
    diff = np.load(built / "windows" / "difficulty.npy")
    phase = np.load(built / "windows" / "phase.npy")
    W = len(diff)
    pools = [np.flatnonzero(phase <= p) for p in range(4)]
    assert [len(p) for p in pools] == [int(np.ceil(f * W - 1e-9)) for f in (0.3, 0.55, 0.8, 1.0)]
    for p in range(3):
        assert set(pools[p]) <= set(pools[p + 1])
        assert diff[pools[p]].max() <= diff[np.setdiff1d(pools[p + 1], pools[p])].min()  # easiest first
    assert (diff > 0).all()


def test_difficulty_matches_brute_force(built, tiny_cache):
    """Each window's difficulty: 0.5 sum disc^2 / length + drift summed over its 64-token blocks / length."""
    cache = TeacherCache(tiny_cache)
    topo = {n: np.load(built / "topology" / f"{n}.npy") for n in ["delta", "jump", "disc"]}
    valid = np.ones(len(cache), bool)
    valid[np.asarray(cache.doc_offsets[1:]) - 1] = False
    w = np.load(built / "windows" / "windows.npy")
    got = window_difficulty(topo["delta"], topo["jump"], valid, topo["disc"], w)
    assert np.allclose(got, np.load(built / "windows" / "difficulty.npy"))
    for i in [0, 3, len(w) - 1]:
        _, s, _, e = w[i]
        G = 0.0
        for a in range(s, e, 64):
            b = min(a + 64, e)
            pad = 64 - (b - a)
            P = lambda x, v: np.concatenate([x[a:b], np.full(pad, v, dtype=x.dtype)])
            G += block_channels(P(topo["delta"], 0), P(topo["jump"], False), P(valid, False), P(topo["disc"], 0))["drift"][0]
        ref = (0.5 * (topo["disc"][s:e].astype(np.float64) ** 2).sum() + G) / (e - s)
        assert got[i] == pytest.approx(ref, rel=1e-5)


def test_other_window_sizes(tmp_path, tiny_cache, built):
    """--window 256 (with its own cut range and overlaps) works without --fixed_stride, and keeps the invariants."""
    run_script("windows.py", "--cache", tiny_cache, "--topology", built / "topology", "--out", tmp_path / "w256",
               "--window", "256", "--min_cut", "192", "--overlap_min", "16", "--overlap_max", "64")
    w = np.load(tmp_path / "w256" / "windows.npy")
    cache = TeacherCache(tiny_cache)
    covered = np.zeros(len(cache), int)
    for d, s, l, e in w:
        covered[l:e] += 1
        assert e - s <= 256 and (l == s or 16 <= l - s <= 64)
    assert (covered == 1).all()


def test_cut_document_synthetic():
    """Cuts fall at the calmest allowed place; jumps bar a cut at or beside them; the next window's context starts
    at the calmest place 32-128 tokens before the cut; overlaps in [32, 128]."""
    rng = np.random.default_rng(0)
    n = 3000
    disc = rng.random(n) + 1.0
    jump = np.zeros(n, bool)
    disc[450] = 0.0  # the calmest candidate of the first window...
    jump[449] = True  # ...but a jump sits right at it: barred
    disc[430] = 0.2  # the next calmest wins
    disc[352:355] = 0.0  # the calmest start of the next window's context: 353, 76-78 tokens before the cut
    wins, forced = cut_document(smooth3(disc), jump)
    assert forced == 0
    s, l, e = wins[0]
    assert (s, l) == (0, 0) and e != 450 and abs(e - 430) <= 1
    assert wins[1][:2] == (353, e)
    covered = np.zeros(n, int)
    for s, l, e in wins:
        covered[l:e] += 1
        assert e - s <= 512 and (l == s or 32 <= l - s <= 128)
        assert l == s or not jump[l - 2:l + 1].any()
    assert (covered == 1).all()
    # a stretch with jumps everywhere: the cut is forced, and counted
    wins, forced = cut_document(smooth3(disc), np.ones(n, bool))
    assert forced >= 1 and all(e - s <= 512 for s, _, e in wins)


def test_short_documents_and_fixed_stride():
    assert cut_document(smooth3(np.ones(300)), np.zeros(300, bool)) == ([(0, 0, 300)], 0)
    assert fixed_document(1200) == [(0, 0, 512), (512, 512, 1024), (1024, 1024, 1200)]
    assert fixed_document(700, 512, 400) == [(0, 0, 512), (400, 512, 700)]
    # 513 rows: a cut at 512 would leave a window whose only row, the last, has no target: end one row earlier
    assert fixed_document(513) == [(0, 0, 511), (511, 511, 513)]
    sm = smooth3(np.linspace(2, 1, 513))  # calmest at the very end: the cut wants e = 512 = n - 1
    wins, _ = cut_document(sm, np.zeros(513, bool))
    assert wins[0][2] == 511 and wins[1][1:] == (511, 513)


class Stub:
    """A cache of one document of 300 rows, for check_windows."""
    doc_offsets = np.array([0, 300])

    def __len__(self):
        return 300


def test_check_windows_catches_bad_windows():
    """check_windows accepts a good tiling and rejects a window that trains only the document's last row, a row
    trained twice and a row never trained."""
    check_windows(np.array([[0, 0, 0, 298], [0, 200, 298, 300]]), Stub())
    for bad in [[[0, 0, 0, 299], [0, 200, 299, 300]], [[0, 0, 0, 298], [0, 200, 297, 300]],
                [[0, 0, 0, 297], [0, 200, 298, 300]]]:
        with pytest.raises(AssertionError):
            check_windows(np.array(bad), Stub())


def test_fixed_stride_cli(tmp_path, tiny_cache):
    run_script("windows.py", "--cache", tiny_cache, "--out", tmp_path / "fixed", "--fixed_stride")
    w = np.load(tmp_path / "fixed" / "windows.npy")
    check_windows(w, TeacherCache(tiny_cache))
    assert (w[:, 1] == w[:, 2]).all() and (np.load(tmp_path / "fixed" / "phase.npy") == 0).all()


def test_pool_phases_small():
    assert list(pool_phases(np.array([5.0, 1, 4, 2, 3, 0, 9, 8, 7, 6]))) == [1, 0, 1, 0, 1, 0, 3, 3, 2, 2]  # pools of 3, 6, 8, 10
    assert list(pool_phases(np.array([3.0, 1, 2, 0]), parse_pools("0.5,1"))) == [1, 0, 1, 0]
    for bad in ["0.5,0.3,1", "0.3,0.8", "0,1", "a,1", "0.5,1.5"]:
        with pytest.raises(ValueError, match="--pools"):
            parse_pools(bad)


def test_difficulty_uses_the_topology_block(tmp_path, tiny_cache, built):
    """windows.py lays the difficulty's blocks out with the --block its topology folder was built with."""
    import topology
    import windows
    from conftest import run_main
    run_main(topology, "--cache", tiny_cache, "--out", tmp_path / "t32", "--block", "32", "--report_positions", "2048")
    run_main(windows, "--cache", tiny_cache, "--topology", tmp_path / "t32", "--out", tmp_path / "w32")
    w = windows.load(str(tmp_path / "w32"), tiny_cache)
    cache = TeacherCache(tiny_cache)
    topo = {n: np.load(tmp_path / "t32" / f"{n}.npy") for n in ["delta", "jump", "disc"]}
    valid = np.ones(len(cache), bool)
    valid[np.asarray(cache.doc_offsets[1:]) - 1] = False
    for block in [32, 64]:
        got = window_difficulty(topo["delta"], topo["jump"], valid, topo["disc"], w.windows, block)
        assert np.allclose(got, w.difficulty) == (block == 32)


def test_topology_from_older_cache_is_refused(tmp_path, tiny_teacher, demo_tokenizer, built):
    """Rebuild the cache under the topology's feet: windows.py refuses the stale topology."""
    cache2 = tmp_path / "cache2"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(open(DATA).readlines()[:3]))
    run_script("cache_teacher.py", "--data", data, "--teacher", tiny_teacher, "--tokenizer", demo_tokenizer,
               "--out", cache2, "--dtype", "float32", "--device", "cpu")
    r = run_script("windows.py", "--cache", cache2, "--topology", built / "topology", "--out", tmp_path / "w",
                   check=False)
    assert r.returncode != 0 and "was built from a different cache" in r.stderr
    m = json.load(open(built / "windows" / "manifest.json"))
    assert m["upstream"]["topology"] == json.load(open(built / "topology" / "manifest.json"))["fingerprint"]
