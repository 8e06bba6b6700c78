"""bench.py --real: its --tiny run end to end on CPU (every row, finite figures), under torchrun, and its shapes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
from conftest import ROOT, run_main
from model import Qwen3, Qwen3Config


def numbers(obj, path=""):
    """Every number in a JSON object, with its path."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in numbers(v, f"{path}[{i}]")]
    return [(path, obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_real_check_tiny_runs_every_row(tmp_path):
    """The GPU check's code, at test size on CPU: every row is in the JSON with finite figures, both MoE paths and the
    streamed pass ran through cache_teacher's statistics, greedy tokens equal transformers', and model.py equals
    transformers in bf16."""
    res = run_main(bench, "--tiny", "--device", "cpu", "--work", tmp_path)
    saved = json.loads((tmp_path / "real_tiny.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert all(saved[row] is not None for row in bench.REAL_ROWS)
    bad = [(p, v) for p, v in numbers(saved) if not math.isfinite(v)]
    assert not bad, bad
    s = saved["student"]
    for name in ["eager", "compile"]:
        assert s[name]["tok_s"] > 0 and 0 < s[name]["mfu"] and s[name]["peak_mem_gb"] > 0
    assert s["max_micro_batch"] == s["max_micro_batch_grad_ckpt"] == dict(size=4, capped=True)  # no OOM on CPU
    t = saved["teacher"]
    for impl in ["grouped", "loop"]:
        r = t[impl]
        assert r["finite"] and 0 < r["moe_share"] < 1 and 0 < r["moe_share_all_layers"] < 1
        assert r["positions_s_all_layers"] < r["positions_s"]  # twice the layers: slower, extrapolated
    assert t["streamed"]["finite"] and t["streamed"]["positions_s_all_layers"] <= t["streamed"]["positions_s"]
    d = saved["decode"]
    assert d["tokens_equal_before_first_difference"] == dict(eager=d["new"], compile=d["new"])
    for key in ["student", "teacher"]:
        assert saved["parity"][key]["max_rel"] <= 1e-2, saved["parity"]


def test_real_check_torchrun_same_losses_as_one_process(tmp_path):
    """torchrun with 2 processes (gloo here, NCCL on GPUs): the DDP step gives one process's losses, the FSDP step
    (train.py --fsdp's sharding, bf16 compute) the same up to bf16 rounding, with its rate, and the second step's
    loss moved (the first step's gradients took part)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "bench.py"), "--tiny", "--device", "cpu", "--work", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    g = json.loads((tmp_path / "real_tiny_torchrun.json").read_text())["distributed"]
    assert g["world"] == 2 and g["backend"] == "gloo"
    assert g["max_rel_diff"] <= 1e-6, g
    assert abs(g["one_process"][1] - g["one_process"][0]) > 1e-3
    assert g["fsdp_max_rel_diff"] <= 1e-3 and g["fsdp_tok_s"] > 0 and 0 < g["fsdp_mfu"] < 1, g


@pytest.mark.parametrize("shape, params", [("qwen3-0.6b", 596_049_920), ("qwen3-1.7b", 1_720_574_976),
                                           ("qwen3-30b-a3b", 30_532_122_624)])
def test_real_shapes_are_the_hub_models(shape, params):
    """The shapes of the check have the Hub checkpoints' parameter counts (built on meta: no memory)."""
    with torch.device("meta"):
        m = Qwen3(Qwen3Config(**bench.SHAPES[shape]))
    assert m.num_params() == params


def test_real_refuses_unknown_rows(tmp_path):
    with pytest.raises(ValueError, match="choose among student, teacher, decode, parity"):
        run_main(bench, "--tiny", "--only", "students", "--work", tmp_path)


def test_real_student_batch_flag_and_a_new_work_folder(tmp_path):
    """--student_batch sets the student row's micro-batch and accumulation (the same code as the card's 2 x 16), and
    --work may name a folder that does not exist yet (the GPU check's first run lost three rows to that)."""
    work = tmp_path / "not" / "yet"
    res = run_main(bench, "--tiny", "--only", "student", "--student_batch", "4x1", "--work", work)
    s = json.loads((work / "real_tiny.json").read_text())["student"]
    assert s == json.loads(json.dumps(res["student"]))
    assert s["micro_batch"] == [4, 64] and s["accum"] == 1 and s["tokens_per_step"] == 4 * 64
    assert res["teacher"] is None and res["decode"] is None
    with pytest.raises(ValueError, match="only with --real or --tiny"):
        run_main(bench, "--only", "hardware", "--student_batch", "4x1", "--work", tmp_path)
    for bad in ["4", "4x0", "x2", "4*2"]:
        with pytest.raises(ValueError, match="--student_batch"):
            run_main(bench, "--tiny", "--only", "student", "--student_batch", bad, "--work", tmp_path)
