"""Distributed training on torch.distributed: process groups from torchrun, a hand-written FSDP (ZeRO-3) over
the model's blocks, PyTorch's FSDP2 over the same units as the yardstick, global-norm clipping, and sharded /
full checkpoints.

Hand-written FSDP: each unit (a ViT block, a decoder layer, and the root = everything else) keeps its
parameters as one flat fp32 shard per rank (`FlatParam`). The full parameters exist only while the unit runs:
all-gathered in the compute dtype before its forward (the next unit's gather is prefetched), freed after it,
gathered again when backward reaches the unit, and freed once its gradient is reduce-scattered into the fp32
shard's `.grad`. The optimizer sees only the shards. Gradients are the mean over ranks (SUM, then divided by
the world size: ReduceOp.AVG is missing on Ascend HCCL), so a rank's loss should be its loss-token sum over
the global count / world_size; then N ranks reproduce one process on the same global batch.

Usage (train.py):
    dist = init_distributed(device_type)
    model = shard_model(model, dist, mode="ours", group_of=lambda name, p: ...)  # after freezing
    optimizer = torch.optim.AdamW(groups of the trainable shards by p.fsdp_group, ...)
    loss, stats = model(batch, loss_divisor=global_loss_tokens / dist.world_size); loss.backward()
    clip_grad_norm_(model.parameters(), 1.0, dist); optimizer.step()
    save_sharded(model, optimizer, dist, dir); state = gather_full_state_dict(model, dist)  # rank 0
Every rank must run the same units in the same order (collectives pair up by order): MLLM.forward runs the
ViT and connector on a blank image when a training micro-batch has none, so the data cannot break this. A
sharded model runs `forward` only (not `generate`); evaluation loads the full checkpoint in one process.

Expert parallelism (`shard_experts`, before `shard_model`): W ranks form groups of E neighbours; each group
splits every MoE layer's routed experts and exchanges token rows with all_to_all. Without FSDP the rest stays
replicated (`all_reduce_grads` after backward, `clip_grad_norm_(..., replicated=True)`); with our FSDP (as
torchtitan and MindSpeed-MM compose them) the rest is sharded over all W ranks and each expert slice over its
W/E replicas, one per group.

Context parallelism (`shard_context`, --cp C): groups of C neighbouring ranks share one packed micro-batch;
MLLM.forward keeps this rank's contiguous share of the tokens (`split_sequence`) and decoder attention trades
tokens for heads with all-to-alls around the kernel (DeepSpeed-Ulysses). Each rank's loss is still its token
sum over the global count / W, so the gradient mean over all W ranks is one process's gradient.
"""
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._pytree import tree_flatten, tree_map

from common import replaced
from kernels import resolve_device
from model import MoE

# torch 2.13 renamed the flat collectives; torch_npu pins older torch releases that have only the old names
_all_gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
_reduce_scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor

# ----------------------------------------------------------------------------- process groups

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_type):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment); without those variables this is one process and no group is created."""
    device_type = resolve_device(device_type)  # checks it exists; imports torch_npu for "npu"
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device(device_type))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if device_type == "cpu" else torch.device(device_type, local_rank)
    if device_type != "cpu":
        getattr(torch, device_type).set_device(device)
    # device_id binds the group to this rank's accelerator (required by HCCL, eager init for NCCL)
    tdist.init_process_group(BACKENDS[device_type], rank=rank, world_size=world_size,
                             device_id=None if device_type == "cpu" else device)
    return Dist(rank, world_size, local_rank, device)


@dataclass(eq=False)
class Group:
    """Ranks that shard or exchange something together: the torch.distributed group (None = all ranks), this
    rank's index in it and its size."""
    handle: object
    rank: int
    size: int


@dataclass(eq=False)  # hashed by identity: FSDP groups parameters by their layout
class ExpertLayout:
    """Expert parallelism over W ranks in groups of E (ranks gE .. gE+E-1): `ep` is this rank's group, whose
    members split the routed experts; `replicas` the W/E ranks holding the same expert slice, one per group."""
    ep: Group
    replicas: Group


def barrier(dist):
    if dist.world_size > 1:
        tdist.barrier()


def close_distributed(dist=None):
    """Leave the process group (after a barrier, so no rank exits while another still talks to it)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def all_gather_object(obj, dist):
    """Every rank's picklable `obj`, in rank order (a list of one without a process group)."""
    if dist.world_size == 1:
        return [obj]
    objs = [None] * dist.world_size
    tdist.all_gather_object(objs, obj)
    return objs


def all_reduce_sum(tensor, dist):
    """Sum `tensor` over ranks in place (and return it)."""
    if dist.world_size > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------- hand-written FSDP (ZeRO-3)


def fsdp_units(model):
    """The sharding units: each ViT block, each decoder layer, then the root (embeddings, head, connector,
    norms: the parameters of `model` outside the blocks)."""
    return [*model.vision.blocks, *model.decoder.layers, model]


class FlatParam:
    """Parameters of one unit that share requires_grad and optimizer group, as one flat fp32 tensor padded to a
    multiple of the world size; this rank owns the slice `shard` (an nn.Parameter, tagged `.fsdp_group`).
    `full` is the gathered flat tensor in the compute dtype; its storage is allocated only while the unit
    runs, and the module attributes of the original parameters are views into it then (meta placeholders
    otherwise, so a stray use fails loudly instead of reading freed memory)."""

    def __init__(self, entries, dist, compute_dtype, requires_grad, group, experts=None):
        # entries: (name, parameter, [(module, attribute), ...]) - a tied parameter has several places;
        # experts: the ExpertLayout when these are an expert slice, sharded over its replicas instead of all ranks
        self.dist, self.compute_dtype, self.experts = dist, compute_dtype, experts
        self.shards = experts.replicas if experts else Group(None, dist.rank, dist.world_size)
        self.names = [name for name, _, _ in entries]
        self.shapes = [p.shape for _, p, _ in entries]
        self.places = [places for _, _, places in entries]
        self.numels = [p.numel() for _, p, _ in entries]
        total = sum(self.numels)
        self.shard_numel = -(-total // self.shards.size)
        self.padding = self.shard_numel * self.shards.size - total
        flat = torch.cat([p.detach().reshape(-1).float() for _, p, _ in entries])
        flat = torch.cat([flat, flat.new_zeros(self.padding)]).to(dist.device)
        own = flat[self.shards.rank * self.shard_numel:(self.shards.rank + 1) * self.shard_numel]
        self.shard = nn.Parameter(own.clone(), requires_grad=requires_grad)
        self.shard.fsdp_group = group
        self.full = torch.empty(flat.numel(), dtype=compute_dtype, device=dist.device, requires_grad=requires_grad)
        self.full.untyped_storage().resize_(0)
        self.placeholders = [torch.empty(s, dtype=compute_dtype, device="meta") for s in self.shapes]
        self.gathering = None  # (work, send buffer) of an all-gather in flight
        self.ready = False
        for places in self.places:  # the original parameters go; model.parameters() yields the shards instead
            for module, attr in places:
                del module._parameters[attr]
        self._set_module_tensors(self.placeholders)

    def gather(self, async_op):
        """Start (or do) the all-gather of the shards into `full`, unless it is there or on its way."""
        if not self.ready and self.gathering is None:
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
            send = self.shard.detach().to(self.compute_dtype)
            # tensors autograd saved in forward alias `full`, so the refill must not bump its version counter;
            # gloo writes the output from its worker thread, later than a version-preserving context could
            # cover, so gather into `.data`: the same storage under a version counter of its own
            self.gathering = (_all_gather(self.full.data, send, group=self.shards.handle, async_op=True), send)
        if not async_op:
            self.wait()

    def wait(self):
        if self.gathering is not None:
            self.gathering[0].wait()
            self.gathering, self.ready = None, True

    def use_full(self):
        """Point the module attributes at views of the gathered flat tensor (through autograd, so the
        gradients of all views accumulate into `full.grad`)."""
        views = self.full.split([*self.numels, self.padding])
        self._set_module_tensors([v.view(s) for v, s in zip(views, self.shapes)])

    def free(self):
        self.wait()
        if self.ready:
            self.full.untyped_storage().resize_(0)
            self.ready = False
            self._set_module_tensors(self.placeholders)

    def reduce_grad(self):
        """Start the reduce-scatter of `full.grad` (summed over ranks, in fp32); returns (work, output, input)
        for `add_grad` once it is done."""
        grad = self.full.grad.float()
        self.full.grad = None
        out = grad.new_empty(self.shard_numel)
        return _reduce_scatter(out, grad, op=tdist.ReduceOp.SUM, group=self.shards.handle, async_op=True), out, grad

    def add_grad(self, reduced):
        # mean over all ranks, as DDP and FSDP2 do (an expert slice's replicas summed the tokens of all groups)
        reduced.div_(self.dist.world_size)
        if self.shard.grad is None:
            self.shard.grad = reduced
        else:
            self.shard.grad.add_(reduced)  # gradient accumulation over micro-batches

    def _set_module_tensors(self, tensors):
        for places, t in zip(self.places, tensors):
            for module, attr in places:
                setattr(module, attr, t)


class _PostBackward(torch.autograd.Function):
    """Identity on a frozen unit's inputs: its backward runs when the unit's input gradients are done, i.e.
    when the unit's backward has finished, which frees the unit's gathered parameters."""

    @staticmethod
    def forward(ctx, unit, *tensors):
        ctx.unit = unit
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.unit.free()
        return (None, *grads)


class Unit:
    """One sharded module: its FlatParams (trainable and/or frozen) and the hooks that gather and free them."""

    def __init__(self, module, flats, fsdp):
        self.module, self.flats, self.fsdp = module, flats, fsdp
        self.trainable = [f for f in flats if f.shard.requires_grad]
        self.in_backward = False
        self.reduced = 0  # trainable FlatParams whose gradient this backward has reduce-scattered
        for f in self.trainable:
            f.full.register_post_accumulate_grad_hook(lambda full, f=f: self._post_accumulate(f))
        module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        module.register_forward_hook(self._post_forward, with_kwargs=True)

    def gather(self, async_op=False):
        for f in self.flats:
            f.gather(async_op)

    def free(self):
        for f in self.flats:
            f.free()

    def _pre_forward(self, module, args, kwargs):
        self.gather()
        for f in self.flats:
            f.use_full()
        if self.in_backward:  # activation checkpointing recomputes this forward inside backward
            return None
        self.fsdp.record("forward", self)
        if not torch.is_grad_enabled() or self.trainable:
            return None
        is_input = lambda t: isinstance(t, torch.Tensor) and t.requires_grad
        inputs = [t for t in tree_flatten((args, kwargs))[0] if is_input(t)]
        if not inputs:
            return None
        wrapped = dict(zip(map(id, inputs), _PostBackward.apply(self, *inputs)))
        return tree_map(lambda t: wrapped.get(id(t), t) if is_input(t) else t, (args, kwargs))

    def _post_forward(self, module, args, kwargs, output):
        if self.in_backward:
            return None  # keep the parameters: the recomputed activations' backward runs next
        if module is self.fsdp.root:
            for unit in self.fsdp.units:  # prefetches the forward did not use
                unit.free()
        else:
            self.free()
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._pre_backward)
        return None

    def _pre_backward(self, grad):
        if not self.in_backward:
            self.in_backward = True
            self.fsdp.record("backward", self)
            self.gather()
        return None

    def _post_accumulate(self, flat):
        self.fsdp.finish_reductions()  # one reduce-scatter in flight: overlap without holding every full grad
        self.fsdp.reducing.append((flat, *flat.reduce_grad()))
        self.reduced += 1
        if self.reduced == len(self.trainable):
            self.free()


class FSDP:
    """The sharded model's state: units, and the order they ran in last time, which drives prefetching."""

    def __init__(self, model, dist, compute_dtype, group_of):
        self.root = model
        names = {id(p): n for n, p in model.named_parameters()}  # a tied parameter keeps its first name
        places = {}
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    places.setdefault(id(p), []).append((module, attr))
        self.param_names = list(names.values())
        self.buffer_names = [n for n, _ in model.named_buffers()]
        blocks = fsdp_units(model)[:-1]
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        per_unit = [list(block.parameters()) for block in blocks]
        per_unit.append([p for p in model.parameters() if id(p) not in in_blocks])
        self.units = []
        for module, params in zip([*blocks, model], per_unit):
            kinds = {}  # (requires_grad, optimizer group, expert layout) -> entries, in parameter order
            for p in params:
                group = group_of(names[id(p)], p) if group_of else None
                kind = (p.requires_grad, group, getattr(p, "expert_parallel", None))
                kinds.setdefault(kind, []).append((names[id(p)], p, places[id(p)]))
            flats = [FlatParam(entries, dist, compute_dtype, *kind) for kind, entries in kinds.items()]
            for i, f in enumerate(flats):
                module.register_parameter(f"fsdp_flat_{i}", f.shard)
            self.units.append(Unit(module, flats, self))
        self.last = {"forward": [], "backward": []}
        self.current = {"forward": [], "backward": []}
        self.reducing = []  # reduce-scatters in flight: (FlatParam, work, output, input)

    def flats(self):
        return [f for unit in self.units for f in unit.flats]

    def record(self, kind, unit):
        """Note that `unit` runs now; if this pass follows the last one so far, prefetch the next unit."""
        if kind == "forward" and unit.module is self.root:
            self._new_pass("forward")
        if kind == "backward" and not self.current["backward"]:
            self._new_pass("backward")
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        current, last = self.current[kind], self.last[kind]
        i = len(current)
        current.append(unit)
        if i + 1 < len(last) and last[i] is unit:
            last[i + 1].gather(async_op=True)  # overlaps the next unit's all-gather with this unit's compute

    def _new_pass(self, kind):
        if self.current[kind]:
            self.last[kind] = self.current[kind]
        self.current[kind] = []

    def finish_reductions(self):
        for flat, work, out, _ in self.reducing:
            work.wait()
            flat.add_grad(out)
        self.reducing = []

    def _end_backward(self):
        """After the whole backward: finish the reduce-scatter, free what is still gathered (frozen units
        whose inputs needed no gradient), and reset for the next step."""
        self.finish_reductions()
        for unit in self.units:
            unit.free()
            unit.in_backward, unit.reduced = False, 0
        self._new_pass("backward")


def shard_model(model, dist, mode="ours", compute_dtype=torch.float32, group_of=None):
    """Shard `model` (ZeRO-3) over the ranks of the default process group, in place; returns it. Freeze what
    should not train first: frozen parameters get shards without gradients and are never reduced.
    mode "ours" = the hand-written FSDP above; "torch" = PyTorch's FSDP2 (fully_shard) over the same units.
    Afterwards, model.parameters() are the local shards (flat fp32 tensors for "ours", DTensors for "torch").
    group_of(name, param) -> hashable (ours): parameters with different values go to different flat shards,
    each tagged `shard.fsdp_group = value`, so an optimizer can still give them their own lr / weight decay
    (FSDP2 keeps one DTensor per parameter under its name, so name-based grouping works there as before)."""
    if not tdist.is_initialized():
        raise RuntimeError("shard_model needs a process group: run under torchrun (see init_distributed)")
    if mode == "ours":
        model.fsdp = FSDP(model, dist, compute_dtype, group_of)
        return model.to(dist.device)  # buffers; the shards are there already
    if mode == "torch":
        if any(getattr(p, "expert_parallel", None) for p in model.parameters()):
            raise ValueError("shard_model: expert parallelism composes with mode 'ours' only")
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        return model
    raise ValueError(f"shard_model: mode {mode!r}; choose 'ours' or 'torch'")


# ----------------------------------------------------------------------------- expert parallelism


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows: `send_splits[r]` rows go to rank r, `recv_splits[r]` rows come from it. Its
    gradient is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        tdist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty(sum(send_splits), *grad.shape[1:])
        tdist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


class _AllReduce(torch.autograd.Function):
    """all_reduce (sum) over a group. Each rank's loss used the sum, so the gradient of any rank's input is
    the sum of the ranks' output gradients: the same all_reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tdist.all_reduce(grad, group=ctx.group)
        return grad, None


def expert_dispatch(x, counts, experts, group):
    """Rows `x` sorted by (global) expert, `counts` [E] rows per expert: send each row to the rank of `group`
    (the expert-parallel Group) owning its expert, run `experts` (this rank's E/N experts, grouped matmul) on
    what arrives, send the results back. Returns the result rows in x's order."""
    n = group.size
    counts = counts.view(n, -1)  # [destination rank, its local expert]
    received = torch.empty_like(counts)
    tdist.all_to_all_single(received, counts, group=group.handle)  # received[s, e]: rows s sends our expert e
    send, recv = counts.sum(1).tolist(), received.sum(1).tolist()
    rows = _AllToAll.apply(x, send, recv, group.handle)  # sorted by (source rank, local expert)
    segment = torch.repeat_interleave(torch.arange(received.numel(), device=x.device), received.flatten())
    by_expert = (segment % received.shape[1] * n + segment // received.shape[1]).argsort(stable=True)
    y = experts(rows[by_expert], received.sum(0))  # grouped matmul wants rows sorted by local expert
    return _AllToAll.apply(y[by_expert.argsort()], recv, send, group.handle)


def shard_experts(model, dist, ep=None):
    """Expert parallelism in groups of `ep` ranks (default: all), in place; returns the model. Rank r keeps
    routed experts [e E/ep, (e+1) E/ep) of every MoE layer, e = r mod ep (parameters tagged `expert_parallel`
    with the ExpertLayout); the tokens reach them through all_to_all in their group (MoE.expert_dispatch).
    Everything else stays replicated (all_reduce_grads) or is sharded by shard_model afterwards. Expert
    gradients are summed over the slice's replicas and divided by the world size N like the rest (each expert
    sees the tokens of its group's ranks, whose losses are each divided by global tokens / N)."""
    if not tdist.is_initialized():
        raise RuntimeError("shard_experts needs a process group: run under torchrun (see init_distributed)")
    ep = ep or dist.world_size
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("shard_experts: the model has no MoE layers (n_routed_experts = 0)")
    if dist.world_size % ep:
        raise ValueError(f"shard_experts: {dist.world_size} ranks do not form groups of {ep}")
    mesh = init_device_mesh(dist.device.type, (dist.world_size // ep, ep), mesh_dim_names=("replicas", "ep"))
    layout = ExpertLayout(Group(mesh.get_group("ep"), dist.rank % ep, ep),
                          Group(mesh.get_group("replicas"), dist.rank // ep, dist.world_size // ep))
    for m in moes:
        n_experts = m.gate_up_proj.shape[0]
        if n_experts % ep:
            raise ValueError(f"shard_experts: {n_experts} routed experts do not split over {ep} ranks")
        m.gate_up_proj, m.down_proj = (expert_shard(p, layout) for p in (m.gate_up_proj, m.down_proj))
        m.expert_dispatch = partial(expert_dispatch, group=layout.ep)
    return model


def expert_shard(full, layout):
    """This rank's routed experts of a stacked expert weight [E, ...] as a parameter of its own, tagged with the
    layout (`expert_parallel`: gradient reduction, FSDP and checkpoints treat the tagged parameters apart)."""
    own = nn.Parameter(_own_experts(full.detach(), layout).clone(), requires_grad=full.requires_grad)
    own.expert_parallel = layout
    return own


def all_reduce_grads(model, dist):
    """After backward on a data-parallel (not FSDP) model: gradients become the mean over ranks (SUM / N),
    an expert slice's summed over its replicas only (see shard_experts). A trainable parameter without a
    gradient on this rank counts as zero, so every rank issues the same all-reduces."""
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            layout = getattr(p, "expert_parallel", None)
            if layout is None:
                all_reduce_sum(p.grad, dist)
            elif layout.replicas.size > 1:
                tdist.all_reduce(p.grad, group=layout.replicas.handle)
            p.grad.div_(dist.world_size)


def is_sharded(model):
    """Whether this rank holds only part of the model (FSDP or expert parallelism), i.e. its optimizer state
    is per rank; otherwise every rank holds the same replica (plain data parallelism)."""
    return hasattr(model, "fsdp") or any(isinstance(p, DTensor) or getattr(p, "expert_parallel", False)
                                         for p in model.parameters())


def memory_plan(model, world_size, ep=1, fsdp=True, compute_bytes=4):
    """Bytes one rank holds in a layout, from a model built on the meta device (nothing is allocated): fp32
    parameters, fp32 gradients and AdamW's two fp32 moments, every parameter trained (stages 2 and 3); under
    FSDP also the gathered compute-dtype copies at the forward's peak (the root unit and the two largest
    blocks: the running one and the prefetched one)."""
    experts = {id(p) for m in model.modules() if isinstance(m, MoE) for p in (m.gate_up_proj, m.down_proj)}
    unsharded = lambda params: sum(p.numel() / (ep if id(p) in experts else 1) for p in params)  # noqa: E731
    n_experts = sum(p.numel() for p in model.parameters() if id(p) in experts)
    n_rest = sum(p.numel() for p in model.parameters()) - n_experts
    held = (n_rest + n_experts) / world_size if fsdp else n_rest + n_experts / ep
    blocks = [unsharded(u.parameters()) for u in fsdp_units(model)[:-1]]
    root = unsharded(model.parameters()) - sum(blocks)
    return {"parameters": 4 * held, "gradients": 4 * held, "optimizer": 8 * held,
            "gathered": compute_bytes * (root + 2 * max(blocks)) if fsdp else 0}


# ----------------------------------------------------------------------------- context parallelism (Ulysses)


@dataclass
class SequenceSplit:
    """One packed micro-batch's tokens over a context-parallel group: rank r holds the contiguous tokens
    bounds[r]:bounds[r+1] everywhere but in attention, where all-to-alls trade tokens for heads
    (DeepSpeed-Ulysses, arXiv 2309.14509): each rank then attends over the whole stream for H/N heads."""
    group: Group
    bounds: list

    @property
    def lo(self):
        return self.bounds[self.group.rank]

    @property
    def hi(self):
        return self.bounds[self.group.rank + 1]

    @property
    def counts(self):
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def to_heads(self, x):
        """[this rank's tokens, H, d] -> [all tokens in order, H/N, d]: head block j goes to rank j."""
        n, t = self.group.size, x.shape[0]
        send = x.unflatten(1, (n, -1)).transpose(0, 1).flatten(0, 1)
        return _AllToAll.apply(send, [t] * n, self.counts, self.group.handle)

    def to_tokens(self, x):
        """The inverse of to_heads: [all tokens, H/N, d] -> [this rank's tokens, H, d]."""
        n, t = self.group.size, self.hi - self.lo
        back = _AllToAll.apply(x, self.counts, [t] * n, self.group.handle)
        return back.unflatten(0, (n, t)).transpose(0, 1).flatten(1, 2)

    def all_reduce(self, x):
        """The sum over the group, with autograd (its gradient is the sum of the ranks' gradients)."""
        return _AllReduce.apply(x, self.group.handle)


def split_sequence(n_tokens, group):
    """Equal contiguous shares of a micro-batch's tokens. Ulysses attends over whole sequences per head, so
    a causal mask loads every rank alike and needs no zig-zag order; the rest of a layer costs per token."""
    return SequenceSplit(group, [r * n_tokens // group.size for r in range(group.size + 1)])


def check_context_parallel(config, cp):
    """One line saying why the decoder's heads do not split over `cp` ranks, or None."""
    t = config.text
    kv = t.num_heads if t.attention == "mla" else t.num_kv_heads  # MLA expands its keys to every head
    if t.num_heads % cp or kv % cp:
        return (f"the decoder's {t.num_heads} query / {kv} key-value heads do not split over {cp} ranks "
                "(Ulysses gives each rank whole heads)")
    return None


def shard_context(model, dist, cp):
    """Context parallelism over groups of `cp` neighbouring ranks (ranks = dp x cp, rank = dp_rank * cp +
    cp_rank), in place; returns the model. Each group shares one packed micro-batch: MLLM.forward keeps this
    rank's tokens (split_sequence) and the decoder's attention trades tokens for heads around the kernel.
    The ViT and connector are replicated in the group (every rank encodes all the micro-batch's images)."""
    error = check_context_parallel(model.config, cp)
    if error:
        raise ValueError(error)
    if not tdist.is_initialized():
        raise RuntimeError("shard_context needs a process group: run under torchrun (see init_distributed)")
    if dist.world_size % cp:
        raise ValueError(f"shard_context: {dist.world_size} ranks do not form groups of {cp}")
    mesh = init_device_mesh(dist.device.type, (dist.world_size // cp, cp), mesh_dim_names=("dp", "cp"))
    model.split_sequence = partial(split_sequence, group=Group(mesh.get_group("cp"), dist.rank % cp, cp))
    return model


# ----------------------------------------------------------------------------- clipping and checkpoints


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(params, max_norm, dist, replicated=False):
    """Scale the gradients so their global L2 norm (over all ranks' shards) is at most max_norm, as
    torch.nn.utils.clip_grad_norm_ does for one process. Returns the norm before clipping.
    replicated=True (data parallel without FSDP): only expert-parallel parameters are shards (each held by
    its replicas), the others are the same on every rank and count once."""
    if dist.world_size == 1 and replicated:  # one process, whole model: torch's own (parallel's sum of squares
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # differs from it by 1e-5 on CPU: measured)
    params = [p for p in params if p.grad is not None]
    grads = [_local(p.grad) for p in params]
    squares = torch.zeros((), dtype=torch.float32, device=dist.device)
    same_squares = torch.zeros((), dtype=torch.float32, device=dist.device)
    for p, g in zip(params, grads):
        layout = getattr(p, "expert_parallel", None)
        if replicated and layout is None:
            same_squares += g.float().pow(2).sum()
        else:
            squares += g.float().pow(2).sum() / (layout.replicas.size if replicated else 1)
    total_norm = (all_reduce_sum(squares, dist) + same_squares).sqrt()
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total_norm


def gather_full_state_dict(model, dist):
    """The full unsharded weights under our key names (a tied weight once, under its first name) as CPU
    tensors on rank 0 ({} on the others); every rank must call it."""
    if not hasattr(model, "fsdp"):
        out = {}
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            full = t.full_tensor() if isinstance(t, DTensor) else t  # DTensor: gathers, so every rank runs it
            if getattr(t, "expert_parallel", None):
                full = _all_experts(t.detach(), t.expert_parallel)
            if dist.is_main:
                out[name] = full.detach().cpu().clone()
        return out
    out = {}
    for flat in model.fsdp.flats():
        full = flat.shard.new_empty(flat.shard_numel * flat.shards.size)
        _all_gather(full, flat.shard.detach(), group=flat.shards.handle)
        for name, shape, piece in zip(flat.names, flat.shapes, full.split([*flat.numels, flat.padding])):
            piece = _all_experts(piece.view(shape), flat.experts) if flat.experts else piece.view(shape)
            if dist.is_main:
                out[name] = piece.cpu().clone()
    if dist.is_main:
        out = {name: out[name] for name in model.fsdp.param_names}  # the unsharded model's order
        out.update({name: model.get_buffer(name).cpu().clone() for name in model.fsdp.buffer_names})
    return out


def _all_experts(t, layout):
    """An expert slice [E/ep, ...] -> all routed experts [E, ...], gathered over its expert-parallel group."""
    full = t.new_empty(t.shape[0] * layout.ep.size, *t.shape[1:])
    _all_gather(full, t.contiguous(), group=layout.ep.handle)
    return full


def _own_experts(t, layout):
    """All routed experts [E, ...] -> this rank's slice."""
    per_rank = t.shape[0] // layout.ep.size
    return t[layout.ep.rank * per_rank:(layout.ep.rank + 1) * per_rank]


def load_full_state_dict(model, state_dict, dist):
    """Load full weights (e.g. a model.safetensors written with any world size) into a sharded model: each
    rank keeps its slice. Missing or unexpected keys and wrong shapes raise."""
    all_experts = lambda shape, layout: (  # noqa: E731
        torch.Size([shape[0] * layout.ep.size, *shape[1:]]) if layout else shape)
    if hasattr(model, "fsdp"):
        expected = {**{n: all_experts(s, f.experts) for f in model.fsdp.flats() for n, s in zip(f.names, f.shapes)},
                    **{n: model.get_buffer(n).shape for n in model.fsdp.buffer_names}}
    else:
        expected = {n: all_experts(t.shape, getattr(t, "expert_parallel", None))
                    for n, t in [*model.named_parameters(), *model.named_buffers()]}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(f"load_full_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    for name, shape in expected.items():
        if state_dict[name].shape != shape:
            raise ValueError(f"load_full_state_dict: {name} has shape {tuple(state_dict[name].shape)}, "
                             f"model expects {tuple(shape)}")
    with torch.no_grad():
        if hasattr(model, "fsdp"):
            for f in model.fsdp.flats():
                own = lambda t: _own_experts(t, f.experts) if f.experts else t  # noqa: E731
                full = torch.cat([own(state_dict[n]).reshape(-1).float() for n in f.names] + [torch.zeros(f.padding)])
                f.shard.copy_(full[f.shards.rank * f.shard_numel:(f.shards.rank + 1) * f.shard_numel])
            for name in model.fsdp.buffer_names:
                model.get_buffer(name).copy_(state_dict[name])
        else:
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                src = state_dict[name].to(device=dist.device, dtype=t.dtype)
                if getattr(t, "expert_parallel", None):
                    src = _own_experts(src, t.expert_parallel)
                t.copy_(distribute_tensor(src, t.device_mesh, t.placements) if isinstance(t, DTensor) else src)


def _shard_path(directory, dist):
    return os.path.join(directory, f"shard_rank{dist.rank:05d}_of{dist.world_size:05d}.pt")


def save_sharded(model, optimizer, dist, directory, extra=None):
    """Each rank writes its parameter and optimizer shards (plus `extra`, e.g. its data-iterator state) for an
    exact resume with the same world size."""
    os.makedirs(directory, exist_ok=True)
    path = _shard_path(directory, dist)
    state = {"world_size": dist.world_size, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "extra": extra}
    with replaced(path) as tmp:
        torch.save(state, tmp)


def load_sharded(model, optimizer, dist, directory):
    """Restore what save_sharded wrote (same world size); returns its `extra`."""
    path = _shard_path(directory, dist)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard {path} for rank {dist.rank} of {dist.world_size}; on another world "
                                "size load the full model.safetensors (load_full_state_dict) instead")
    state = torch.load(path, map_location=dist.device, weights_only=False)  # our own file (DTensors in it)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["extra"]


def reshardable(model):
    """Whether load_resharded can restore this model's optimizer from another world size's shards."""
    return hasattr(model, "fsdp") and not any(f.experts for f in model.fsdp.flats())


def load_resharded(model, optimizer, dist, directory, saved_world_size):
    """Restore the optimizer state save_sharded wrote on `saved_world_size` ranks into our FSDP (without expert
    parallelism) on this world size: a flat shard's state is the same flat tensor cut at other places, so
    each rank joins the old slices and cuts its own. The weights come from the full model.safetensors."""
    if not reshardable(model):
        raise ValueError("load_resharded: only our FSDP without expert parallelism re-shards its optimizer state")
    old = [torch.load(os.path.join(directory, f"shard_rank{r:05d}_of{saved_world_size:05d}.pt"), map_location="cpu",
                      mmap=True, weights_only=False)["optimizer"] for r in range(saved_world_size)]  # our own files
    flat_of = {id(f.shard): f for f in model.fsdp.flats()}
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the index order of optimizer state
    state = {}
    for i, saved in old[0]["state"].items():
        f = flat_of[id(params[i])]
        state[i] = {}
        for key, value in saved.items():
            if value.dim() == 0:  # AdamW's step count, the same on every rank
                state[i][key] = value
                continue
            full = torch.cat([o["state"][i][key] for o in old])[:sum(f.numels)]
            full = torch.cat([full, full.new_zeros(f.padding)])
            state[i][key] = full[f.shards.rank * f.shard_numel:(f.shards.rank + 1) * f.shard_numel].clone()
    optimizer.load_state_dict({"state": state, "param_groups": old[0]["param_groups"]})
