"""
Sample from a Qwen3 checkpoint (the distilled student, or any Hub Qwen3) with a static KV cache.

The prompt is wrapped in the model card's DualMind layout (the user turn, then the opening <explore> tag, as the
student was trained) unless --raw. Sampling follows transformers, in its order: repetition penalty, temperature,
top-k, top-p. Generation stops at an end token of generation_config.json or at a stop string (default </response>,
where the output ends). Text streams to the terminal; tokens/s goes to stderr. --check reports which DualMind blocks
are present and in order; --enforce makes a failed check exit with status 1.

Inputs   --model (folder with config.json, safetensors, tokenizer.json; or a Hub id), --prompt | --prompt_file |
         --prompts_jsonl (one {"prompt": ...} per line; writes one JSON line per prompt to stdout)
Run
  python generate.py --model out/demo/student --prompt "A pendulum is 2 m long. What is its period?" --check
  python generate.py --model out/student --prompt "Prove that..." --device cuda --compile      # real student
  python generate.py --model Qwen/Qwen3-1.7B --raw --prompt "The capital of France is" --temperature 0
"""

import argparse
import json
import os
import sys
import time

import torch

from common import (BLOCKS, check_device, check_ranges, cli, dualmind_prompt, load_tokenizer, read_jsonl,
                    verify_folder)
from model import Qwen3, resolve_folder


# -----------------------------------------------------------------------------
# Sampling: small pure functions of the logits (B, V) fp32

def repetition_penalty(logits, seen, penalty):
    """transformers' rule: a logit of a token already in the sequence is divided by penalty if positive,
    multiplied by it if negative. seen (B, n) ids of the prompt and the output so far."""
    if penalty == 1.0:
        return logits
    s = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(s < 0, s * penalty, s / penalty))


def top_k_filter(logits, k):
    """Keep the k largest logits (ties at the k-th kept), -inf elsewhere; k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus: drop the least likely tokens whose cumulative probability stays <= 1 - p; the top one is kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def next_token(logits, seen, temperature=0.0, top_k=0, top_p=1.0, penalty=1.0, generator=None):
    """logits (B, V) -> next ids (B,): greedy when temperature is 0, else sampled with `generator`."""
    logits = repetition_penalty(logits.float(), seen, penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# Decoding

def decode_step(model, idx, input_pos):
    """One step from the KV cache: logits (B, V) of the last position only."""
    h = model(idx, input_pos=input_pos, hidden_only=True)
    return model.lm_head(h[:, -1])


def generate(model, prompt, max_new_tokens, eos_ids=(), temperature=0.0, top_k=0, top_p=1.0, penalty=1.0,
             seed=0, step_fn=None):
    """Yield new token ids one at a time. prompt (1, T) int64. Stops at an id in eos_ids (yielded) or after
    max_new_tokens. step_fn: the decode step (decode_step, or a compiled copy of it)."""
    device, T = prompt.device, prompt.shape[1]
    gen = torch.Generator(device=device).manual_seed(seed)
    step_fn = step_fn or decode_step
    seq = prompt  # (1, T + i): what the repetition penalty looks at
    with torch.no_grad():
        model.setup_cache(batch_size=1, max_seq_len=T + max_new_tokens)
        try:
            logits = decode_step(model, prompt, torch.arange(T, device=device))  # prefill: the last position's logits
            for i in range(max_new_tokens):
                nxt = next_token(logits, seq, temperature, top_k, top_p, penalty, gen)  # (1,)
                seq = torch.cat([seq, nxt[:, None]], 1)
                tok = int(nxt.item())
                yield tok
                if tok in eos_ids or i == max_new_tokens - 1:
                    return
                logits = step_fn(model, nxt[:, None], torch.tensor([T + i], device=device))  # (1, V)
        finally:
            model.clear_cache()


def complete(model, tok, ids, max_new_tokens, eos_ids=(), stops=(), temperature=0.0, top_k=0, top_p=1.0,
             penalty=1.0, seed=0, step_fn=None, on_text=None):
    """The model's answer to the token ids `ids` (a list): (text, tokens generated). It ends at an end token,
    after max_new_tokens, or with the first stop string (kept); on_text(piece) is called as the text grows."""
    device = next(model.parameters()).device
    out, shown, text = [], "", ""
    for t in generate(model, torch.tensor([ids], device=device), max_new_tokens, eos_ids, temperature, top_k, top_p,
                      penalty, seed, step_fn=step_fn):
        out.append(t)
        text, stopped = cut_at_stop(tok.decode(out), stops)
        if on_text and not text.endswith("\ufffd"):  # hold back half a UTF-8 character
            on_text(text[len(shown):])
            shown = text
        if stopped:
            break
    return text, len(out)


def cut_at_stop(text, stops):
    """(text up to and including the earliest stop string, whether one was found)."""
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return (text[:min(ends)], True) if ends else (text, False)


def dualmind_check(text):
    """Which DualMind blocks are present (opened and closed), and ok: all three, in the card's order."""
    spans = {}
    for b in BLOCKS:
        o, c = text.find(f"<{b}>"), text.find(f"</{b}>")
        spans[b] = (o, c) if 0 <= o < c else None
    present = {b: spans[b] is not None for b in BLOCKS}
    ok = all(present.values()) and all(spans[a][1] < spans[b][0] for a, b in zip(BLOCKS, BLOCKS[1:]))
    return dict(present=present, ok=ok)


# -----------------------------------------------------------------------------
# main

def load(model_name, device, dtype, verify=True):
    folder = resolve_folder(model_name)
    if verify:  # a student from train.py: its weights against the checksums in its manifest
        verify_folder(folder)
    tok, _ = load_tokenizer(folder)  # first: a missing or truncated tokenizer.json fails before the weights load
    model = Qwen3.from_pretrained(folder, dtype=dtype, device=device).eval()
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return model, tok, eos


def read_prompts(args):
    if sum(x is not None for x in [args.prompt, args.prompt_file, args.prompts_jsonl]) != 1:
        raise ValueError("give exactly one of --prompt, --prompt_file, --prompts_jsonl")
    flag, path = ("--prompt_file", args.prompt_file) if args.prompt_file else ("--prompts_jsonl", args.prompts_jsonl)
    if args.prompt is not None:
        prompts = [args.prompt]
    elif not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    elif args.prompt_file:
        with open(path, "rb") as f:
            try:
                prompts = [f.read().decode("utf-8")]
            except UnicodeDecodeError as e:
                raise ValueError(f"--prompt_file {path}: not UTF-8 text (byte {e.start + 1})") from None
    else:
        prompts = []
        for i, rec in read_jsonl(path):
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise ValueError(f"{path}:{i}: expected {{\"prompt\": ...}}, got {str(rec)[:60]}")
            prompts.append(rec["prompt"])
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return prompts


def main(args):
    check_ranges(args, max_new_tokens="[1, inf)", temperature="[0, inf)", top_p="(0, 1]", top_k="[0, inf)",
                 repetition_penalty="(0, inf)", seed="[0, inf)")
    prompts = read_prompts(args)
    check_device(args.device)
    model, tok, eos = load(args.model, args.device, getattr(torch, args.dtype), verify=not args.no_verify)
    ctx = model.config.max_position_embeddings
    step_fn = torch.compile(decode_step) if args.compile else None
    stream = args.prompts_jsonl is None and not args.quiet
    texts = [prompt if args.raw else dualmind_prompt(prompt.strip()) for prompt in prompts]
    encoded = [tok.encode(text, add_special_tokens=False).ids for text in texts]
    for i, ids in enumerate(encoded):  # every prompt is checked before any is answered: no half-written output
        where = f"prompt {i + 1}" if len(prompts) > 1 else "prompt"
        if len(ids) >= ctx:
            raise ValueError(f"{where} of {len(ids)} tokens does not fit the context of {ctx}")
        if len(ids) + args.max_new_tokens > ctx:
            raise ValueError(f"{where} ({len(ids)} tokens) + --max_new_tokens {args.max_new_tokens} exceeds the "
                             f"context of {ctx}; lower --max_new_tokens to {ctx - len(ids)} or less")
    failures, total_tokens, t_start = 0, 0, time.time()
    for prompt, text, ids in zip(prompts, texts, encoded):
        if stream:
            print(text, end="", flush=True)
        t0 = time.time()
        answer, n = complete(model, tok, ids, args.max_new_tokens, eos, args.stop, args.temperature, args.top_k,
                             args.top_p, args.repetition_penalty, args.seed, step_fn=step_fn,
                             on_text=(lambda piece: print(piece, end="", flush=True)) if stream else None)
        dt = time.time() - t0
        check = dualmind_check(text + answer)
        if stream:
            print()
        print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
        if args.prompts_jsonl:
            print(json.dumps(dict(prompt=prompt, output=answer, tokens=n, check=check), ensure_ascii=False))
        if args.check:
            marks = " ".join(f"<{b}>{'✓' if v else '✗'}" for b, v in check["present"].items())
            print(f"DualMind check: {marks} | order {'ok' if check['ok'] else 'WRONG'} -> "
                  f"{'PASS' if check['ok'] else 'FAIL'}", file=sys.stderr)
        failures += not check["ok"]
        total_tokens += n
    if len(prompts) > 1:
        dt = time.time() - t_start
        layout = f"; the DualMind layout in {len(prompts) - failures} of {len(prompts)}" if args.check else ""
        print(f"generate: {len(prompts)} answers, {total_tokens:,} tokens in {dt:.1f}s "
              f"({total_tokens / max(dt, 1e-9):.1f} tokens/s){layout}", file=sys.stderr)
    if args.enforce and failures:
        sys.exit(f"generate.py: {failures} of {len(prompts)} outputs failed the DualMind check")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer.json) or Hub id")
    p.add_argument("--prompt", default=None, help="the question (wrapped in the DualMind prompt unless --raw)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    p.add_argument("--prompts_jsonl", default=None, help='one {"prompt": ...} per line; one JSON result line each')
    p.add_argument("--raw", action="store_true", help="use the prompt as it is, without the DualMind wrapper")
    # the model card's sampling settings
    p.add_argument("--max_new_tokens", type=int, default=2048, help="most tokens to generate (card: 2048)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding (card: 0.6)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (card: 0.9)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--repetition_penalty", type=float, default=1.15, help="transformers' rule (card: 1.15)")
    p.add_argument("--stop", nargs="*", default=["</response>"], help="stop strings, the output ends exactly there")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
    p.add_argument("--check", action="store_true", help="report the DualMind blocks present and their order")
    p.add_argument("--enforce", action="store_true", help="exit with status 1 when an output fails the check")
    p.add_argument("--quiet", action="store_true", help="do not stream the text")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights and activations",
                   default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--no_verify", action="store_true", help="skip the checksums of the model folder")
    return p


if __name__ == "__main__":
    cli("generate.py", main, get_parser, "rerun the same command")
