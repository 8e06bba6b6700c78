"""model.py against transformers: logits parity, KV cache, Hub cache path, round trips, memory, bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, SHARED_TOKENIZER, make_hf_model, max_rel_diff, save_hf, tiny_hf_config
from model import Qwen3, Qwen3Config

IDX = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(1))


def ours_vs_hf(hf, folder, dtype=torch.float32, idx=IDX, moe_impl="auto", **fw):
    ours = Qwen3.from_pretrained(folder, dtype=dtype).set_moe_impl(moe_impl).eval()
    with torch.no_grad():
        ref = hf(idx, **fw).logits
        got = ours(idx, **({"input_pos": fw["position_ids"][0]} if "position_ids" in fw else {}))
    return ref, got


# --- fp32 parity: every config shape the Hub ships --------------------------------------------------

@pytest.mark.parametrize("kind", ["untied", "tied", "tied_with_stored_head"])
def test_dense_fp32_parity(tmp_path, kind):
    """Breaks if attention, q/k-norm order, RoPE, GQA or head tying differ from transformers."""
    hf = make_hf_model(tiny_hf_config(tie_word_embeddings=kind != "untied"))
    folder = save_hf(hf, tmp_path)
    if kind == "tied_with_stored_head":  # Qwen3-0.6B / 1.7B files carry an lm_head copy beside the embedding
        path = os.path.join(folder, "model.safetensors")
        sd = load_file(path)
        assert "lm_head.weight" not in sd
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, path, metadata={"format": "pt"})
    ref, got = ours_vs_hf(hf, folder)
    assert max_rel_diff(ref, got) <= 1e-4, max_rel_diff(ref, got)
    assert ref.abs().max() > 1.0  # logits large enough for the tolerance to mean something


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_fp32_parity(tmp_path, norm_topk_prob, impl):
    """Breaks if routing (fp32 softmax, top-k, renorm), expert grouping (either way of running the experts) or
    dense-layer placement differ."""
    cfg = tiny_hf_config(moe=True, norm_topk_prob=norm_topk_prob)
    hf = make_hf_model(cfg)
    folder = save_hf(hf, tmp_path)
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32)
    assert not hasattr(ours.model.layers[1].mlp, "experts")  # mlp_only_layers=[1] is dense
    assert len(ours.model.layers[0].mlp.experts) == 6
    ref, got = ours_vs_hf(hf, folder, moe_impl=impl)
    assert max_rel_diff(ref, got) <= 1e-4, max_rel_diff(ref, got)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_moe_bf16_parity(tmp_path, impl):
    """bf16 MoE logits within 1% of max |logit| of transformers in bf16 (the tolerance of test_bf16_parity).
    The grouped path sums a token's k expert outputs once in fp32 where transformers adds them one by one in bf16."""
    from transformers import AutoModelForCausalLM
    folder = save_hf(make_hf_model(tiny_hf_config(moe=True)), tmp_path)
    hf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ref, got = ours_vs_hf(hf16, folder, dtype=torch.bfloat16, moe_impl=impl)
    assert got.dtype == torch.bfloat16
    assert max_rel_diff(ref, got) <= 1e-2, max_rel_diff(ref, got)


def test_moe_experts_stacked_in_place(tmp_path):
    """Each expert's weight is a view of one row of its layer's stacked tensor, so the grouped path reads the weights
    without a copy; names stay per-expert, and .to(), load_state_dict(assign=True) and in-place updates keep the
    stacked tensors current (the grouped path then still equals the loop)."""
    folder = save_hf(make_hf_model(tiny_hf_config(moe=True)), tmp_path)
    m = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    blk = m.model.layers[0].mlp
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in m.state_dict()
    stacked_bytes = sum(s.untyped_storage().nbytes() for s in blk.stacked)
    assert stacked_bytes == sum(p.numel() * 4 for ps in blk.expert_weights() for p in ps)  # one copy of the experts

    def grouped_equals_loop():
        for ps, s in zip(blk.expert_weights(), blk.stacked):
            assert all(p.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for p in ps)
        with torch.no_grad():
            a, b = m.set_moe_impl("grouped")(IDX), m.set_moe_impl("loop")(IDX)
        assert max_rel_diff(b, a) <= 1e-5, max_rel_diff(b, a)
        return a

    before = grouped_equals_loop()
    with torch.no_grad():
        blk.experts[3].up_proj.weight.mul_(2.0)  # what an optimizer step does: in place
    assert (grouped_equals_loop() - before).abs().max() > 1e-3
    sd = {k: v.clone() * 1.1 for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    grouped_equals_loop()
    m.to(torch.bfloat16)
    assert blk.stacked[0].dtype == torch.bfloat16
    grouped_equals_loop()


def test_moe_grouped_never_reads_data_on_the_host():
    """The grouped path routes and runs the experts (forward and backward) on meta tensors, which have no data: so it
    never syncs the device to read counts (the loop's bincount(...).tolist() cannot run there)."""
    cfg = Qwen3Config.from_dict(tiny_hf_config(moe=True).to_dict())
    with torch.device("meta"):
        m = Qwen3(cfg).to(torch.bfloat16).set_moe_impl("grouped")  # F.grouped_mm's meta kernel takes bf16
    idx = torch.zeros(2, 16, dtype=torch.long, device="meta")
    m(idx).float().sum().backward()
    assert m.model.layers[0].mlp.experts[2].gate_proj.weight.grad.shape == (32, 64)
    with pytest.raises(NotImplementedError, match="bincount"):
        m.set_moe_impl("loop")(idx)


def test_decoder_sparse_step(tmp_path):
    """Breaks if the sparse-layer rule ((i+1) % step == 0) is wrong."""
    hf = make_hf_model(tiny_hf_config(moe=True, decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4))
    folder = save_hf(hf, tmp_path)
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32)
    assert [hasattr(b.mlp, "experts") for b in ours.model.layers] == [False, True, False, True]
    ref, got = ours_vs_hf(hf, folder)
    assert max_rel_diff(ref, got) <= 1e-4


def test_sharded_checkpoint(tmp_path, dense_ckpt):
    """Breaks if shards listed in model.safetensors.index.json are not all read."""
    hf, _ = dense_ckpt
    folder = save_hf(hf, tmp_path, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2
    ref, got = ours_vs_hf(hf, folder)
    assert max_rel_diff(ref, got) <= 1e-4


def test_bf16_parity(dense_ckpt):
    """bf16 logits within 1% of max |logit| of transformers in bf16.

    Why 1%: bf16 keeps 8 significant bits (relative step 2^-8 = 0.39%), so one rounding difference in a
    late op moves a logit by up to ~0.4% of its size; we follow transformers' op order (norm statistics
    in fp32, cast, weight multiply; bf16 cos/sin) and measure 0 here, and 1% leaves room for a kernel
    that rounds one step differently on another machine. The gap to the fp32 model must also stay of
    the order of transformers' own bf16-vs-fp32 gap (a wrong cast would be far larger).
    """
    from transformers import AutoModelForCausalLM
    hf32, folder = dense_ckpt
    hf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours16 = Qwen3.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref16, got16, ref32 = hf16(IDX).logits, ours16(IDX), hf32(IDX).logits
    assert got16.dtype == torch.bfloat16
    assert max_rel_diff(ref16, got16) <= 1e-2, max_rel_diff(ref16, got16)
    assert max_rel_diff(ref32, got16) <= 2 * max_rel_diff(ref32, ref16) + 1e-3


def test_to_bfloat16_keeps_rope_exact(dense_ckpt):
    """Breaks if model.to(bfloat16) rounds the RoPE frequencies (transformers #30709)."""
    _, folder = dense_ckpt
    a = Qwen3.from_pretrained(folder, dtype=torch.bfloat16).eval()
    b = Qwen3.from_pretrained(folder, dtype=torch.float32).to(torch.bfloat16).eval()
    pos = torch.arange(30000, 30000 + IDX.shape[1])  # large angles: a rounded inv_freq would show here
    with torch.no_grad():
        assert torch.equal(a(IDX, input_pos=pos), b(IDX, input_pos=pos))


def test_long_positions(dense_ckpt):
    """A short sequence placed beyond 32,768 matches transformers given the same position ids."""
    hf, folder = dense_ckpt
    pos = torch.arange(40000, 40000 + IDX.shape[1])[None]
    ref, got = ours_vs_hf(hf, folder, position_ids=pos)
    assert max_rel_diff(ref, got) <= 1e-4
    with torch.no_grad():
        assert (hf(IDX).logits - ref).abs().max() > 1e-3  # the positions matter


# --- KV cache ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, "loop", "grouped"])
def test_kv_cache_matches_full_forward(tmp_path, moe):
    """Prefill then single-token steps equal one full forward (fp32, <= 1e-5 relative)."""
    folder = save_hf(make_hf_model(tiny_hf_config(moe=bool(moe))), tmp_path)
    m = Qwen3.from_pretrained(folder, dtype=torch.float32).set_moe_impl(moe or "auto").eval()
    with torch.no_grad():
        full = m(IDX)
        m.setup_cache(batch_size=2, max_seq_len=40)
        steps = [m(IDX[:, :9], input_pos=torch.arange(9))]
        for t in range(9, IDX.shape[1]):
            steps.append(m(IDX[:, t:t + 1], input_pos=torch.tensor([t])))
    assert max_rel_diff(full, torch.cat(steps, 1)) <= 1e-5
    with pytest.raises(ValueError, match="input_pos"):
        m(IDX)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.setup_cache(1, 50000)


def test_hidden_only_and_head(dense_ckpt):
    """hidden_only returns final-normed states; lm_head applied in chunks gives the same logits."""
    _, folder = dense_ckpt
    m = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        h = m(IDX, hidden_only=True)
        chunks = torch.cat([m.lm_head(c) for c in h.split(5, dim=1)], 1)
        assert h.shape == (2, IDX.shape[1], 64)
        assert torch.allclose(chunks, m(IDX), atol=1e-6)


# --- Hub path, round trips -------------------------------------------------------------------------------

def write_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a local cache exactly as huggingface_hub writes one: blobs, refs/main, snapshot symlinks."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


def test_hub_id_through_offline_cache(tmp_path, dense_ckpt):
    """from_pretrained("some-org/tiny-qwen3") resolves through a local HF cache with HF_HUB_OFFLINE=1."""
    hf, folder = dense_ckpt
    cache = tmp_path / "hub"
    write_hub_cache(str(cache), "some-org/tiny-qwen3", folder)
    ref_path = tmp_path / "ref.pt"
    with torch.no_grad():
        torch.save(hf(IDX).logits, ref_path)
    code = ("import torch, sys; sys.path.insert(0, %r); from model import Qwen3\n"
            "m = Qwen3.from_pretrained('some-org/tiny-qwen3', dtype=torch.float32)\n"
            "idx = torch.load(%r); ref = torch.load(%r)\n"
            "out = m(idx).detach(); print('maxdiff', (out - ref).abs().max().item())\n"
            "try:\n    Qwen3.from_pretrained('some-org/not-cached')\nexcept ValueError as e:\n    print('ERR', e)\n"
            ) % (ROOT, str(tmp_path / "idx.pt"), str(ref_path))
    torch.save(IDX, tmp_path / "idx.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    diff = float(r.stdout.split("maxdiff")[1].split()[0])
    assert diff <= 1e-4
    assert "ERR some-org/not-cached" in r.stdout


@pytest.mark.parametrize("shard", [False, True])
def test_our_save_loads_in_transformers(tmp_path, dense_ckpt, shard):
    """Our save_pretrained output loads in transformers.AutoModelForCausalLM with the same logits."""
    from transformers import AutoModelForCausalLM
    _, folder = dense_ckpt
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32).eval()
    out = tmp_path / "saved"
    ours.save_pretrained(out, max_shard_bytes=50_000 if shard else 5 * 2**30)
    assert os.path.isfile(out / "model.safetensors.index.json") == shard
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert max_rel_diff(ours(IDX), hf(IDX).logits) <= 1e-5
    again = Qwen3.from_pretrained(str(out), dtype=torch.float32).eval()  # and back into ours
    with torch.no_grad():
        assert torch.equal(again(IDX), ours(IDX))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("tied", [False, True])
def test_moe_and_tied_save_round_trip(tmp_path, tied):
    """MoE (per-expert keys) and tied heads survive ours -> transformers."""
    from transformers import AutoModelForCausalLM
    hf = make_hf_model(tiny_hf_config(moe=True, tie_word_embeddings=tied))
    ours = Qwen3.from_pretrained(save_hf(hf, tmp_path / "a"), dtype=torch.float32).eval()
    ours.save_pretrained(tmp_path / "b")
    keys = load_file(tmp_path / "b" / "model.safetensors").keys()
    assert ("lm_head.weight" in keys) != tied
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert max_rel_diff(back(IDX).logits, ours(IDX)) <= 1e-5


# --- memory --------------------------------------------------------------------------------------------

def test_load_peak_memory(tmp_path):
    """Loading a checkpoint of S bytes raises peak RSS by at most 1.3 x S (measured in a subprocess)."""
    from transformers import Qwen3Config as HC
    cfg = Qwen3Config.from_dict(HC(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=64).to_dict())
    m = Qwen3(cfg).init_weights()
    m.save_pretrained(tmp_path, max_shard_bytes=60 * 2**20)
    size = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert size > 100 * 2**20
    code = ("import re, sys, torch; sys.path.insert(0, %r); from model import Qwen3\n"
            "kb = lambda f: int(re.search(f + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
            "torch.nn.Embedding(2, 2, device='meta')  # torch's one-time ~70 MB set-up of meta tensors\n"
            "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS mark (Linux)\n"
            "r0 = kb('VmRSS')\n"
            "m = Qwen3.from_pretrained(%r)\n"
            "total = sum(p.sum().item() for p in m.parameters())  # every weight paged in\n"
            "print(kb('VmHWM') - r0)") % (ROOT, str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.split()[-1])
    assert 0.8 * size <= grew <= 1.3 * size, (grew / size)  # the weights are in memory, once


# --- training switches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, "loop", "grouped"])
def test_gradients_match_transformers(tmp_path, moe):
    """fp32 gradients of every parameter equal transformers' (the custom SwiGLU backward and both ways of running
    the experts included)."""
    hf = make_hf_model(tiny_hf_config(moe=bool(moe))).train()
    ours = Qwen3.from_pretrained(save_hf(hf, tmp_path), dtype=torch.float32).set_moe_impl(moe or "auto").train()
    target = IDX.roll(-1, 1)
    for m, logits in [(hf, lambda: hf(IDX).logits), (ours, lambda: ours(IDX))]:
        torch.nn.functional.cross_entropy(logits().flatten(0, 1), target.flatten()).backward()
    ref = dict(hf.named_parameters())
    if moe:  # transformers v5 keeps the experts fused in memory: [gate; up] stacked over experts
        for n, p in list(ref.items()):
            if n.endswith("experts.gate_up_proj"):
                I = p.shape[1] // 2
                for e in range(p.shape[0]):
                    ref[n.replace("gate_up_proj", f"{e}.gate_proj.weight")] = (p.grad[e, :I], None)
                    ref[n.replace("gate_up_proj", f"{e}.up_proj.weight")] = (p.grad[e, I:], None)
            elif n.endswith("experts.down_proj"):
                for e in range(p.shape[0]):
                    ref[n.replace("down_proj", f"{e}.down_proj.weight")] = (p.grad[e], None)
            elif n.endswith("mlp.gate.weight"):
                ref[n] = p
    checked = 0
    for name, p in ours.named_parameters():
        r = ref[name]
        g = r[0] if isinstance(r, tuple) else r.grad
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), name
        checked += 1
    assert checked == len(list(ours.parameters()))




def test_cpu_autocast_training_forward(tmp_path, monkeypatch):
    """train.py's forward (fp32 weights under BF16 autocast on a CPU, where our attention runs in fp32) against the
    fp32 model: logits and gradients as close to it as transformers' forward under the same autocast (attention in
    bf16), within 25% (measured over three seeds: 0.91x-1.09x); a lost mask or a wrong cast would be far outside."""
    import torch.nn.functional as F
    hf = make_hf_model(tiny_hf_config()).train()
    ours = Qwen3.from_pretrained(save_hf(hf, tmp_path), dtype=torch.float32).train()
    target = IDX.roll(-1, 1)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(
        (q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu"))) or sdpa(q, k, v, **kw))

    def run(m, autocast):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(IDX)
            logits = (out.logits if hasattr(out, "logits") else out).float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return logits.detach(), torch.cat([p.grad.flatten() for _, p in sorted(m.named_parameters())])

    ref = run(ours, False)
    seen.clear()
    got = run(ours, True)
    fp32 = (torch.float32, torch.float32, torch.float32, False)  # v comes from a bf16 matmul, and is cast up
    assert seen == [fp32] * hf.config.num_hidden_layers  # attention in fp32 under the CPU autocast
    hf_got = run(hf, True)
    gap = lambda a, r: ((a - r).norm() / r.norm()).item()
    for i, what in enumerate(["logits", "gradients"]):
        assert 0 < gap(got[i], ref[i]) <= 1.25 * gap(hf_got[i], ref[i]), (what, gap(got[i], ref[i]),
                                                                          gap(hf_got[i], ref[i]))


def test_gradient_checkpointing_same_grads_and_compiles(dense_ckpt):
    """Checkpointing changes memory, not gradients; the checkpointed model traces under torch.compile."""
    _, folder = dense_ckpt
    grads = []
    for ckpt, compile_ in [(False, False), (True, False), (True, True)]:
        m = Qwen3.from_pretrained(folder, dtype=torch.float32).train()
        m.gradient_checkpointing = ckpt
        # aot_eager traces the graph (dynamo + AOT autograd through checkpoint) without a C++ build
        f = torch.compile(m, backend="aot_eager", fullgraph=True) if compile_ else m
        f(IDX).float().logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[2], atol=1e-5)


# --- bad input -----------------------------------------------------------------------------------------

def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return str(dst)


def test_bad_inputs(tmp_path, dense_ckpt, monkeypatch):
    """Each broken checkpoint is a ValueError naming the file or tensor at fault."""
    _, folder = dense_ckpt
    with pytest.raises(ValueError, match="not a model folder"):
        Qwen3.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not a model folder"):  # a typo in a local path is not sent to the Hub
        Qwen3.from_pretrained("out/studnet")
    d = _copy(folder, tmp_path / "noconfig")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ValueError, match="config.json not found"):
        Qwen3.from_pretrained(d)
    d = _copy(folder, tmp_path / "noweights")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="no model.safetensors"):
        Qwen3.from_pretrained(d)
    d = _copy(folder, tmp_path / "llama")
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump(dict(cfg, model_type="llama"), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        Qwen3.from_pretrained(d)
    sd = load_file(os.path.join(folder, "model.safetensors"))
    d = _copy(folder, tmp_path / "missing")
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_norm.weight"},
              os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors.*model.layers.1.self_attn.k_norm.weight"):
        Qwen3.from_pretrained(d)
    d = _copy(folder, tmp_path / "extra")
    save_file(dict(sd, **{"model.layers.9.foo.weight": torch.zeros(2)}), os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensors.*model.layers.9.foo.weight"):
        Qwen3.from_pretrained(d)
    d = _copy(folder, tmp_path / "shape")
    save_file(dict(sd, **{"model.norm.weight": torch.ones(65)}), os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[65\], config expects \[64\]"):
        Qwen3.from_pretrained(d)
    d = _copy(folder, tmp_path / "truncated")
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated safetensors"):
        Qwen3.from_pretrained(d)
    open(p, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[100:])
    with pytest.raises(ValueError, match="header is corrupt"):
        Qwen3.from_pretrained(d)


@pytest.mark.parametrize("patch, msg", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}, "unsupported rope type"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding-window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_refuses_what_it_would_compute_wrongly(patch, msg):
    d = tiny_hf_config().to_dict()
    d.pop("rope_parameters", None)
    d.update(patch)
    d.setdefault("rope_theta", 1e6)
    with pytest.raises(ValueError, match=msg):
        Qwen3Config.from_dict(d)


def test_config_reads_both_rope_spellings_and_head_dim():
    """rope_theta top-level (transformers <5) or in rope_parameters (v5); head_dim from the file."""
    d = tiny_hf_config().to_dict()
    a = Qwen3Config.from_dict(d)
    d.pop("rope_parameters", None)
    b = Qwen3Config.from_dict(dict(d, rope_theta=5e6))
    assert a.rope_theta == 1e6 and b.rope_theta == 5e6 and a.head_dim == 24 != a.hidden_size // 4
    moe = tiny_hf_config(moe=True).to_dict()  # v5 writes num_local_experts
    assert Qwen3Config.from_dict(moe).num_experts == 6


# --- the real tokenizer --------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER), reason="../shared/qwen3-tokenizer not present")
def test_real_qwen3_tokenizer_special_ids():
    """The real tokenizer's special ids agree with Qwen3's config (bos 151643, eos 151645) and fit its vocab."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(SHARED_TOKENIZER, "tokenizer.json"))
    cfg = Qwen3Config()  # defaults carry Qwen3-1.7B's vocab; bos/eos from its config.json
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.token_to_id("<think>") == 151667
    assert tok.get_vocab_size() == 151669 <= cfg.vocab_size
    tc = json.load(open(os.path.join(SHARED_TOKENIZER, "tokenizer_config.json")))
    assert tok.token_to_id(tc["eos_token"]) == 151645 and tok.token_to_id(tc["pad_token"]) == 151643
    assert tok.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]


def test_flops_per_token_hand_count():
    """The MFU formula against a count by hand on a tiny config (dense and MoE). Breaks if a projection, the lm_head,
    the attention term or the backward factor is miscounted, or if the MoE count includes idle experts."""
    cfg = Qwen3Config(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=3)
    per_layer = 8 * 12 + 8 * 6 + 8 * 6 + 12 * 8 + 3 * 8 * 12  # q (8x12), k, v (8x6 each), o (12x8), gate/up/down
    n = 2 * per_layer + 100 * 8  # two layers and the lm_head; the embedding lookup is no matmul
    assert cfg.matmul_params() == n == 1952
    attn = 2 * 2 * 2 * 16 * 4 * 3  # layers x (QK^T and AV) x 2 FLOPs x T=16 x heads x head_dim
    assert cfg.flops_per_token(16, backward=False) == 2 * n + attn
    assert cfg.flops_per_token(16) == 3 * (2 * n + attn)
    moe = Qwen3Config(model_type="qwen3_moe", vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=5,
                      mlp_only_layers=[1], intermediate_size=12)
    sparse = 8 * 12 + 8 * 6 + 8 * 6 + 12 * 8 + 6 * 8 + 2 * 3 * 8 * 5  # attention + router + 2 active experts
    assert moe.matmul_params() == sparse + per_layer + 800


def test_init_weights_under_another_default_device():
    """init_weights draws on the CPU whatever the default device: train.py builds a scratch model inside
    torch.device(args.device), and with cuda there the draw failed ('Expected a cuda device type for generator', seen
    on an H200). Here the meta device stands in for cuda (a spy sees where the numbers are drawn); on a GPU the
    weights also equal the CPU's."""
    cfg = Qwen3Config(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4)
    from torch.overrides import TorchFunctionMode
    drawn = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.randn:
                drawn.append(out)
            return out

    with torch.device("meta"), Spy():
        m = Qwen3(cfg).init_weights(3)
    assert all(p.is_meta for p in m.parameters()) and drawn and all(x.device.type == "cpu" for x in drawn)
    ref = Qwen3(cfg).init_weights(3)
    if torch.cuda.is_available():
        with torch.device("cuda"):
            g = Qwen3(cfg).init_weights(3)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(g.parameters(), ref.parameters()))
    assert ref.model.layers[0].self_attn.q_proj.weight.std() > 0
