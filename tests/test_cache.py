"""cache_teacher.py: DualMind restructuring, exact reconstruction from the cache, alignment, resume, torchrun, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cache_teacher import TeacherCache, pack_ids18, tail_mass, unpack_ids18
from common import (ROLES, dualmind_text, examine_segment, is_trigger, record_to_blocks, segments, split_cot,
                    token_roles)
from conftest import DATA, ROOT, SHARED_TOKENIZER, make_teacher, run_main, run_script
from model import Qwen3


def build(tmp_path, teacher, tokenizer, name="cache", data=(DATA,), extra=()):
    out = tmp_path / name
    r = run_script("cache_teacher.py", "--data", *data, "--teacher", teacher, "--tokenizer", tokenizer, "--out", out,
                   "--dtype", "float32", "--device", "cpu", *extra)
    return out, r


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return TeacherCache(tiny_cache)


# --- DualMind ------------------------------------------------------------------------------------------

def records(path=DATA):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def realistic_records():
    """The bundled records written like long-reasoning traces (paragraphs, display math): those with line breaks."""
    return [r for r in records() if "\n" in r["CoT"]]


def seg_texts(text):
    return [text[a:b] for a, b in segments(text)]


def test_segments_at_sentence_ends_and_line_breaks_only():
    """Cuts at sentence ends and line breaks; never inside math (inline, display across lines), after an
    abbreviation, inside a number, after a list number or at an ellipsis. Expected segments written by hand."""
    text = ("We use g = 9.81 m/s^2 and k = 3.0e-6 N/m, e.g. for Fig. 2 vs. Eq. (3), approx. 5 s. Inline \\( a. b \\) "
            "and $x. y$ stay whole. Display math:\n\\[\nE = mc^2. \\quad p = 0.\n\\]\n$$ a.\n b $$ then text. "
            "Next!\n1. First step.\n2) Second (i.e. the last) step?\nHmm... let me see. \"Quoted.\" Done\n\n"
            "**Final Answer**\n\\boxed{4}")
    assert seg_texts(text) == [
        "We use g = 9.81 m/s^2 and k = 3.0e-6 N/m, e.g. for Fig. 2 vs. Eq. (3), approx. 5 s.",
        "Inline \\( a. b \\) and $x. y$ stay whole.", "Display math:", "\\[\nE = mc^2. \\quad p = 0.\n\\]",
        "$$ a.\n b $$ then text.", "Next!", "1. First step.", "2) Second (i.e. the last) step?", "Hmm... let me see.",
        "\"Quoted.\"", "Done", "**Final Answer**", "\\boxed{4}"]


def test_trigger_rule_takes_last_trigger_past_half():
    """An early 'But wait' is skipped; the last late trigger opens <examine>."""
    cot = ("We start. But wait, an early doubt. Then step two. Step three. Step four. "
           "Let me check the sign. It holds. To verify, substitute back. Done.")
    explore, examine = split_cot(cot)
    assert examine == "To verify, substitute back. Done."
    assert explore.endswith("It holds.") and "But wait" in explore


def test_trigger_counts_only_past_the_first_half():
    """A trigger starting one character before the middle of the CoT is not used (70/30 instead); one character
    later it opens <examine>. Breaks if the 'past the first half' condition is dropped or moved."""
    head, trig = "Step one is plain. Step two is plain too. Step three.", "Let me check the sign."
    for before in [True, False]:
        start = len(head) + 1  # where the trigger starts
        n = 2 * start + (1 if before else 0)  # total length: the trigger starts just before / exactly at the middle
        tail = "So " + "o" * (n - start - len(trig) - 5) + "."
        cot = f"{head} {trig} {tail}"
        assert len(cot) == n and cot.index(trig) == start
        how, i = examine_segment(cot, segments(cot))
        explore, examine = split_cot(cot)
        if before:
            assert how == "fallback" and not examine.startswith(trig)
        else:
            assert how == "trigger" and examine == f"{trig} {tail}" and explore == head


def test_seventy_thirty_fallback():
    """No trigger: the cut is the segment boundary nearest 70% of the characters, never an empty <examine>."""
    cot = " ".join(f"Step {i} is plain." for i in range(10))
    explore, examine = split_cot(cot)
    assert len(segments(explore)) == 7 and len(segments(examine)) == 3
    assert split_cot("Only one sentence.") == ("Only one sentence.", "")
    assert split_cot("One. Two.") == ("One.", "Two.")
    lines = "\n".join(f"x_{i:02d} = {i:02d} + y" for i in range(12))  # 12 equation lines of 14 characters, no punctuation
    explore, examine = split_cot(lines)  # 179 characters: 70% is 125.3, line 8 starts at 120 and line 9 at 135
    assert explore + "\n" + examine == lines and examine.startswith("x_08 =")


@pytest.mark.parametrize("s, yes", [
    ("Let me double-check the units.", True), ("However, the limit differs.", True), ("But wait, that is wrong.", True),
    ("To verify, plug back in.", True), ("As a sanity check, set k = 0.", True), ("Substitute back into the ODE.", True),
    ("Checking is hard, so we move on.", True), ("Now, let me check the sign.", True),
    ("Hmm, let me double-check the algebra.", True), ("But let me verify this.", True), ("Let me re-check it.", True),
    ("Okay, so to confirm the result:", True), ("Wait, let me recheck.", True), ("**Verification**", True),
    ("**Check:**", True), ("### Verification", True), ("2. Verify the limits.", True), ("Let me make sure.", True),
    ("As a quick final check, units.", True), ("The checkpoint is fine.", False), ("We verify nothing here, so.", False),
    ("Waiting time is 3 s.", False), ("Now we have the answer.", False), ("But the field vanishes.", False),
    ("Hmm, a double root.", False), ("**Final Answer**", False), ("Make sure the units match.", False),
    ("Let me compute the sum.", False), ("So the check passes.", False)])
def test_trigger_words(s, yes):
    assert is_trigger(s) == yes


def test_every_bundled_record_survives_byte_for_byte():
    """explore and examine are the two slices of each bundled CoT: joined with the whitespace at the split point they
    give the CoT back exactly (newlines and LaTeX included); the question and the response stay as they are."""
    fields = dict(question="question", cot="CoT", response="response", explore="explore", examine="examine")
    recs = records()
    for i, r in enumerate(recs):
        cot = r["CoT"].strip()
        q, explore, examine, resp = record_to_blocks(r, f"record {i}", fields)
        sep = cot[len(explore):len(cot) - len(examine)]
        assert cot.startswith(explore) and cot.endswith(examine) and explore + sep + examine == cot, i
        assert sep.strip() == "" and (sep or not examine) and examine and explore, (i, sep)
        assert q == r["question"].strip() and resp == r["response"].strip()
        text, _ = dualmind_text(q, explore, examine, resp)
        assert f"\n{explore}\n</explore>\n\n<examine>\n{examine}\n" in text and f"\n{resp}\n</response>" in text
    n_lines = sum(r["CoT"].strip().count("\n") for r in recs)
    kept = sum(sum(b.count("\n") for b in record_to_blocks(r, "", fields)[1:3]) for r in recs)
    assert n_lines > 200 and n_lines - kept <= 2 * len(recs)  # only the newlines at the split points go


# The opening of <examine> in each realistic record, read off by hand: the last verification opener past the middle,
# whatever its form (after an equation line, a header, an interjection), or the 70/30 fallback where there is none.
REALISTIC_EXAMINE = [
    ("trigger", "Let me verify by substituting back into the equation."),
    ("trigger", "### Verification\nI will substitute it back"),
    ("trigger", "Check: \\( y'' = \\cos t \\)"),
    ("trigger", "Now, let me check the stability claims"),
    ("trigger", "Hmm, let me double-check with momentum conservation"),
    ("trigger", "**Check:**\nThe limits should be right"),
    ("fallback", "The signal speed is \\( v = 1/\\sqrt{L'C'} \\)."),
    ("trigger", "But let me verify this against the Joule heating"),
    ("trigger", "Let me re-check the ISCO radius"),
    ("trigger", "**Verification**\nThe hovering observer"),
]


def test_realistic_records_examine_start():
    recs = realistic_records()
    assert len(recs) == len(REALISTIC_EXAMINE) and len({r["domain"] for r in recs}) == 4
    for r, (how_want, opening) in zip(recs, REALISTIC_EXAMINE):
        cot = r["CoT"].strip()
        how, _ = examine_segment(cot, segments(cot))
        explore, examine = split_cot(cot)
        assert (how, examine[:len(opening)]) == (how_want, opening), r["question"][:50]
        assert "**Final Answer**" in examine and "\\boxed{" in examine


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER), reason="../shared/qwen3-tokenizer not present")
def test_realistic_records_roles_with_real_qwen3_tokenizer():
    """Every token of every realistic record, tokenised by Qwen3: its role is that of the block its first character
    lies in, and the tokens of each role decode to exactly that block's text (no token straddles two blocks)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(SHARED_TOKENIZER, "tokenizer.json"))
    fields = dict(question="question", cot="CoT", response="response", explore="explore", examine="examine")
    for r, (_, opening) in zip(realistic_records(), REALISTIC_EXAMINE):
        text, spans = dualmind_text(*record_to_blocks(r, "", fields))
        enc = tok.encode(text, add_special_tokens=False)
        roles = token_roles(enc.offsets, spans)
        for (a, _), role in zip(enc.offsets, roles):  # brute force: the span holding the token's first character
            assert role == next(rr for s, e, rr in spans if s <= a < e)
        for s, e, role in spans:
            assert tok.decode([i for i, rr in zip(enc.ids, roles) if rr == role]) == text[s:e]
        examine = next(text[s:e] for s, e, rr in spans if rr == ROLES["examine"])
        assert examine.startswith("<examine>\n" + opening) and list(roles) == sorted(roles)


def check_roles_on(tok):
    q, e, x, r = "Find ∇·E = ρ/ε₀ for \\frac{q}{4\\pi r^2}.", "By Gauss, Φ = Q/ε₀ — über.", "Check: units ✓.", "Done: E=ρ/ε₀."
    text, spans = dualmind_text(q, e, x, r)
    enc = tok.encode(text, add_special_tokens=False)
    roles = token_roles(enc.offsets, spans)
    by_role = {v: tok.decode([i for i, rr in zip(enc.ids, roles) if rr == v]) for v in ROLES.values()}
    assert by_role[0].startswith("##USER:") and "ρ/ε₀" in by_role[0] and "<explore>" not in by_role[0]
    assert by_role[1].startswith("<explore>") and "über" in by_role[1] and "</explore>" in by_role[1]
    assert by_role[2].startswith("<examine>") and "✓" in by_role[2] and "</examine>" in by_role[2]
    assert by_role[3].startswith("<response>") and by_role[3].endswith("</response>")
    assert list(roles) == sorted(roles)  # blocks in order, no token assigned backwards


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER), reason="../shared/qwen3-tokenizer not present")
def test_roles_with_real_qwen3_tokenizer():
    """Multi-token tags, unicode and LaTeX: each token's role comes from its offset, not from re-tokenising."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(SHARED_TOKENIZER, "tokenizer.json"))
    assert len(tok.encode("<explore>", add_special_tokens=False).ids) > 1  # tags are not single tokens in Qwen3
    check_roles_on(tok)


def test_roles_with_demo_tokenizer(demo_tokenizer):
    from tokenizers import Tokenizer
    check_roles_on(Tokenizer.from_file(os.path.join(demo_tokenizer, "tokenizer.json")))


# --- the cache: exactness and alignment ---------------------------------------------------------------

def dense_reference(teacher, tokens):
    m = Qwen3.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(tokens.astype(np.int64))[None])[0].double()  # (T, V)


def test_reconstruction_and_alignment(cache, tiny_teacher):
    """Top-k probabilities and tail mass at T=1 and T=2 from the cache alone match a dense computation
    (<= 1e-3 absolute); row t is the distribution for token t+1; documents are computed independently."""
    assert cache.has_teacher and cache.k == 64 and cache.temperatures == [1.0, 2.0]
    worst = 0.0
    for d in [0, 5, cache.n_docs - 1]:
        r = cache.doc(d)
        z = dense_reference(tiny_teacher, r["tokens"])  # this document alone: no leakage across boundaries
        for ti, T in enumerate([1.0, 2.0]):
            q = torch.softmax(z / T, -1).numpy()
            ids = r["topk_ids"]
            dense_top = np.take_along_axis(q, ids, 1)
            cached_top = np.exp((r["topk_logprobs"] + r["lse"][:, :1]) / T - r["lse"][:, ti:ti + 1])
            worst = max(worst, np.abs(dense_top - cached_top).max())
            dense_tail = 1 - dense_top.sum(1)
            cached_tail = tail_mass(r["topk_logprobs"], r["lse"], ti, T)
            worst = max(worst, np.abs(dense_tail - cached_tail).max())
            assert dense_tail.max() > 0.05  # the tail is not negligible here, so the check has teeth
        # the ids are the dense top-64, in descending order
        top = torch.topk(z, 64, -1)
        assert (np.sort(top.indices.numpy(), 1) == np.sort(r["topk_ids"], 1)).mean() > 0.999
        assert (np.diff(r["topk_logprobs"], axis=1) <= 0).all()
        # row t predicts token t+1: the target log-prob is the dense log-prob of the next token
        logp = torch.log_softmax(z, -1).numpy()
        nxt = r["tokens"][1:].astype(np.int64)
        assert np.abs(r["target_logprob"][:-1] - logp[np.arange(len(nxt)), nxt]).max() < 1e-4
        assert r["target_logprob"][-1] == 0.0  # the last row of a document has no target
        ent = -(np.exp(logp) * logp).sum(1)
        assert np.abs(r["entropy"] - ent).max() < 1e-4
    assert worst <= 1e-3, worst


@pytest.mark.parametrize("V", [2112, 1088, 4096, 1000])
def test_group_topk_equals_topk(V):
    """group_topk against torch.topk: values and ids, sorted descending, for vocabularies it splits into 8, 4 and
    16 groups and one it cannot split (1000 = 8 x 125 < 4k); distinct values, so the ids are unique. The last rows
    put the whole top-k into 16 strided groups, 4 ids in each."""
    from cache_teacher import group_topk
    g = torch.Generator().manual_seed(V)
    z = torch.randperm(200 * V, generator=g)[:64 * V].float().view(64, V)  # distinct values
    hot = torch.arange(V) % (V // 4) < 16  # 64 ids, 4 in each of 16 strided groups, whatever the group count
    z[-8:, hot] += 1e7  # rows whose whole top-k sits in those 16 groups
    top, ids = group_topk(z, 64)
    ref = torch.topk(z, 64, dim=-1)
    assert torch.equal(top, ref.values) and torch.equal(ids, ref.indices)


def test_bytes_per_position_and_dtypes(cache):
    """The teacher record fits 400 B per position at k=64 with two temperatures (18-bit ids: 288 B)."""
    m = cache.manifest
    assert m["teacher_bytes_per_position"] <= 400
    assert cache.tokens.dtype == np.uint32 and cache.roles.dtype == np.uint8 and cache.doc_offsets.dtype == np.int64
    assert cache.arrays["topk_logprobs"].dtype == np.float16 and cache.arrays["lse"].shape[1] == 2
    assert cache.doc_offsets[0] == 0 and cache.doc_offsets[-1] == len(cache) and m["counts"]["documents"] == len(records())
    ends = cache.tokens[cache.doc_offsets[1:] - 1]
    assert (ends == ends[0]).all()  # every document ends with the end token


def test_pack_ids18_round_trip():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << 18, size=(100, 64))
    ids[0, :4] = [0, (1 << 18) - 1, 151935, 1]
    packed = pack_ids18(ids)
    assert packed.shape == (100, 144) and packed.dtype == np.uint8
    assert np.array_equal(unpack_ids18(packed), ids)


def test_any_chunk_gives_the_same_bytes(tmp_path, tiny_teacher, demo_tokenizer):
    """--chunk 100 and 7 (short last blocks of statistics, rows at every place of a BLAS row group) write the same
    bytes as the default 1024. Breaks if a short block reads targets past its chunk, or if the logits of a row
    depend on the chunk it falls in."""
    import cache_teacher
    outs = {}
    for chunk in [1024, 100, 7]:
        outs[chunk] = tmp_path / f"c{chunk}"
        run_main(cache_teacher, "--data", DATA, "--teacher", tiny_teacher, "--tokenizer", demo_tokenizer, "--out",
                 outs[chunk], "--dtype", "float32", "--device", "cpu", "--max_docs", "1", "--chunk", chunk)
    assert TeacherCache(str(outs[7])).n_docs == 1 and len(TeacherCache(str(outs[7]))) > 200
    for chunk in [100, 7]:
        assert same_arrays(str(outs[chunk]), str(outs[1024])), chunk


def test_moe_teacher(tmp_path, demo_tokenizer):
    """A Qwen3-MoE teacher caches through the same path."""
    t = make_teacher(tmp_path / "moe", 1088, moe=True)
    out, _ = build(tmp_path, t, demo_tokenizer, extra=["--max_docs", "3"])
    c = TeacherCache(str(out))
    r = c.doc(1)
    z = dense_reference(t, r["tokens"])
    logp = torch.log_softmax(z, -1).numpy()
    nxt = r["tokens"][1:].astype(np.int64)
    assert np.abs(r["target_logprob"][:-1] - logp[np.arange(len(nxt)), nxt]).max() < 1e-4


# --- resume, refusal, torchrun --------------------------------------------------------------------------

ARRAYS = ["tokens", "roles", "doc_offsets", "topk_ids", "topk_logprobs", "lse", "target_logprob", "entropy"]


def same_arrays(a, b):
    return all(open(os.path.join(a, n + ".npy"), "rb").read() == open(os.path.join(b, n + ".npy"), "rb").read()
               for n in ARRAYS)


def test_kill_and_resume_is_byte_identical(tmp_path, tiny_teacher, demo_tokenizer, cache):
    """kill -9 part-way, run again: it continues and ends with files identical to an uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "cache_teacher.py"), "--data", DATA, "--teacher", tiny_teacher,
           "--tokenizer", demo_tokenizer, "--out", str(out), "--dtype", "float32", "--device", "cpu",
           "--batch_tokens", "3000"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    prog = out / "progress.0.json"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            if len(json.load(open(prog))) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    m = json.load(open(out / "manifest.json"))
    assert m["complete"] is False  # killed before the end: the folder does not look finished
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(str(out))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert same_arrays(str(out), cache.folder)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert "nothing to do" in r.stdout


def test_changed_inputs_are_refused(tmp_path, tiny_teacher, demo_tokenizer, cache):
    """A different teacher or data into a folder holding another cache is refused, not mixed."""
    other = make_teacher(tmp_path / "t2", 1088, seed=1)
    base = ["--tokenizer", demo_tokenizer, "--out", cache.folder, "--dtype", "float32", "--device", "cpu",
            "--batch_tokens", "3000"]
    r = run_script("cache_teacher.py", "--data", DATA, "--teacher", other, *base, check=False)
    assert r.returncode != 0 and "built from other inputs" in r.stderr
    d2 = tmp_path / "d.jsonl"
    d2.write_text(open(DATA).read().replace("Solve", "Solve now", 1))
    r = run_script("cache_teacher.py", "--data", d2, "--teacher", tiny_teacher, *base, check=False)
    assert r.returncode != 0 and "built from other inputs" in r.stderr
    assert TeacherCache(cache.folder).manifest["complete"]  # untouched


def test_torchrun_two_processes_same_cache(tmp_path, tiny_teacher, demo_tokenizer, cache):
    """torchrun --nproc_per_node=2 (gloo, CPU) splits the batches and writes the same bytes as one process."""
    out = tmp_path / "tr"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "cache_teacher.py"), "--data", DATA, "--teacher", tiny_teacher,
                        "--tokenizer", demo_tokenizer, "--out", str(out), "--dtype", "float32", "--device", "cpu",
                        "--batch_tokens", "3000"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_arrays(str(out), cache.folder)


def test_teacher_none_and_hub_dataset(tmp_path, demo_tokenizer):
    """--teacher none writes tokens and roles only; a Hub dataset id resolves through the offline cache."""
    from test_model import write_hub_cache
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text("".join(open(DATA).readlines()[:4]))
    write_hub_cache(str(tmp_path / "hub"), "some-org/cot-4", str(src))
    hub = str(tmp_path / "hub")
    env = dict(HF_HUB_OFFLINE="1", HF_HUB_CACHE=hub, HF_HOME=str(tmp_path / "home"))
    # the helper lays out a model repo; a dataset repo lives under datasets--org--name
    os.rename(os.path.join(hub, "models--some-org--cot-4"), os.path.join(hub, "datasets--some-org--cot-4"))
    out = tmp_path / "sup"
    run_script("cache_teacher.py", "--data", "some-org/cot-4", "--teacher", "none", "--tokenizer", demo_tokenizer,
               "--out", out, env=env)
    c = TeacherCache(str(out))
    assert not c.has_teacher and c.n_docs == 4 and set(np.unique(c.roles)) == {0, 1, 2, 3}
    assert not (out / "topk_ids.npy").exists()


# --- bad input -------------------------------------------------------------------------------------------

def bad(tmp_path, teacher, tokenizer, content, *extra, name="bad.jsonl"):
    """cache_teacher.main on a data file with `content`, in this process."""
    import cache_teacher
    p = tmp_path / name
    p.write_text(content)
    return run_main(cache_teacher, "--data", p, "--teacher", teacher, "--tokenizer", tokenizer, "--out", tmp_path / "o",
                    "--dtype", "float32", "--device", "cpu", *extra)


def test_bad_inputs(tmp_path, tiny_teacher, demo_tokenizer):
    """Each a ValueError naming the file and line (or record), and from the shell a non-zero exit."""
    rec = json.dumps({"question": "Q?", "CoT": "A. B.", "response": "R."})
    cases = [
        (rec + "\n{not json\n", r"bad.jsonl:2: invalid JSON"),
        (rec + "\n" + json.dumps({"question": "Q?", "response": "R."}) + "\n", r"bad.jsonl:2: record has no field 'CoT'"),
        ("", r"bad.jsonl: no records \(empty file\)"),
        (json.dumps({"question": "  ", "CoT": "A.", "response": "R."}) + "\n", r"bad.jsonl:1: field 'question' is empty"),
        (json.dumps({"question": "Q", "explore": "A.", "examine": None, "response": "R."}) + "\n" +
         json.dumps({"question": "Q", "explore": "A.", "examine": 3, "response": "R."}) + "\n",
         r"bad.jsonl:2: field 'examine' is not text"),
    ]
    for content, msg in cases:
        with pytest.raises(ValueError, match=msg):
            bad(tmp_path, tiny_teacher, demo_tokenizer, content)
    p = tmp_path / "shell.jsonl"
    p.write_text(rec + "\n{not json\n")
    r = run_script("cache_teacher.py", "--data", p, "--teacher", tiny_teacher, "--tokenizer", demo_tokenizer,
                   "--out", tmp_path / "o2", check=False)
    assert r.returncode != 0 and r.stderr.startswith("cache_teacher.py: error:") and "shell.jsonl:2" in r.stderr


def test_too_long_documents(tmp_path, tiny_teacher, demo_tokenizer, capsys):
    """Longer than --max_len: skipped with a count, or cut, as --too_long says."""
    short = json.dumps({"question": "Q?", "CoT": "A. B.", "response": "R."})
    long_ = json.dumps({"question": "Q?", "CoT": "Step. " * 400, "response": "R."})
    bad(tmp_path, tiny_teacher, demo_tokenizer, f"{short}\n{long_}\n", "--max_len", "200")
    assert "1 too long (skip)" in capsys.readouterr().out
    assert TeacherCache(str(tmp_path / "o")).n_docs == 1
    bad(tmp_path, tiny_teacher, demo_tokenizer, f"{short}\n{long_}\n", "--max_len", "200", "--too_long", "truncate",
        "--force")
    c = TeacherCache(str(tmp_path / "o"))
    assert c.n_docs == 2 and c.doc_range(1)[1] - c.doc_range(1)[0] == 200
    with pytest.raises(ValueError, match="1 longer than --max_len 200"):
        bad(tmp_path, tiny_teacher, demo_tokenizer, f"{long_}\n", "--max_len", "200", "--force")


def test_tokenizer_beyond_teacher_vocab(tmp_path, demo_tokenizer):
    small = make_teacher(tmp_path / "small", vocab_size=512)
    with pytest.raises(ValueError, match="beyond the teacher's vocabulary of 512"):
        bad(tmp_path, small, demo_tokenizer, json.dumps({"question": "Q?", "CoT": "A.", "response": "R."}) + "\n")


def test_parquet_records(tmp_path, demo_tokenizer, monkeypatch):
    """Parquet files (the 0xZee datasets' format) read like JSONL; without pyarrow, a clear install hint."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import common
    recs = [json.loads(l) for l in open(DATA).readlines()[:3]]
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("question", "CoT", "response")} for r in recs]),
                   tmp_path / "train-00000-of-00001.parquet")
    got = list(common.read_records(str(tmp_path / "train-00000-of-00001.parquet")))
    assert [w for w, _ in got][-1].endswith(":row 2") and got[1][1]["question"] == recs[1]["question"]
    run_script("cache_teacher.py", "--data", tmp_path / "train-00000-of-00001.parquet", "--teacher", "none",
               "--tokenizer", demo_tokenizer, "--out", tmp_path / "c")
    assert TeacherCache(str(tmp_path / "c")).n_docs == 3
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ValueError, match="pip install pyarrow"):
        list(common.read_records(str(tmp_path / "train-00000-of-00001.parquet")))
