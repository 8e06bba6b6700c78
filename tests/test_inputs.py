"""Bad input a user can type, through the real command lines: each a non-zero exit and one line naming the file,
line or value, no traceback, and no folder left behind that a later phase could take for its input."""

import json
import re
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from common import check_ranges, is_hub_id, read_jsonl
from conftest import DATA, STUDENT_CFG, assert_one_line_error, make_teacher, run_main, run_scripts

NO_CUDA = not torch.cuda.is_available()
REC = json.dumps({"question": "Q?", "CoT": "A. B.", "response": "R."})

# --- the pure checks, against hand-derived cases -------------------------------------------------------------------


@pytest.mark.parametrize("interval, good, bad", [
    ("[0, inf)", [0, 3, 10**9], [-1, float("inf"), float("nan")]),
    ("(0, 1]", [1e-9, 0.5, 1.0], [0.0, -1e-9, 1.0000001, float("inf"), float("nan"), 1e39]),
    ("(0, inf]", [1e-9, float("inf")], [0, float("nan")]),
    ("[-1, inf)", [-1, 0, 7], [-2]),
    ("[0, 1)", [0.0, 0.999], [1.0, -0.1]),
])
def test_check_ranges_by_hand(interval, good, bad):
    """Open and closed ends as written, nan always outside, inf inside only a closed infinite end."""
    for v in good:
        check_ranges(SimpleNamespace(x=v), x=interval)
    for v in bad:
        with pytest.raises(ValueError, match=re.escape(f"--x {v}: must be")):
            check_ranges(SimpleNamespace(x=v), x=interval)


def test_read_jsonl_names_line_and_place(tmp_path):
    """Not UTF-8: the line and the byte; not JSON: the line and the column, or the end of the line (a missing closing
    brace, which json itself places at column 1 of a second line); a BOM and blank lines are fine."""
    p = tmp_path / "r.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + REC.encode() + b"\n\n" + REC.encode() + b"\r\n")
    assert [i for i, _ in read_jsonl(str(p))] == [1, 3]
    cases = [(REC.encode() + b'\n{"a": "\xb1"}\n', r"r.jsonl:2: not UTF-8 text \(byte 0xb1 at byte 8 of the line\)"),
             (REC[:-1].encode() + b"\n", r"r.jsonl:1: invalid JSON \(Expecting ',' delimiter at the end of the line\)"),
             (b'{"a": 1} x\n', r"r.jsonl:1: invalid JSON \(Extra data at column 10\)")]
    for content, msg in cases:
        p.write_bytes(content)
        with pytest.raises(ValueError, match=msg):
            list(read_jsonl(str(p)))


def test_is_hub_id():
    """A name ending like a file is a (mistyped) local path, never a Hub id; org/name forms are."""
    assert is_hub_id("0xZee/dataset-CoT-General-Relativity-76") and is_hub_id("Qwen/Qwen2.5-1.5B")
    assert not any(map(is_hub_id, ["dta/physics_cot.jsonl", "dta/x.parquet", "./a/b", "/a/b", "a/b/c", "data/nope"]))


# --- the scripts ---------------------------------------------------------------------------------------------------


def test_cache_teacher_bad_inputs(tmp_path, tiny_teacher, demo_tokenizer):
    """Records not UTF-8 or missing a brace, a truncated tokenizer.json, a mistyped path, a truncated or mismatched
    teacher (found before any tokenising or allocation: no folder is made), cuda without CUDA, flags out of range."""
    (tmp_path / "latin1.jsonl").write_bytes(REC.encode() + b'\n{"question": "\xb1", "CoT": "A.", "response": "R."}\n')
    (tmp_path / "brace.jsonl").write_text(REC + "\n" + REC[:-1] + "\n")
    tok = tmp_path / "tok"
    shutil.copytree(demo_tokenizer, tok)
    text = (tok / "tokenizer.json").read_text()
    (tok / "tokenizer.json").write_text(text[:len(text) // 2])
    cut = tmp_path / "cut"
    shutil.copytree(tiny_teacher, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(cut / "model.safetensors") - 1000)
    deeper = tmp_path / "deeper"
    shutil.copytree(tiny_teacher, deeper)
    cfg = json.load(open(deeper / "config.json"))
    (deeper / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] + 1)))
    cases = [  # (extra arguments, what the one line must name)
        (["--data", tmp_path / "latin1.jsonl"], ["latin1.jsonl:2: not UTF-8", "0xb1"]),
        (["--data", tmp_path / "brace.jsonl"], ["brace.jsonl:2: invalid JSON", "at the end of the line"]),
        (["--data", DATA, "--tokenizer", tok], [f"{tok / 'tokenizer.json'}: not a readable tokenizer.json", "EOF"]),
        (["--data", "dta/physics_cot.jsonl"], ["dta/physics_cot.jsonl: no such file"]),
        (["--data", DATA, "--teacher", cut], [f"{cut / 'model.safetensors'}: truncated safetensors file"]),
        (["--data", DATA, "--teacher", deeper], ["does not match the config", "model.layers.2."]),
    ] + ([(["--data", DATA, "--device", "cuda"], ["--device cuda: ", "use --device cpu"])] if NO_CUDA else [])
    base = lambda out: ["--teacher", tiny_teacher, "--tokenizer", demo_tokenizer, "--device", "cpu", "--dtype",
                        "float32", "--out", out]  # later flags win: --tokenizer, --teacher, --device overridden
    runs = [("cache_teacher.py", *base(tmp_path / f"out{i}"), *extra) for i, (extra, _) in enumerate(cases)]
    for i, (r, (_, needles)) in enumerate(zip(run_scripts(runs), cases)):
        assert_one_line_error(r, "cache_teacher.py", *needles)
        assert "LocalEntryNotFound" not in r.stderr  # a mistyped path never goes to the Hub
        assert not (tmp_path / f"out{i}").exists()  # no empty or half-made folder
    # flags out of range: the same ValueError, here in this process (the command line is proven above)
    import cache_teacher
    for extra, msg in [(["--k", "-4"], "--k -4: must be >= 4"), (["--batch_tokens", "0"], "--batch_tokens 0: must be"),
                       (["--k", "2048"], "--k 2048: more than the teacher's vocabulary of 1088"),
                       (["--max_docs", "-1"], "--max_docs -1: must be >= 0"), (["--chunk", "0"], "--chunk 0: must be")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            run_main(cache_teacher, "--data", DATA, *base(tmp_path / "flags"), *extra)
        assert not (tmp_path / "flags").exists()


def test_train_bad_flags(tmp_path, tiny_cache, tiny_topology, tiny_windows, student_config):
    """Untrained students (--max_steps -1, --epochs 0 or -1) and absurd learning rates (inf, nan, 0, 1e39) are refused
    up front: no folder at all, so no student marked complete and no non-finite tensor anywhere."""
    cases = [(["--max_steps", "-1"], "--max_steps -1: must be >= 0"), (["--epochs", "0"], "--epochs 0.0: must be > 0"),
             (["--lr", "inf"], "--lr inf: must be in (0, 1]"), (["--lr", "1e39"], "--lr 1e+39: must be in (0, 1]")]
    cases += [(["--device", "cuda"], "--device cuda: ")] if NO_CUDA else []
    base = lambda out: ["--init", "scratch", "--config", student_config, "--cache", tiny_cache, "--topology",
                        tiny_topology, "--windows", tiny_windows, "--device", "cpu", "--lr", "3e-3", "--out", out]
    runs = [("train.py", *base(tmp_path / f"s{i}"), *extra) for i, (extra, _) in enumerate(cases)]
    for i, (r, (_, needle)) in enumerate(zip(run_scripts(runs), cases)):
        assert_one_line_error(r, "train.py", needle)
        assert not (tmp_path / f"s{i}").exists()
    import train
    for extra, msg in [(["--epochs", "-1"], "--epochs -1.0: must be > 0"), (["--lr", "nan"], "--lr nan: must be in"),
                       (["--lr", "0"], "--lr 0.0: must be in (0, 1]"), (["--warmup", "-1"], "--warmup -1: must be"),
                       (["--min_lr", "0.1"], "--min_lr 0.1: above --lr 0.003"), (["--log_every", "0"], "--log_every 0"),
                       (["--eval_windows", "-1"], "--eval_windows -1"), (["--grad_clip", "0"], "--grad_clip 0.0"),
                       (["--kd_alpha", "1.5"], "--kd_alpha 1.5: must be in [0, 1]"),
                       (["--proof_weight", "2", "nan"], "--proof_weight [2.0, nan]")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            run_main(train, *base(tmp_path / "flags"), *extra)
        assert not (tmp_path / "flags").exists()


def test_generate_bench_and_tokenizer_bad_inputs(tmp_path, demo_tokenizer):
    """generate.py with a truncated tokenizer.json, prompts that are not UTF-8, flags out of range, cuda without CUDA;
    bench.py with cuda without CUDA; data/tokenizer.py with a vocabulary smaller than its byte alphabet."""
    model = tmp_path / "model"
    make_teacher(model, STUDENT_CFG["vocab_size"])
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copyfile(os.path.join(demo_tokenizer, f), model / f)
    cut = tmp_path / "cut"
    shutil.copytree(model, cut)
    (cut / "tokenizer.json").write_text((cut / "tokenizer.json").read_text()[:5000])
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    gen = ["--prompt", "q", "--device", "cpu", "--max_new_tokens", "4"]
    cases = [("generate.py", ["--model", cut, *gen], f"{cut / 'tokenizer.json'}: not a readable tokenizer.json"),
             ("generate.py", ["--model", model, "--prompts_jsonl", tmp_path / "p.jsonl", "--device", "cpu"],
              "p.jsonl:1: not UTF-8"),
             ("data/tokenizer.py", ["--data", DATA, "--vocab_size", "10", "--out", tmp_path / "tok"],
              "--vocab_size 10: must be >= 261")]
    if NO_CUDA:
        cases += [("generate.py", ["--model", model, *gen, "--device", "cuda"], "--device cuda: "),
                  ("bench.py", ["--device", "cuda", "--work", tmp_path / "bench"], "--device cuda: ")]
    for r, (script, _, needle) in zip(run_scripts([(s, *a) for s, a, _ in cases]), cases):
        assert_one_line_error(r, script, needle)
    assert not (tmp_path / "tok").exists() and not (tmp_path / "bench").exists()
    import generate
    for extra, msg in [(["--top_k", "-1"], "--top_k -1: must be >= 0"), (["--top_p", "0"], "--top_p 0.0: must be in"),
                       (["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
                       (["--temperature", "nan"], "--temperature nan"), (["--device", "gpu"], "--device gpu: not a")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            run_main(generate, "--model", model, *gen, *extra)


def test_flags_of_every_script_are_range_checked(tmp_path, tiny_cache, demo_tokenizer, student_config):
    """The integer and float flags that the tests above do not reach, one per script, in this process: each refused
    with its name and value before any work or folder (ablate.py would otherwise build the whole demo first)."""
    import ablate
    import cache_teacher
    import topology
    import train
    import windows
    out = tmp_path / "o"
    cases = [
        (ablate, ["--out", out, "--steps", "-1"], "--steps -1: must be >= 0"),
        (ablate, ["--out", out, "--epochs", "0"], "--epochs 0.0: must be > 0"),
        (ablate, ["--out", out, "--pretrain_steps", "0"], "--pretrain_steps 0: must be >= 1"),
        (ablate, ["--out", out, "--val_fraction", "0"], "--val_fraction 0.0: must be in (0, 1)"),
        (ablate, ["--out", out, "--seeds", "-1", "2"], "--seeds [-1, 2]: must be >= 0"),
        (cache_teacher, ["--data", DATA, "--teacher", "none", "--tokenizer", demo_tokenizer, "--out", out,
                         "--stream_save_every", "0"], "--stream_save_every 0: must be >= 1"),
        (cache_teacher, ["--data", DATA, "--teacher", "none", "--tokenizer", demo_tokenizer, "--out", out,
                         "--stream_budget_gb", "nan"], "--stream_budget_gb nan: must be >= 0"),
        (train, ["--init", "scratch", "--config", student_config, "--cache", tiny_cache, "--out", out, "--kd_alpha",
                 "0", "--device", "cpu", "--split_seed", "-3"], "--split_seed -3: must be >= 0"),
        (topology, ["--cache", tiny_cache, "--out", out, "--block", "0"], "--block 0: must be >= 1"),
        (windows, ["--cache", tiny_cache, "--out", out, "--fixed_stride", "--stride", "-1"], "--stride -1: must be"),
    ]
    for module, args, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            run_main(module, *args)
        assert not out.exists(), (module.__name__, args)
