"""
Phase 4's files (train.py writes them; demo.sh, ablate.py and bench.py read the student through read_student):
  ckpt/            model.safetensors (fp32), optimizer.pt and rng.pt (loaded with weights_only=True), state.json
                   (written last); swapped in atomically. With --fsdp, each process's shards in
                   torch.distributed.checkpoint's format (its .metadata is pickled: resume only your own runs' files).
  train_log.jsonl  one JSON line per optimizer step and per evaluation
  the student      a Hugging Face folder: config.json, model.safetensors, generation_config.json, the cache's
                   tokenizer files with the DualMind chat template
And the model's wrappers under torchrun these files see through: wrap_model, shard_model, unwrap, sharded, stopped.
"""

import glob
import json
import os
import shutil

import torch

from common import (chat_template, check_free_space, disk_full_is_oserror, end_tokens, publish, read_manifest,
                    write_json)


def unwrap(model):
    """The model itself, out of its DDP and torch.compile wrappers (their state dicts prefix the names)."""
    m = getattr(model, "module", model)  # DDP
    return getattr(m, "_orig_mod", m)  # torch.compile


def sharded(model):
    """Whether FSDP2 shards the model (train.py --fsdp): its parameters are DTensors, but for the time FSDP has
    gathered them (the root's stay whole from a forward to its backward)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(unwrap(model), FSDPModule)


def local(t):
    """A tensor, or this process's shard of an FSDP-sharded one."""
    return t.to_local() if hasattr(t, "to_local") else t


def stopped(got, ddp, device):
    """Whether any process was asked to stop (all-reduced under torchrun, so every rank leaves at the same step)."""
    if not ddp:
        return bool(got)
    import torch.distributed as dist
    flag = torch.tensor([float(bool(got))], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def shard_model(model, dtype):
    """--fsdp: each decoder layer, then the root (so a tied head stays one with the embedding), sharded with FSDP2:
    fp32 weights, gradients and AdamW state split N ways; --dtype bfloat16: bf16 compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def wrap_model(model, compile, ddp, device):
    """What the step calls: the model, compiled with --compile, inside DDP under torchrun (FSDP is in the model)."""
    train_model = torch.compile(model) if compile else model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        if not sharded(model):
            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return train_model


def non_finite(tensors):
    """The names in {name: tensor} of the tensors holding a nan or an inf (one host sync for all of them). Sharded
    tensors are checked shard by shard and the flags combined over the processes, so every process gets the answer."""
    if not tensors:
        return []
    dev = local(next(iter(tensors.values()))).device
    # one flag per tensor, stacked, then one .tolist(): a GPU is synchronised once, not once per tensor
    ok = torch.stack([torch.isfinite(local(t)).all().to(dev) for t in tensors.values()]).int()
    if any(hasattr(t, "to_local") for t in tensors.values()):
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)  # finite on every process
    return [n for n, good in zip(tensors, ok.tolist()) if not good]


def refuse_non_finite(what, tensors):
    """A ValueError `what`: the first tensors of {name: tensor} that hold nan or inf (a nan saved would be used)."""
    bad = non_finite(tensors)
    if bad:
        raise ValueError(f"{what}: {bad[:3]}{' ...' if len(bad) > 3 else ''} hold nan or inf")


def save_checkpoint(folder, model, opt, state):
    """Atomic: written into folder.tmp, then swapped in (swap_in). A nan or inf in a weight or optimizer tensor is a
    ValueError and nothing is written. A sharded model (--fsdp): every process calls this (save_sharded)."""
    if sharded(model):
        return save_sharded(folder, model, opt, state)
    from safetensors.torch import save_file
    # a tied lm_head is the embedding: saved once, as transformers saves it
    sd = {k: v.detach() for k, v in unwrap(model).state_dict().items()
          if not (k == "lm_head.weight" and unwrap(model).config.tie_word_embeddings)}
    moments = {f"optimizer {k} of {n}": v for n, p in unwrap(model).named_parameters() if p in opt.state
               for k, v in opt.state[p].items() if torch.is_tensor(v)}
    refuse_non_finite(f"{folder}: not saved at step {state['step']}", {**sd, **moments})
    # 1. the whole checkpoint into folder.tmp, state.json last (find_checkpoint trusts a folder that has it); on a
    # full disk folder.tmp is removed and the checkpoint in place stays the last complete one
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with disk_full_is_oserror(tmp):
            check_free_space(tmp, sum(v.nbytes for v in {**sd, **moments}.values()) + (1 << 20), "the checkpoint")
            save_file({k: v.cpu().contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"))
            torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(dict(torch=torch.get_rng_state()), os.path.join(tmp, "rng.pt"))
            write_json(os.path.join(tmp, "state.json"), state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, folder)


def swap_in(tmp, folder):
    """The previous checkpoint to folder.old, the new one (tmp) into place, then folder.old removed: at any kill, one
    complete checkpoint exists (find_checkpoint)."""
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(folder):
        publish(folder, old)
    publish(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_sharded(folder, model, opt, state):
    """save_checkpoint for FSDP: each process writes its shards of the weights and AdamW state into folder.tmp
    (torch.distributed.checkpoint), then rank 0 adds rng.pt and state.json and swaps it in as save_checkpoint does."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, tmp = dist.get_rank(), folder + ".tmp"
    msd, osd = get_state_dict(model, opt)
    moments = {f"optimizer {k} of {n}": v for n, st in osd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    # every process learns of a nan in any shard
    refuse_non_finite(f"{folder}: not saved at step {state['step']}", {**msd, **moments})
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(dict(model=msd, optim=osd), checkpoint_id=tmp)  # collective: rank 0 writes .metadata last
    if rank == 0:
        torch.save(dict(torch=torch.get_rng_state()), os.path.join(tmp, "rng.pt"))
        write_json(os.path.join(tmp, "state.json"), dict(state, sharded=True))
        swap_in(tmp, folder)
    dist.barrier()  # no process goes on before the new checkpoint is in place


def folder_manifest(out):
    """out/manifest.json as a dict, or {} where there is none to read."""
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def find_checkpoint(folder):
    """The newest complete checkpoint among folder, folder.tmp (finished but not yet moved) and folder.old."""
    best = None
    for f in [folder, folder + ".tmp", folder + ".old"]:
        path = os.path.join(f, "state.json")
        if os.path.isfile(path):
            with open(path) as fh:
                step = json.load(fh)["step"]
            best = max(best or (step, f), (step, f))
    return best[1] if best else None


def load_checkpoint(folder, model, opt, fingerprint):
    """Weights, optimizer state and RNG of a checkpoint into model and opt; its state.json (a dict) is returned.
    A checkpoint of another run (fingerprint) is a ValueError."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{folder}: checkpoint of a run with other inputs or settings; remove it or drop --resume")
    if state.get("sharded", False) != sharded(model):
        raise ValueError(f"{folder}: checkpoint written {'with' if state.get('sharded') else 'without'} --fsdp; "
                         "resume it the same way")
    if sharded(model):  # each process reads its shards, whatever the process count that wrote them
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)  # this run's layout, AdamW state included (created if empty)
        sd = dict(model=msd, optim=osd)
        dcp.load(sd, checkpoint_id=folder)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:  # weights from safetensors; the optimizer's and RNG's tensors with weights_only=True: nothing is unpickled
        sd = load_file(os.path.join(folder, "model.safetensors"), device=str(next(model.parameters()).device))
        unwrap(model).load_state_dict(sd, strict=not unwrap(model).config.tie_word_embeddings)
        opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True,
                                       map_location=next(model.parameters()).device))
    torch.set_rng_state(torch.load(os.path.join(folder, "rng.pt"), weights_only=True)["torch"])
    return state


def log_lines(path):
    """(line, its dict) per line of train_log.jsonl; a line cut short by a kill is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


class RunLog:
    """train_log.jsonl, written by rank 0. A resume from step S keeps the lines up to step S and drops later ones
    (written after that checkpoint, about to be written again): the log never repeats a step."""

    def __init__(self, path, start, enabled=True):
        self.f, self.path = None, path
        if not enabled:
            return
        kept = []
        if start and os.path.isfile(path):
            for line, e in log_lines(path):
                if e.get("step", e.get("eval_step", 0)) <= start:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w", encoding="utf-8") as f:  # the kept lines, swapped in atomically
            f.writelines(kept)
        publish(path + ".tmp", path)
        self.f = open(path, "a", encoding="utf-8")

    def record(self, entry):
        if self.f:
            self.f.write(json.dumps(entry) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


def read_log(path):
    """train_log.jsonl -> (step lines, evaluation lines), lists of dicts; a line cut short by a kill is skipped."""
    steps, evals = [], []
    for _, e in log_lines(path):
        (evals if "eval_step" in e else steps).append(e)
    return steps, evals


def gather_weights(model, dtype):
    """A sharded model's weights, whole, one tensor at a time (every process takes part): rank 0 keeps them on the
    host in `dtype`, so it holds one full copy at most; the others get {}. A tied lm_head is left out."""
    m, keep = unwrap(model), torch.distributed.get_rank() == 0
    sd = {}
    for k, v in m.state_dict().items():
        if k == "lm_head.weight" and m.config.tie_word_embeddings:
            continue
        full = v.full_tensor()  # a collective: all processes, the same order
        if keep:
            sd[k] = full.detach().to(dtype).cpu()
    return sd


def save_student(out, model, cache, save_dtype, weights=None):
    """The student in Hugging Face layout with the cache's tokenizer and the DualMind chat template, tokenizer first
    (config.json comes last: a folder with it is whole). weights: a sharded model's, gathered (gather_weights)."""
    m = unwrap(model)
    tensors = dict(m.named_parameters()) if weights is None else weights
    refuse_non_finite(f"{out}: the student is not saved", tensors)  # the NaN guard stops a run before this
    size = sum(p.numel() for p in tensors.values()) * getattr(torch, save_dtype).itemsize
    check_free_space(out, size + (1 << 20), "the student")  # one line before any file, rather than a short write
    shutil.copyfile(cache.tokenizer_path, os.path.join(out, "tokenizer.json.tmp"))
    publish(os.path.join(out, "tokenizer.json.tmp"), os.path.join(out, "tokenizer.json"))
    # the cache's tokenizer_config.json (the teacher's), with the DualMind prompt as its chat template
    src = os.path.join(cache.folder, "tokenizer_config.json")
    if os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            cfg = json.load(f)
    else:  # a cache written without one: the least AutoTokenizer needs
        cfg = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=end_tokens(cache.tokenizer_path)[0][0])
    write_json(os.path.join(out, "tokenizer_config.json"), dict(cfg, chat_template=chat_template()))
    if not m.generation_config:  # a student from scratch: stop at the cache's end tokens
        ends = dict(end_tokens(cache.tokenizer_path))
        m.generation_config = dict(eos_token_id=sorted(ends.values()),
                                   pad_token_id=ends.get("<|endoftext|>", min(ends.values())))
    try:  # a full disk anyway: no .tmp is left; a folder without config.json and a complete manifest is not trusted
        with disk_full_is_oserror(out):
            m.save_pretrained(out, dtype=getattr(torch, save_dtype), state_dict=weights)  # fp32 master, cast one by one
    except BaseException:
        for f in glob.glob(os.path.join(out, "*.tmp")):
            os.remove(f)
        raise


def read_student(folder):
    """The manifest of a complete student folder (what demo.sh and ablate.py read): args, steps, tokens,
    first_eval and last_eval (dicts of ce, kl, top1, tail_gap on the held-out windows)."""
    return read_manifest(folder, "student")
