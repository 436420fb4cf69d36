"""The one resumable checkpoint format of sft.py and rl.py, and the output folder it lives in.

    <output-dir>/args.json                    the flags of the run (a resume must match them)
    <output-dir>/latest                       the newest complete checkpoint's folder name
    <output-dir>/step_00040/                  a checkpoint (final/ is the last one)
        config.json, model.safetensors, ...   save_pretrained (or a LoRA adapter): what users load
        resume/rank00000.safetensors          per rank: trainable parameters (the fp32 master, local
                                              FSDP2 shard), optimizer state, RNG states
        resume/*.json                         the stage's own resume data (rl.py: in-flight rollouts)
        trainer_state.json                    format, step, world size, args, the stage's own state;
                                              written last, so its presence marks a complete checkpoint

Everything is safetensors or JSON (no pickle). A checkpoint is written to <name>.tmp and renamed
once every rank has written its part, so a kill mid-save leaves the previous one intact. The
exported weights are for users and engines; a resume reads the trainable parameters from resume/
(the master copy, in full precision, in the rank's own shard), so it never depends on the export's
dtype or on gathering.
"""

import json
import os
import random
import shutil

import numpy as np
import torch

import common

FORMAT = 2  # trainer_state.json "format"; 1 = sft.py's before rl.py shared it (same layout, no key)


def barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def local(t):
    """A CPU copy of the local shard of a (possibly FSDP2-sharded DTensor) tensor."""
    t = (t.to_local() if hasattr(t, "to_local") else t).detach()
    return t.cpu() if t.is_cuda else t.clone()  # own storage: safetensors refuses shared tensors


def resume_tensors(model, opt):
    """({key: tensor}, {key: json string}) of this rank's trainable parameters, optimizer state and RNGs."""
    tensors = {"model." + n: local(p) for n, p in model.named_parameters() if p.requires_grad}
    osd = opt.state_dict()
    meta = {}

    def flatten(key, v):  # "optim.<param index>/<key>[/<nested key>]" (bitsandbytes nests dicts)
        if isinstance(v, dict):
            for k, x in v.items():
                flatten(f"{key}/{k}", x)
        elif torch.is_tensor(v):
            tensors[key] = local(v)
        else:
            meta[key] = json.dumps(v)

    for idx, st in osd["state"].items():
        flatten(f"optim.{idx}", st)
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta["param_groups"] = json.dumps(osd["param_groups"])
    meta["python_rng"] = json.dumps(random.getstate())
    meta["numpy_rng"] = json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]])
    return tensors, meta


def save(path, *, export, model, opt, args, state, rank, world_size, resumable=True, keep_last=0, extra=None):
    """Write checkpoint folder `path` (see the module docstring). export(folder) writes the Hugging Face
    files; every rank calls it (a gather is a collective), rank 0 writes. state: the stage's JSON-able
    position (step, data position); extra: {file name: JSON-able} that rank 0 writes into resume/ (the
    stage's own resume data); keep_last > 0 deletes all but the newest keep_last step_* folders."""
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "resume") if resumable else tmp)
    barrier(world_size)
    export(tmp)
    if resumable:
        tensors, meta = resume_tensors(model, opt)
        save_file(tensors, os.path.join(tmp, "resume", f"rank{rank:05d}.safetensors"), metadata=meta)
        for name, obj in (extra or {}).items() if rank == 0 else ():
            with open(os.path.join(tmp, "resume", name), "w") as f:
                json.dump(obj, f)
    barrier(world_size)
    if rank == 0:
        record = dict(format=FORMAT, **state, world_size=world_size, resumable=resumable, args=vars(args))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: marks it complete
            json.dump(record, f, indent=1)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        if resumable:
            with open(os.path.join(os.path.dirname(path), "latest"), "w") as f:
                f.write(os.path.basename(path))
        for old in checkpoints(os.path.dirname(path))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    barrier(world_size)


def load(path, model, opt, rank):
    """Restore this rank's trainable weights, optimizer state and RNG states from checkpoint `path`;
    returns its trainer_state.json."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    with safe_open(os.path.join(path, "resume", f"rank{rank:05d}.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("model."):
                p = params[k.removeprefix("model.")]
                (p.to_local() if isinstance(p, DTensor) else p).copy_(v)
    by_idx = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for k, v in list(tensors.items()) + [(k, json.loads(s)) for k, s in meta.items()]:
        if not k.startswith("optim."):
            continue
        head, *parents, name = k.split("/")
        idx = int(head.removeprefix("optim."))
        p = by_idx[idx]
        if torch.is_tensor(v) and isinstance(p, DTensor) and v.dim() > 0:  # back to the parameter's sharding
            v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        d = state.setdefault(idx, {})
        for part in parents:
            d = d.setdefault(part, {})
        d[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    py = json.loads(meta["python_rng"])
    npy = json.loads(meta["numpy_rng"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def checkpoints(out):
    """Complete resumable step_* checkpoints in `out`, oldest first."""
    names = sorted(n for n in os.listdir(out) if n.startswith("step_") and not n.endswith(".tmp")) \
        if os.path.isdir(out) else []
    return [os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n, "trainer_state.json"))]


def finished(out):
    """Whether the run in `out` saved its final model (a --resume of it has nothing left to do)."""
    return os.path.exists(os.path.join(out, "final", "trainer_state.json"))


def _old_format(out):
    """A folder an rl.py of before the shared format wrote (state.json, optim_rank<r>.safetensors)."""
    marker = os.path.join(out, "latest")
    if not os.path.exists(marker):
        return False
    ckpt = os.path.join(out, open(marker).read().strip())
    return os.path.exists(os.path.join(ckpt, "state.json")) and not os.path.exists(
        os.path.join(ckpt, "trainer_state.json"))


# What --overwrite deletes: the files a run writes (never anything else a user keeps in that folder).
RUN_FILES = ("args.json", "latest", "metrics.jsonl", "rollouts.jsonl", "reward_curve.png", "final", "final-merged")


def prepare_output_dir(args, rank, world_size, free):
    """The checkpoint to resume from (or None). Refuses to start over a run unless --overwrite, to resume
    a folder without one, one made with other flags (each changed flag named; `free` = the flags a
    resume may change) or by another number of processes, and an older format (which it names)."""
    out = common.writable_path(args.output_dir, "--output-dir", folder=True)  # before any model loads
    args_file = os.path.join(out, "args.json")
    if os.path.exists(args_file) and not (args.resume or args.overwrite):
        raise common.InputError(f"--output-dir {out!r} already holds a run ({args_file}); pass --resume to continue "
                                "it, --overwrite to delete it and start over, or choose another --output-dir")
    ckpt = None
    if args.resume:
        if not os.path.exists(args_file):
            raise common.InputError(f"--resume: {out!r} holds no run (no {args_file}); drop --resume to start one "
                                    "there")
        with open(args_file) as f:
            diff = common.changed_flags(json.load(f), vars(args), free)
        if diff:
            raise common.InputError(f"--resume: {args_file} was written with other settings ({'; '.join(diff)}); "
                                    "rerun with the original flags, or start a new run in another --output-dir")
        if _old_format(out):
            raise common.InputError(f"--resume: {out!r} holds a checkpoint in rl.py's format of before 2026-12-01 "
                                    "(state.json, optim_rank<r>.safetensors); resume it with that version of the "
                                    "code, or start over with --overwrite")
        ckpt = (checkpoints(out) or [None])[-1]
        if ckpt:
            with open(os.path.join(ckpt, "trainer_state.json")) as f:
                saved = json.load(f)["world_size"]
            if saved != world_size:
                raise common.InputError(f"--resume: {ckpt} was written by {saved} processes, this run has "
                                        f"{world_size}; resume with the same number (the optimizer state is "
                                        "sharded per rank)")
    barrier(world_size)  # every rank has checked before rank 0 rewrites args.json
    if rank == 0:
        if args.overwrite and os.path.isdir(out):
            for name in os.listdir(out):
                if name in RUN_FILES or name.startswith("step_"):
                    p = os.path.join(out, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        os.makedirs(out, exist_ok=True)
        with open(args_file, "w") as f:
            json.dump(vars(args), f, indent=1)
    barrier(world_size)
    return ckpt


def open_run(args, rank, world_size, free):
    """A training run's start: (checkpoint to resume from or None, wandb run or None), after
    prepare_output_dir's checks; None when --resume finds the run already finished."""
    ckpt = prepare_output_dir(args, rank, world_size, free)
    if args.resume and finished(args.output_dir):
        common.print0(f"{args.output_dir} already finished (final/); nothing to do")
        return None
    wandb_run = None
    if args.wandb_project and rank == 0:
        import wandb

        wandb_run = wandb.init(project=args.wandb_project, config=vars(args), dir=args.output_dir,
                               name=os.path.basename(os.path.abspath(args.output_dir)))
    return ckpt, wandb_run


def forget_after(step, *paths):
    """Drop the rows of these JSONL logs written after `step` (the abandoned future of a resumed run)."""
    for path in paths:
        if os.path.exists(path):
            rows = [r for r in common.read_jsonl(path) if r.get("step", 0) <= step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
