"""Fine-tuning on several processes started by torchrun: the thin layer around the one training loop.

torchrun (or `g3n train --gpus N`, which runs it) sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
and the rendezvous. This module starts the process group (NCCL on CUDA, gloo on CPU; every
collective has a timeout, so a lost peer ends the run instead of hanging it), gives each process the
GPU of its LOCAL_RANK, checks that all processes run the same settings on the same data, wraps the
model (DistributedDataParallel for LoRA, FSDP2 `fully_shard` per decoder layer for full fine-tuning)
and moves state between the sharded model and world-size-independent checkpoints (full tensors by
name, written by process 0). Without torchrun, `Dist()` describes the single process and the
helpers do what one process needs (no communication).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from array import array
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from g3n.errors import G3nError

TIMEOUT_ENV = "G3N_DIST_TIMEOUT"  # seconds a collective may wait for the slowest process
DEFAULT_TIMEOUT_S = 900


class PeerError(G3nError):
    """An error every process raises alike (after agreeing on it); the CLI prints it once per host
    (LOCAL_RANK 0) instead of once per process."""

    all_ranks = True


@dataclass
class Dist:
    """This process's place in the group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    fsdp: bool = False  # set by wrap(): the model's parameters are sharded DTensors
    owns_group: bool = False  # setup() started the process group (and teardown() ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over all processes (float64)."""
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.on:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()


def launched() -> bool:
    """True inside a torchrun worker of a group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise G3nError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds > 0")
    return seconds


def setup(device: str | None) -> Dist:
    """Join the process group torchrun set up; `device` is the config's (None, cpu or cuda).
    Without torchrun: the single process on `device`."""
    if not launched():
        return Dist(device=torch.device(device) if device else None)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device and torch.device(device).index is not None:
        raise PeerError(
            f"config: device {device!r}: under torchrun each process takes the GPU of its LOCAL_RANK; set device to cuda"
        )
    if kind == "cuda":
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise PeerError(
                f"{local_world} processes on this host but {gpus} GPU(s) visible: start at most {gpus} "
                f"(torchrun --nproc-per-node {gpus}, or g3n train --gpus {gpus})"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise PeerError(f"config: device {device!r}: distributed training runs on cuda (NCCL) or cpu (gloo)")
    owns_group = not dist.is_initialized()  # a caller's own process group is used as it is
    if owns_group:
        dist.init_process_group(
            "nccl" if kind == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s()),
            device_id=dev if kind == "cuda" else None,
        )
    return Dist(rank, world, local_rank, dev, owns_group=owns_group)


@contextlib.contextmanager
def explained_timeouts(d: Dist):
    """A collective that timed out (gloo raises; NCCL's watchdog ends the process itself) becomes
    one line naming the setting, instead of a backend traceback."""
    try:
        yield
    except RuntimeError as e:
        if not (d.on and "timed out" in str(e).lower()):
            raise
        raise G3nError(
            f"process {d.rank}: the other processes did not answer within {timeout_s():g} s ({TIMEOUT_ENV}); "
            "one of them stopped or is stuck: see its output"
        ) from None


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _gather(d: Dist, value) -> list:
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_settings(d: Dist, settings: dict) -> None:
    """Every process must run the same settings: otherwise name the first process that differs
    from process 0, and how (every process raises the same message)."""
    if not d.on:
        return
    gathered = _gather(d, settings)
    first = gathered[0]
    for rank, other in enumerate(gathered):
        changed = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if changed:
            diffs = "; ".join(
                f"{k} {first.get(k)!r} on process 0, {other.get(k)!r} on process {rank}" for k in changed[:3]
            )
            raise PeerError(
                f"process {rank} was started with other settings than process 0 ({diffs}); "
                "every process must get the same config"
            )


def check_same_data(d: Dist, rows) -> None:
    """Every process must have read the same training rows (same files on every host)."""
    if not d.on:
        return
    h = hashlib.sha256()
    for row in rows:  # ids, labels, segment ids (lists of ints); media files are refused before this
        for part in row[:3]:
            h.update(len(part).to_bytes(8, "little") + array("q", part).tobytes())
    digest = h.hexdigest()
    gathered = _gather(d, (digest, len(rows)))
    for rank, (other, n_rows) in enumerate(gathered):
        if other != gathered[0][0]:
            raise PeerError(
                f"process {rank} read other training data than process 0 ({n_rows} rows vs {gathered[0][1]}); "
                "every host must see the same data files"
            )


def accumulating(body, last: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step. (FSDP
    reduce-scatters every micro-batch, which keeps only sharded gradients in memory.)"""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return body.no_sync() if isinstance(body, DDP) and not last else contextlib.nullcontext()


def on_main(d: Dist, fn):
    """fn() on process 0 only (it owns output_dir); the others learn whether it failed, so a bad
    output directory stops every process with process 0's message. Returns fn's result on process 0."""
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except G3nError as e:
            error = str(e)
    if d.on:
        box = [error]
        dist.broadcast_object_list(box, src=0, device=d.device)
        error = box[0]
    if error is not None:
        raise PeerError(error)
    return result


def wrap(d: Dist, model, lora: bool):
    """The module the training forward goes through. One process: the text model itself. LoRA:
    DistributedDataParallel around the text model, syncing only the adapters (the frozen base and
    the buffers are identical on every process and never communicated). Full fine-tuning: FSDP2,
    each decoder layer sharded on its own, then the text model (embeddings, tied to the output);
    float32 sharded master weights computing in the model's low precision with float32 gradient
    reduction (MixedPrecisionPolicy). A per-layer table kept on the CPU stays there, unsharded and
    frozen."""
    body = model.model
    if not d.on:
        return body
    if lora:
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(body, frozen + [n for n, _ in body.named_buffers()])  # no sync
        return DDP(
            body,
            device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=False,
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = model.dtype
    table = body.embed_tokens_per_layer.weight
    ignored = {table} if not table.requires_grad else None
    mp = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute, reduce_dtype=torch.float32)
    mesh = init_device_mesh(d.device.type, (d.world,))
    for module in [*body.layers, body]:  # one layer at a time holds a full float32 copy
        for p in module.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if module is body:  # the root keeps its (tied) embedding gathered from forward to backward
            fully_shard(body, mesh=mesh, mp_policy=mp, ignored_params=ignored, reshard_after_forward=False)
        else:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    d.fsdp = True
    return body


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (FSDP: gathered from every process; all must call this)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_state(d: Dist, model) -> dict | None:
    """The trainable weights as full CPU tensors by name, on process 0 (None elsewhere). Under FSDP
    every process takes part in gathering them, one tensor at a time."""
    state = {}
    for n, p in model.named_parameters():
        if p.requires_grad and (d.fsdp or d.main):
            full = _full(p.detach())
            if d.main:
                state[n] = full.cpu().clone()
    return state if d.main else None


def load_model_state(d: Dist, model, state: dict, where: str) -> None:
    """Put saved trainable weights back (FSDP: each process keeps its shard of them), checking that
    they belong to this model and method."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        name = (unexpected or missing)[0]
        raise PeerError(
            f"{where}: {'has a weight' if unexpected else 'lacks the weight'} {name!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected): a checkpoint of another model or method"
        )
    for n, t in state.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise PeerError(
                f"{where}: {n} has shape {tuple(t.shape)} but the model's is {tuple(params[n].shape)}: "
                "a checkpoint of another model"
            )
    with torch.no_grad():
        for n, t in state.items():
            p = params[n]
            if hasattr(p, "device_mesh"):  # a DTensor: cut this process's shard locally (no communication)
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(t)


def optimizer_state(d: Dist, model, opt) -> dict | None:
    """The optimizer state keyed by parameter name (full tensors), on process 0: the same layout
    whatever the number of processes, so a run resumes on another number of devices."""
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
        return full if d.main else None
    if not d.main:
        return None
    names = trainable_names(model)
    state = opt.state_dict()
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state(d: Dist, model, opt, state: dict) -> None:
    groups = state["param_groups"]
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
        opt.load_state_dict(state)  # a checkpoint written before states were keyed by name
        return
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=_options())
        return
    index = {n: i for i, n in enumerate(trainable_names(model))}
    opt.load_state_dict(
        {
            "state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
        }
    )


def gathered_model(d: Dist, model):
    """A model holding the full weights on process 0 (to write the merged checkpoint): the model
    itself unless sharded; under FSDP a CPU copy built from the gathered weights (None elsewhere)."""
    if not d.fsdp:
        return model if d.main else None
    full = {}
    for n, t in model.state_dict().items():  # every process gathers, one tensor at a time
        t = _full(t.detach())
        if d.main:
            full[n] = t.cpu()
    if not d.main:
        return None
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(full, strict=False, assign=True)
    return copy
