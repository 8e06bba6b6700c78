"""Shared test helpers: tiny random Qwen3 checkpoints written by transformers itself, and paths."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "qwen3-tokenizer")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_hf_config(moe=False, **kw):
    """A transformers config small enough for CPU tests, with heads x head_dim != hidden_size."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=40960, rope_theta=1_000_000.0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if moe:
        base.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                    mlp_only_layers=[1], decoder_sparse_step=1)
    base.update(kw)
    return (Qwen3MoeConfig if moe else Qwen3Config)(**base)


def make_hf_model(cfg, seed=0):
    """A transformers model with weights large enough that logits spread over several units."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return m


def save_hf(m, path, **kw):
    m.save_pretrained(path, **kw)
    return str(path)


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory):
    """(transformers model, folder) for an untied dense config."""
    m = make_hf_model(tiny_hf_config())
    return m, save_hf(m, tmp_path_factory.mktemp("dense"))


def max_rel_diff(a, b):
    """max |a - b| / max |a|, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / a.abs().max()).item()


# --- pipeline fixtures: the demo tokenizer and a tiny teacher -------------------------------------------

DATA = os.path.join(ROOT, "data", "physics_cot.jsonl")


def make_teacher(folder, vocab_size, moe=False, std=0.3, seed=0, layers=2, max_shard_bytes=5 * 2**30, **kw):
    """A tiny random Qwen3 saved by model.py; std large enough for peaked, varied next-token distributions."""
    from model import Qwen3, Qwen3Config
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
               max_position_embeddings=4096, torch_dtype="float32", initializer_range=std, bos_token_id=0,
               eos_token_id=2)
    if moe:
        cfg.update(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    cfg.update(kw)
    m = Qwen3(Qwen3Config(**cfg)).init_weights(seed)
    m.save_pretrained(folder, max_shard_bytes=max_shard_bytes)
    return str(folder)


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory):
    """The demo's byte-level BPE, trained on the bundled records (1,030 tokens)."""
    from data.tokenizer import record_texts, save, train_bpe
    out = tmp_path_factory.mktemp("tokenizer")
    save(train_bpe(record_texts([DATA]), 1024), str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"), vocab_size=1088)


def run_script(script, *args, env=None, check=True, timeout=300):
    """Run one of the kit's scripts as a user would; returns the CompletedProcess."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, **(env or {})), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def run_scripts(runs, env=None, timeout=300):
    """run_script for several (script, *args) at once (bad-input runs are mostly interpreter start-up), in order."""
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, **(env or {})))
             for script, *args in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def assert_one_line_error(r, script, *needles):
    """What a user sees for a bad input: a non-zero exit and one line `script: error: ...` that names each needle
    (the file, line or value), and no traceback."""
    err = r.stderr.strip()
    assert r.returncode != 0, (r.args, r.stdout[-2000:])
    assert "Traceback" not in err and "\n" not in err and err.startswith(f"{script}: error: "), err[-3000:]
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_teacher, demo_tokenizer):
    """cache_teacher.py run on the bundled records with the tiny teacher (batches of <= 3000 tokens)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    run_script("cache_teacher.py", "--data", DATA, "--teacher", tiny_teacher, "--tokenizer", demo_tokenizer,
               "--out", out, "--dtype", "float32", "--device", "cpu", "--batch_tokens", "3000")
    return str(out)


@pytest.fixture(scope="session")
def tiny_topology(tiny_cache):
    out = os.path.join(os.path.dirname(tiny_cache), "topology")
    run_script("topology.py", "--cache", tiny_cache, "--out", out)
    return out


@pytest.fixture(scope="session")
def tiny_windows(tiny_cache, tiny_topology):
    out = os.path.join(os.path.dirname(tiny_cache), "windows")
    run_script("windows.py", "--cache", tiny_cache, "--topology", tiny_topology, "--out", out)
    return out


STUDENT_CFG = dict(model_type="qwen3", vocab_size=1088, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32")


@pytest.fixture(scope="session")
def student_config(tmp_path_factory):
    import json
    p = tmp_path_factory.mktemp("cfg") / "student.json"
    p.write_text(json.dumps(STUDENT_CFG))
    return str(p)


def run_main(module, *args):
    """A script's main() in this process, with its own argument parser (fast: no interpreter start-up)."""
    return module.main(module.get_parser().parse_args([str(a) for a in args]))


def train_args(out, cache, topo, windows, config, *extra):
    """The flags of a short train.py run from scratch on the session's tiny folders (the fixtures tiny_cache,
    tiny_topology, tiny_windows, student_config); `extra` flags are appended: run_script("train.py", *train_args(
    tmp_path / "s", tiny_cache, tiny_topology, tiny_windows, student_config, "--max_steps", 8))."""
    return ["--init", "scratch", "--config", config, "--cache", cache, "--topology", topo, "--windows", windows,
            "--out", out, "--dtype", "float32", "--device", "cpu", "--lr", "3e-3", "--warmup", "2",
            "--grad_accum", "4", "--eval_every", "0", "--save_dtype", "float32", *map(str, extra)]
