"""generate.py: greedy parity with transformers, sampling functions against hand-computed cases, stops, errors."""

import json
import math
import os
import shutil

import pytest
import torch

from conftest import make_hf_model, make_teacher, run_main, run_script, save_hf, tiny_hf_config
from generate import (cut_at_stop, decode_step, dualmind_check, generate, next_token, repetition_penalty,
                      top_k_filter, top_p_filter)
from model import Qwen3


def greedy_without_cache(model, prompt, n):
    """The reference for the KV cache: recompute the whole sequence for every new token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_matches_transformers_generate(tmp_path, moe):
    """Greedy decoding equals transformers' greedy generate token for token, with and without our KV cache."""
    hf = make_hf_model(tiny_hf_config(moe=moe))
    folder = save_hf(hf, tmp_path)
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 11:]
    cached = list(generate(ours, prompt, 40))
    recomputed = greedy_without_cache(ours, prompt, 40)
    assert cached == recomputed == ref.tolist()
    assert len(set(cached)) > 3  # not a degenerate repeat of one token


def test_compiled_decode_step_same_tokens(dense_ckpt):
    _, folder = dense_ckpt
    m = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.arange(5)[None]
    step = torch.compile(decode_step, backend="aot_eager")
    assert list(generate(m, prompt, 12, step_fn=step)) == list(generate(m, prompt, 12))


def test_seeded_sampling_is_reproducible(dense_ckpt):
    _, folder = dense_ckpt
    m = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.arange(5)[None]
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, penalty=1.1)
    a = list(generate(m, prompt, 30, seed=7, **kw))
    assert a == list(generate(m, prompt, 30, seed=7, **kw))
    assert a != list(generate(m, prompt, 30, seed=8, **kw))


def test_eos_stops_and_is_kept(dense_ckpt):
    _, folder = dense_ckpt
    m = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.arange(5)[None]
    free = list(generate(m, prompt, 10))
    stopped = list(generate(m, prompt, 10, eos_ids={free[3]}))
    assert stopped == free[:free.index(free[3]) + 1]  # up to and including the first end token
    assert m.max_seq_len == 0  # the cache is released after generation


# --- sampling functions against hand-computed cases --------------------------------------------------------------

def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive divided, negative multiplied, once per token
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    seen = torch.tensor([[3, 0, 2]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.equal(repetition_penalty(logits, seen, 1.3), ref)


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = top_k_filter(logits, 2)
    assert torch.isinf(k2[0, 2:]).all() and torch.equal(k2[0, :2], logits[0, :2])
    # p = 0.8: cumulative from the least likely: 0.05, 0.15, 0.30 <= 0.2 drops only the first two (0.05, 0.1)
    p8 = top_p_filter(logits, 0.8)
    assert torch.isinf(p8[0, 3:]).all() and torch.isfinite(p8[0, :3]).all()
    assert torch.isfinite(top_p_filter(logits, 0.01)[0, 0]) and torch.isinf(top_p_filter(logits, 0.01)[0, 1:]).all()
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    x = torch.randn(3, 100)
    assert torch.equal(top_p_filter(x, 0.7), TopPLogitsWarper(0.7)(None, x.clone()))
    assert torch.equal(top_k_filter(x, 13), TopKLogitsWarper(13)(None, x.clone()))


def test_next_token_temperature_and_greedy():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4 at T = 1
    assert next_token(logits, torch.zeros(1, 0, dtype=torch.long)).item() == 1  # greedy
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_token(logits, torch.zeros(1, 0, dtype=torch.long), temperature=2.0, generator=g)
                         for _ in range(4000)])
    # at T = 2: probabilities proportional to 1 and sqrt(3): 0.634 for token 1
    assert draws.float().mean().item() == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=0.03)


def test_stop_strings_and_dualmind_check():
    assert cut_at_stop("abc</response>tail", ["</response>"]) == ("abc</response>", True)
    assert cut_at_stop("a STOP b END", ["END", "STOP"]) == ("a STOP", True)
    assert cut_at_stop("nothing", ["</response>"]) == ("nothing", False)
    good = "##USER:\nq\n\n<explore>\na\n</explore>\n\n<examine>\nb\n</examine>\n\n<response>\nc\n</response>"
    assert dualmind_check(good)["ok"]
    bad = good.replace("</examine>", "")
    r = dualmind_check(bad)
    assert not r["ok"] and r["present"] == {"explore": True, "examine": False, "response": True}
    swapped = "<explore>a</explore><response>c</response><examine>b</examine>"
    assert not dualmind_check(swapped)["ok"]


# --- the script --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_tokenizer):
    d = tmp_path_factory.mktemp("gen") / "model"
    make_teacher(d, 1088)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copyfile(os.path.join(demo_tokenizer, f), d / f)
    return d


def test_cli_streams_checks_and_stops_exactly(model_dir):
    r = run_script("generate.py", "--model", model_dir, "--prompt", "A pendulum is 2 m long.", "--temperature", "0",
                   "--max_new_tokens", "40", "--check")
    assert r.stdout.startswith("##USER:\nA pendulum is 2 m long.\n\n<explore>\n")
    assert "tokens/s" in r.stderr and "DualMind check:" in r.stderr
    out = r.stdout[len("##USER:\nA pendulum is 2 m long.\n\n<explore>\n"):].rstrip("\n")
    stop = out[12:17]  # a string the greedy output surely contains
    assert len(stop) == 5
    r2 = run_script("generate.py", "--model", model_dir, "--prompt", "A pendulum is 2 m long.", "--temperature", "0",
                    "--max_new_tokens", "40", "--stop", stop)
    got = r2.stdout[len("##USER:\nA pendulum is 2 m long.\n\n<explore>\n"):].rstrip("\n")
    assert got.endswith(stop) and out.startswith(got) and len(got) < len(out)
    r3 = run_script("generate.py", "--model", model_dir, "--prompt", "x", "--max_new_tokens", "5", "--check",
                    "--enforce", check=False)
    assert r3.returncode == 1 and "failed the DualMind check" in r3.stderr


def test_cli_prompts_jsonl(tmp_path, model_dir):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "one"}) + "\n" + json.dumps({"prompt": "two"}) + "\n")
    r = run_script("generate.py", "--model", model_dir, "--prompts_jsonl", p, "--max_new_tokens", "8")
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert [l["prompt"] for l in lines] == ["one", "two"] and all(l["tokens"] == 8 for l in lines)
    assert r.stderr.splitlines()[-1].startswith("generate: 2 answers, 16 tokens in ") and "layout" not in r.stderr
    r = run_script("generate.py", "--model", model_dir, "--prompts_jsonl", p, "--max_new_tokens", "8", "--check")
    ok = sum(json.loads(l)["check"]["ok"] for l in r.stdout.splitlines())  # the summary counts as the JSON lines say
    assert r.stderr.splitlines()[-1].endswith(f"the DualMind layout in {ok} of 2")
    p.write_text(json.dumps({"prompt": "one"}) + "\n" + json.dumps({"prompt": "word " * 5000}) + "\n")
    r = run_script("generate.py", "--model", model_dir, "--prompts_jsonl", p, "--max_new_tokens", "8", check=False)
    assert r.returncode != 0 and "prompt 2 of " in r.stderr and r.stdout == ""  # checked before the first answer


def test_cli_bad_inputs(tmp_path, model_dir):
    """A missing model folder, an empty prompt, a prompt or output longer than the context, a missing prompt file:
    each a ValueError (in this process), and from the shell a non-zero exit with the message."""
    import generate

    def fails(*args, match):
        with pytest.raises(ValueError, match=match):
            run_main(generate, *args, "--device", "cpu")

    fails("--model", tmp_path / "missing", "--prompt", "q", match="not a model folder")
    fails("--model", model_dir, "--prompt", "   ", match="prompt 1 is empty")
    fails("--model", model_dir, "--prompt", "word " * 5000, match="does not fit the context of 4096")
    fails("--model", model_dir, "--prompt", "q", "--max_new_tokens", "5000", match="exceeds the context of 4096")
    fails("--model", model_dir, "--prompt_file", tmp_path / "nope.txt", match="no such file")
    r = run_script("generate.py", "--model", model_dir, "--prompt", "   ", check=False)
    assert r.returncode != 0 and r.stderr.startswith("generate.py: error:") and "empty" in r.stderr


def test_chat_template_renders_the_generate_prompt():
    """common.chat_template, rendered by transformers, is exactly the prompt generate.py sends (dualmind_prompt, the
    card's "##USER:\\n" + q + "\\n\\n<explore>\\n"), whatever the question holds; an assistant turn is what the model
    wrote after it, closed by the end token; other roles are refused."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from common import chat_template, dualmind_prompt
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|im_end|>")
    tok.chat_template = chat_template()
    render = lambda msgs, gen=True: tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    for q in ["Find T.", "Two\nlines, a \\(\\frac{1}{2}\\) and {{ braces }} {% raw %}", ' "quoted" ', ""]:
        assert render([{"role": "user", "content": q}]) == dualmind_prompt(q) == "##USER:\n" + q + "\n\n<explore>\n"
    answer = "e\n</explore>\n\n<examine>\nx\n</examine>\n\n<response>\nr\n</response>"
    assert render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}], gen=False) == \
        "##USER:\nQ\n\n<explore>\n" + answer + "<|im_end|>"
    with pytest.raises(Exception, match="user and assistant turns only"):
        render([{"role": "system", "content": "be brief"}])
