"""
Train the demo's small byte-level BPE tokenizer (the offline stand-in for Qwen3's 151,669-token one).

It keeps Qwen3's special-token names and ids order (<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>)
so every script treats it like the real one, and adds the six DualMind tags as single tokens so that a tiny
model can learn the layout in minutes (the real Qwen3 tokenizer splits each tag into 3-4 pieces).

    python data/tokenizer.py --data data/physics_cot.jsonl out/data/synth.jsonl --vocab_size 2048 --out out/tokenizer

Writes tokenizer.json and tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>) into --out.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the kit's root, for common.py
from common import TAGS, USER, atomic_write, check_ranges, read_jsonl, write_json  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def record_texts(paths):
    """Every string field of every JSONL record, in order, plus the DualMind prompt prefix once per record."""
    for path in paths:
        for _, rec in read_jsonl(path):  # a ValueError names the file and line of a bad one
            if isinstance(rec, dict):
                yield USER
                yield from (v for v in rec.values() if isinstance(v, str))


def train_bpe(texts, vocab_size):
    """A byte-level BPE trained on `texts`, special tokens first (ids 0..4), DualMind tags as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(TAGS)
    return tok


def save(tok, out):
    """tokenizer.json, then tokenizer_config.json (eos <|im_end|> as in Qwen3), each written atomically."""
    os.makedirs(out, exist_ok=True)
    with atomic_write(os.path.join(out, "tokenizer.json")) as f:
        f.write(tok.to_str(pretty=True))
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 40960})


def main(args):
    check_ranges(args, vocab_size=f"[{256 + len(SPECIAL)}, inf)")  # at least the 256 bytes and the special tokens
    for p in args.data:
        if not os.path.isfile(p):
            raise ValueError(f"{p}: no such file")
    tok = train_bpe(record_texts(args.data), args.vocab_size)
    save(tok, args.out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({len(SPECIAL)} special, {len(TAGS)} DualMind tags) -> {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="JSONL files to learn the merges from")
    p.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size before the DualMind tags")
    p.add_argument("--out", default="out/tokenizer", help="output folder")
    try:
        main(p.parse_args())
    except ValueError as e:
        sys.exit(f"data/tokenizer.py: error: {e}")
