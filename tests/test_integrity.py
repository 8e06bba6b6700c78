"""Nothing silently wrong on disk: the files between phases carry checksums in their manifests, and readers refuse a
file that changed since it was written, naming it (issue 25's flipped-bytes rows)."""

import os
import shutil

from conftest import assert_one_line_error, run_script
from test_train import train_args


def flip(path, n=8, byte=None):
    """Overwrite n bytes in the middle of a file (same size): each byte inverted, or set to `byte`."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(n)
        f.seek(size // 2)
        f.write(bytes([byte] * n) if byte is not None else bytes(b ^ 0xFF for b in old))


def test_flipped_bytes_in_the_cache_are_refused(tmp_path, tiny_cache):
    """8 bytes flipped in entropy.npy or topk_logprobs.npy (same size, so the array still loads): topology.py exits
    with one line naming the file (before, it ran on entropies of 1e20); --no_verify reads it anyway."""
    for name in ["entropy.npy", "topk_logprobs.npy"]:
        cache = tmp_path / f"cache_{name}"
        shutil.copytree(tiny_cache, cache)
        flip(cache / name)
        r = run_script("topology.py", "--cache", cache, "--out", tmp_path / f"topo_{name}", check=False)
        assert_one_line_error(r, "topology.py", str(cache / name), "checksum mismatch", "--no_verify")
        assert not (tmp_path / f"topo_{name}" / "manifest.json").exists()
    run_script("topology.py", "--cache", cache, "--out", tmp_path / "topo_anyway", "--no_verify")


def test_flipped_bytes_in_a_student_are_refused(tmp_path, tiny_cache, tiny_topology, tiny_windows, student_config):
    """64 bytes of 0xFF inside a trained student's model.safetensors: generate.py and train.py --init refuse it with
    one line naming the file (before, generate.py answered one token and exited 0)."""
    student = tmp_path / "student"
    run_script("train.py", *train_args(student, tiny_cache, tiny_topology, tiny_windows, student_config,
                                       "--max_steps", 1))
    run_script("generate.py", "--model", student, "--prompt", "What is a force?", "--max_new_tokens", 2)
    flip(student / "model.safetensors", 64, 0xFF)
    r = run_script("generate.py", "--model", student, "--prompt", "What is a force?", "--max_new_tokens", 2,
                   check=False)
    assert_one_line_error(r, "generate.py", str(student / "model.safetensors"), "checksum mismatch")
    args = train_args(tmp_path / "again", tiny_cache, tiny_topology, tiny_windows, student_config, "--max_steps", 1)
    args[args.index("--init") + 1] = str(student)
    r = run_script("train.py", *args, check=False)
    assert_one_line_error(r, "train.py", str(student / "model.safetensors"), "checksum mismatch")


def test_missing_and_cut_files_are_one_line(tmp_path, tiny_cache, tiny_topology):
    """f.npy missing from a topology folder, block_tv.npy cut to half, a cache array cut to half: the next phase
    stops with one line naming the file (before: a raw FileNotFoundError, or 'mmap length is greater than file
    size' naming no file)."""
    for name, how in [("f.npy", "missing"), ("block_tv.npy", "cut")]:
        topo = tmp_path / f"topo_{name}"
        shutil.copytree(tiny_topology, topo)
        if how == "missing":
            os.remove(topo / name)
        else:
            os.truncate(topo / name, os.path.getsize(topo / name) // 2)
        r = run_script("windows.py", "--cache", tiny_cache, "--topology", topo, "--out", tmp_path / f"win_{name}",
                       check=False)
        assert_one_line_error(r, "windows.py", str(topo / name), "missing" if how == "missing" else "checksum")
    cache = tmp_path / "cache_cut"
    shutil.copytree(tiny_cache, cache)
    os.truncate(cache / "lse.npy", os.path.getsize(cache / "lse.npy") // 2)
    r = run_script("topology.py", "--cache", cache, "--out", tmp_path / "topo_cut", check=False)
    assert_one_line_error(r, "topology.py", str(cache / "lse.npy"), "checksum mismatch")


def test_values_out_of_bounds_are_refused(tmp_path, tiny_cache):
    """A value the format rules out, written with a matching checksum (a writer's bug, not a bad disk): an entropy
    above ln V, a positive log-prob. topology.py stops with one line naming the file, the row and the value."""
    import json
    import numpy as np
    from common import checksums
    for name, row, value in [("entropy", 5, 1.2e20), ("topk_logprobs", 7, 0.5)]:
        cache = tmp_path / f"cache_{name}"
        shutil.copytree(tiny_cache, cache)
        a = np.load(cache / f"{name}.npy")
        a[row] = value
        np.save(cache / f"{name}.npy", a)
        m = json.load(open(cache / "manifest.json"))
        m["sha256"] = checksums(str(cache), list(m["sha256"]))  # the checksums agree: only the bounds can tell
        (cache / "manifest.json").write_text(json.dumps(m))
        r = run_script("topology.py", "--cache", cache, "--out", tmp_path / f"topo_{name}", check=False)
        assert_one_line_error(r, "topology.py", str(cache / f"{name}.npy"), f"row {row}:")
