"""Nothing silently wrong on disk: the files between phases carry checksums in their manifests, and readers refuse a
file that changed since it was written, naming it (issue 25's flipped-bytes rows)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import DATA, ROOT, assert_one_line_error, run_script, train_args


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


# --- a full disk: a small tmpfs, mounted where the test may (root), else the test is skipped ---------------------

@contextlib.contextmanager
def small_disk(path, mb):
    """A tmpfs of `mb` MiB at `path`; yields a function that resizes it (remount) to let a rerun finish."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield lambda mb: subprocess.run(["mount", "-o", f"remount,size={mb}m", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)])


def cache_args(out, teacher, tokenizer, *extra):
    return ["--data", DATA, "--teacher", teacher, "--tokenizer", tokenizer, "--out", out, "--dtype", "float32",
            "--device", "cpu", "--batch_tokens", "3000", *map(str, extra)]


def test_a_full_disk_during_the_cache_is_one_line_and_resumes(tmp_path, tiny_teacher, demo_tokenizer, tiny_cache):
    """cache_teacher.py on a 2 MiB tmpfs: one line before any file is written (it knows the sizes), where before the
    memory-mapped writes died of SIGBUS (exit 135) with no message. A disk that fills after that check anyway (here
    the block allocation of a partial array fails, injected) is one line too. After each, a rerun with space resumes
    and ends with the same bytes as an uninterrupted run."""
    disk = tmp_path / "disk"
    with small_disk(disk, 2) as resize:
        r = run_script("cache_teacher.py", *cache_args(disk / "cache", tiny_teacher, demo_tokenizer), check=False)
        assert_one_line_error(r, "cache_teacher.py", "the disk is full", "the cache needs", str(disk / "cache"),
                              "rerun the same command")
        assert set(os.listdir(disk / "cache")) <= {".lock", "manifest.json"}
        resize(64)
        run_script("cache_teacher.py", *cache_args(disk / "cache", tiny_teacher, demo_tokenizer))
        assert json.load(open(disk / "cache" / "manifest.json"))["sha256"] == \
            json.load(open(os.path.join(tiny_cache, "manifest.json")))["sha256"]
    # the allocation of lse.partial.npy fails as on a disk that another process has just filled
    out = tmp_path / "cache_enospc"
    inject = ("import errno, os, runpy, sys; real = os.posix_fallocate\n"
              "def full(fd, off, n):\n"
              "    if os.readlink(f'/proc/self/fd/{fd}').endswith('lse.partial.npy'):\n"
              "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              "    real(fd, off, n)\n"
              "os.posix_fallocate = full\n"
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", inject, os.path.join(ROOT, "cache_teacher.py"),
                        *cache_args(out, tiny_teacher, demo_tokenizer)], capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(r, "cache_teacher.py", "the disk is full", str(out / "lse.partial.npy"))
    run_script("cache_teacher.py", *cache_args(out, tiny_teacher, demo_tokenizer))
    assert json.load(open(out / "manifest.json"))["sha256"] == \
        json.load(open(os.path.join(tiny_cache, "manifest.json")))["sha256"]


def test_a_full_disk_during_training_is_one_line_and_resumes(tmp_path, tiny_cache, tiny_topology, tiny_windows,
                                                             student_config):
    """train.py into a 4 MiB tmpfs with --ckpt_every 3: the first checkpoint fits, the second does not (the previous
    one stays until the new one is whole): one line, no ckpt.tmp left, the checkpoint of step 3 intact (before: a
    raw safetensors traceback and an empty ckpt.tmp). With space, --resume ends byte-identical to a run that never
    stopped."""
    base = lambda out: train_args(out, tiny_cache, tiny_topology, tiny_windows, student_config, "--max_steps", 8,
                                  "--ckpt_every", 3)
    run_script("train.py", *base(tmp_path / "straight"))
    disk = tmp_path / "disk"
    with small_disk(disk, 4) as resize:
        out = disk / "student"
        r = run_script("train.py", *base(out), check=False)
        assert_one_line_error(r, "train.py", "the disk is full", "the checkpoint needs", str(out / "ckpt.tmp"),
                              "--resume")
        assert not (out / "ckpt.tmp").exists() and json.load(open(out / "ckpt" / "state.json"))["step"] == 3
        resize(64)
        run_script("train.py", *base(out), "--resume")
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()


def test_a_short_write_on_a_full_disk_is_an_oserror_and_leaves_no_tmp(tmp_path):
    """What the precise checks cannot foresee: safetensors, torch.save and np.save running out of space inside
    disk_full_is_oserror come out as OSError(ENOSPC) naming the file (safetensors raises its own error type and
    torch.save a bare 'unexpected pos' RuntimeError), and atomic_write leaves no .tmp behind."""
    import errno
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from common import disk_full_is_oserror, save_npy
    disk = tmp_path / "disk"
    with small_disk(disk, 1):
        for name, write in [("a.safetensors", lambda p: save_file({"a": torch.zeros(1 << 19)}, p)),
                            ("b.pt", lambda p: torch.save({"b": torch.zeros(1 << 19)}, p)),
                            ("c.npy", lambda p: save_npy(p, np.zeros(1 << 19, np.float32)))]:
            path = str(disk / name)
            with pytest.raises(OSError) as e:
                with disk_full_is_oserror(path):
                    write(path)
            assert e.value.errno == errno.ENOSPC and e.value.filename == path
            for f in os.listdir(disk):
                os.remove(disk / f)
        assert not os.listdir(disk)


def test_sigterm_stops_the_cache_at_a_batch_and_resumes(tmp_path, demo_tokenizer):
    """SIGTERM during the teacher pass: the batch in flight is finished and saved, the run exits non-zero with one
    line saying how to go on (before: killed at once, silently), and the rerun ends byte-identical to an
    uninterrupted run."""
    from conftest import make_teacher
    teacher = make_teacher(tmp_path / "teacher", vocab_size=1088, hidden_size=256, intermediate_size=1024,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32, layers=4)
    args = lambda out: cache_args(out, teacher, demo_tokenizer, "--max_docs", 12, "--batch_tokens", 800)
    run_script("cache_teacher.py", *args(tmp_path / "straight"))
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "cache_teacher.py"), *args(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "progress.0.json").exists() and time.time() - t0 < 120:
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1].strip().splitlines()
    assert p.returncode not in (0, -signal.SIGTERM) and "stopped by SIGTERM after" in err[-1], err[-5:]
    assert "run the same command" in err[-1] and not (out / "topk_ids.npy").exists()
    assert 1 <= len(json.load(open(out / "progress.0.json")))
    run_script("cache_teacher.py", *args(out))
    assert json.load(open(out / "manifest.json"))["sha256"] == \
        json.load(open(tmp_path / "straight" / "manifest.json"))["sha256"]


def rewrite_checked(folder, name, change):
    """Change one array of a phase folder and re-checksum it (the bug is the writer's, so the checksum agrees)."""
    import numpy as np
    from common import checksums
    a = np.load(folder / f"{name}.npy")
    change(a)
    np.save(folder / f"{name}.npy", a)
    m = json.load(open(folder / "manifest.json"))
    m["sha256"] = checksums(str(folder), list(m["sha256"]))
    (folder / "manifest.json").write_text(json.dumps(m))


def test_topology_and_windows_out_of_bounds_are_refused(tmp_path, tiny_cache, tiny_topology, tiny_windows,
                                                        student_config):
    """A nan in topology's disc.npy (windows.py reads it) and a window that runs past its document's end (train.py
    reads it): one line naming the file, the row and the value, where before they were used as they were."""
    topo = tmp_path / "topology"
    shutil.copytree(tiny_topology, topo)
    rewrite_checked(topo, "disc", lambda a: a.__setitem__(11, float("nan")))
    r = run_script("windows.py", "--cache", tiny_cache, "--topology", topo, "--out", tmp_path / "w", check=False)
    assert_one_line_error(r, "windows.py", str(topo / "disc.npy"), "row 11: nan is not finite")
    win = tmp_path / "windows"
    shutil.copytree(tiny_windows, win)
    rewrite_checked(win, "windows", lambda a: a.__setitem__((3, 3), a[3, 3] + 10 ** 6))
    r = run_script("train.py", *train_args(tmp_path / "s", tiny_cache, tiny_topology, win, student_config,
                                           "--max_steps", 1), check=False)
    assert_one_line_error(r, "train.py", str(win / "windows.npy"), "row 3:", "is not inside its document")
