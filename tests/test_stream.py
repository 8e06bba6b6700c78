"""cache_teacher.py --stream_layers: one decoder layer at a time, byte for byte the in-memory pass; resume, torchrun,
budget and checkpoint errors. (Peak memory against the checkpoint size is measured in bench.py, section stream.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DATA, ROOT, make_teacher, run_main
from model import read_header, weight_files
from test_cache import same_arrays

BASE = ["--dtype", "float32", "--device", "cpu", "--batch_tokens", "3000", "--log_every", "1e9"]


def cache(out, teacher, tokenizer, *extra):
    """cache_teacher.main in this process, so the passes compared run under the same thread settings."""
    import cache_teacher
    run_main(cache_teacher, "--data", DATA, "--teacher", teacher, "--tokenizer", tokenizer, "--out", out, *BASE, *extra)
    return str(out)


def checkpoint_bytes(folder):
    return sum(os.path.getsize(p) for p in weight_files(folder))


def teacher_of(kind, folder):
    if kind == "dense-tied":  # 8 layers: the checkpoint is over 4x the embedding, the largest piece
        return make_teacher(folder, 1088, layers=8)
    # MoE with a dense layer between (mlp_only_layers), untied lm_head, small shards: layers span several files
    return make_teacher(folder, 1088, moe=True, layers=3, mlp_only_layers=[1], tie_word_embeddings=False,
                        max_shard_bytes=60_000)


@pytest.mark.parametrize("kind", ["dense-tied", "moe-untied-sharded"])
def test_streamed_equals_in_memory(tmp_path, demo_tokenizer, kind, capsys):
    """Hidden states kept in memory or spilled to scratch (budget a quarter of the checkpoint), the streamed cache
    is byte-identical to the in-memory one (fp32, CPU), and the scratch folder is gone at the end."""
    teacher = teacher_of(kind, tmp_path / "teacher")
    if kind != "dense-tied":
        files = weight_files(teacher)
        where = {k: p for p in files for k in read_header(p)}
        assert len(files) > 3 and len({where[k] for k in where if k.startswith("model.layers.0.")}) > 1
    ref = cache(tmp_path / "mem", teacher, demo_tokenizer, "--max_docs", "8")
    budget = checkpoint_bytes(teacher) / 4 if kind == "dense-tied" else 0.0003e9  # above the lm_head's 0.28 MB
    for name, extra in [("resident", []), ("spilled", ["--stream_budget_gb", str(budget / 1e9)])]:
        capsys.readouterr()
        out = cache(tmp_path / name, teacher, demo_tokenizer, "--max_docs", "8", "--stream_layers", *extra)
        err = capsys.readouterr().err
        assert ("kept on the device" if name == "resident" else "spilled to") in err
        assert same_arrays(out, ref), name
        assert not os.path.exists(os.path.join(out, "stream_scratch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["dense-tied", "moe-untied-sharded"])
def test_streamed_equals_in_memory_on_gpu(tmp_path, demo_tokenizer, kind):
    """bf16 on a GPU: the same kernels on the same shapes, and no forward kernel that sums atomically (a token meets
    each expert at most once, so index_add_ never adds twice into a row): the bytes are the in-memory pass's."""
    teacher = teacher_of(kind, tmp_path / "teacher")
    gpu = ["--device", "cuda", "--dtype", "bfloat16", "--max_docs", "8"]
    ref = cache(tmp_path / "mem", teacher, demo_tokenizer, *gpu)
    for name, extra in [("resident", []), ("spilled", ["--stream_budget_gb", "0.0003"])]:
        assert same_arrays(cache(tmp_path / name, teacher, demo_tokenizer, *gpu, "--stream_layers", *extra), ref)


@pytest.fixture(scope="module")
def deep(tmp_path_factory, demo_tokenizer):
    """An 8-layer teacher and its in-memory cache, from the shell (the killed run below is a subprocess too)."""
    d = tmp_path_factory.mktemp("deep")
    teacher = make_teacher(d / "teacher", 1088, layers=8, seed=3)
    out = d / "ref"
    subprocess.run([sys.executable, os.path.join(ROOT, "cache_teacher.py"), "--data", DATA, "--teacher", teacher,
                    "--tokenizer", demo_tokenizer, "--out", str(out), "--max_docs", "12", *BASE], check=True,
                   capture_output=True, cwd=ROOT)
    return teacher, str(out)


def wait_for(path, ok, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if ok(json.load(open(path))):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("point", ["layer", "layer-resident", "head"])
def test_streamed_kill_and_resume(tmp_path, demo_tokenizer, deep, point):
    """kill -9 after layer 3 was saved (states spilled, or kept in memory and saved every 3 layers) or during the
    lm_head stage, run again: it resumes from the last saved layer (or batch) and ends byte-identical to the
    in-memory pass, with the scratch files removed."""
    teacher, ref = deep
    out = tmp_path / "killed"
    how = (["--stream_budget_gb", "0.0005"] if point != "layer-resident" else  # under the states' size: spilled
           ["--stream_save_every", "3"])  # saves after the embedding and layers 3, 6 and 8
    cmd = [sys.executable, os.path.join(ROOT, "cache_teacher.py"), "--data", DATA, "--teacher", teacher,
           "--tokenizer", demo_tokenizer, "--out", str(out), "--max_docs", "12", *BASE, "--stream_layers", *how]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    if point != "head":  # the embedding and layers 1-3 saved
        assert wait_for(out / "stream_scratch" / "state.0.json", lambda s: s["stages_done"] >= 4)
    else:
        assert wait_for(out / "progress.0.json", lambda done: len(done) >= 1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.load(open(out / "manifest.json"))["complete"] is False
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    if point != "head":
        assert "resuming after layer" in r.stderr and "[stream] layer 1/8" not in r.stderr
    else:
        assert "[stream] layer" not in r.stderr  # every layer was complete: only the lm_head stage is left
    assert same_arrays(str(out), ref)
    assert not (out / "stream_scratch").exists()


def test_streamed_torchrun(tmp_path, tiny_teacher, demo_tokenizer, tiny_cache):
    """torchrun --nproc_per_node=2: each process streams its own batches; the bytes are the single-process ones."""
    out = tmp_path / "tr"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "cache_teacher.py"), "--data", DATA, "--teacher", tiny_teacher,
                        "--tokenizer", demo_tokenizer, "--out", str(out), *BASE, "--stream_layers",
                        "--stream_budget_gb", "0.001"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[stream rank 1] done" in r.stderr
    assert same_arrays(str(out), tiny_cache)


def test_stream_bad_inputs(tmp_path, demo_tokenizer, tiny_teacher):
    """A budget below one layer names the layer's size and the budget; a checkpoint missing a layer's tensors names
    them. Both fail before anything is written."""
    wide = make_teacher(tmp_path / "wide", 1088, intermediate_size=1024)  # a layer outweighs the embedding
    with pytest.raises(ValueError, match=r"--stream_budget_gb 0.0005: smaller than the teacher's decoder layer "
                                         r"model.layers.\d \(0.000\d+ GB\)"):
        cache(tmp_path / "o1", wide, demo_tokenizer, "--stream_layers", "--stream_budget_gb", "0.0005")
    assert not (tmp_path / "o1").exists()
    from safetensors.torch import load_file, save_file
    import shutil
    broken = shutil.copytree(tiny_teacher, tmp_path / "broken")
    sd = load_file(os.path.join(broken, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("model.layers.1.mlp.")},
              os.path.join(broken, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.down_proj.weight', "
                                         r"'model.layers.1.mlp.gate_proj.weight', "
                                         r"'model.layers.1.mlp.up_proj.weight'\] \(of layers \[1\]\)"):
        cache(tmp_path / "o2", str(broken), demo_tokenizer, "--stream_layers")
    assert not (tmp_path / "o2").exists()


def test_streamed_pass_holds_one_layer(tmp_path, demo_tokenizer):
    """The command line's peak RSS rise over a tokens-only run stays under 0.35x a 1 GB, 16-layer checkpoint (one
    layer, the hidden states and a batch's activations: glibc kept about a layer per layer before, 1.4x), with the
    states kept and spilled, and the streamed cache is byte for byte the in-memory one."""
    from bench import STREAM_MEM_FLAGS, script_peak_rss, stream_memory
    teacher = make_teacher(tmp_path / "teacher", 2048, layers=16, hidden_size=1024, intermediate_size=4096,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=128, std=0.02)
    ckpt = checkpoint_bytes(teacher)
    assert ckpt > 0.95e9
    peaks = stream_memory(teacher, demo_tokenizer, str(tmp_path), [0, 0.065])
    base = peaks.pop("tokens only")
    assert sorted(peaks) == ["streamed, budget 0 GB, states kept", "streamed, budget 0.065 GB, states spilled"]
    for label, peak in peaks.items():
        assert (peak - base) / ckpt < 0.35, (label, peak - base, ckpt)
    streamed = tmp_path / "stream_mem_cache"  # the last run's cache: spilled
    r, peak = script_peak_rss("cache_teacher.py", *STREAM_MEM_FLAGS, "--tokenizer", demo_tokenizer, "--teacher",
                              teacher, "--out", tmp_path / "in_memory")
    assert r.returncode == 0, r.stderr[-3000:]
    assert peak - base > 0.9 * ckpt  # the in-memory pass maps the whole checkpoint: the measure sees weights
    assert same_arrays(str(streamed), str(tmp_path / "in_memory"))
