"""SAMI training on several processes: data parallel (DDP) or sharded (FSDP2), with torch.distributed doing the work.

Launched by ``torchrun`` (``python -m torch.distributed.run``), one process per
device; the process group comes from torchrun's environment (gloo on CPU, nccl
on CUDA). ``Parallel`` is what a process needs to know and do:

- ``"ddp"``: the model is replicated; its ``PairScorer`` is wrapped in
  ``DistributedDataParallel``, so the backward that syncs all-reduces (averages)
  the gradients; gradient caching's other chunks run under ``no_sync()``.
- ``"fsdp"``: every decoder layer and the ``PairScorer`` root are sharded with
  ``fully_shard`` (``shard``); all forwards run through the root, whose hooks
  unshard the embeddings and the LM head that scoring reads directly.
- ``"none"``: one process, nothing wrapped (what a plain ``python`` run does).

Every rank takes its share of each optimiser step's queries and of the queries
to generate for (``share``); generations are gathered so that every rank holds
the same examples (``generate``). Checkpoints hold full (unsharded) tensors in the
single-process format, so a checkpoint loads whatever the number of processes
that wrote or reads it; rank 0 writes, every rank reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from sami_fast.prefix import PairScorer

MODES = ("auto", "none", "ddp", "fsdp")


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 outside torchrun).

    Raises:
        ValueError: ``WORLD_SIZE`` is set but not an int.
    """
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int (torchrun sets it), got {value!r}") from None


def resolve_mode(mode: str) -> str:
    """``"auto"``: ``"ddp"`` when torchrun started more than one process, else ``"none"``; other modes as given.

    Args:
        mode: one of ``MODES``: ``"auto"``, ``"none"``, ``"ddp"``, ``"fsdp"``.

    Returns:
        ``"none"``, ``"ddp"`` or ``"fsdp"``.

    Raises:
        ValueError: ``mode`` not in ``MODES``; ``"none"`` when torchrun started several
            processes (each would train the whole run alone); ``"ddp"``/``"fsdp"`` outside
            torchrun (no ``RANK``) with no process group initialised; a bad ``WORLD_SIZE``.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    world = launched_world_size()
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"distributed='none' but torchrun started WORLD_SIZE={world} processes: every one would "
                         "train the whole run alone and write the same files; use 'ddp' or 'fsdp' (or 'auto')")
    if mode != "none" and "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"distributed={mode!r} needs the processes torchrun starts (RANK, WORLD_SIZE, MASTER_ADDR, "
                         "MASTER_PORT): launch with `torchrun --nproc-per-node N ...`, or initialise the process "
                         "group first")
    return mode


def _full(tensor):
    """A DTensor gathered into an ordinary tensor (a collective: every rank calls it); anything else as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shard_like(value, like):
    """``value`` (a full tensor) cut into this rank's shard as the DTensor ``like`` is; anything else as is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and isinstance(value, torch.Tensor) and value.shape == like.shape:
        # Every rank holds the full value: each keeps its own piece, no communication.
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return value


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on every rank (one all-reduce; ``flag`` itself without a process group).

    Args:
        flag: this rank's answer.
        device: where the all-reduce's tensor lives (the process group's device: CUDA for nccl).

    Returns:
        the AND of every rank's ``flag``, the same on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gradient_norm(gradients: Iterable[torch.Tensor]) -> float:
    """The global 2-norm of ``gradients`` (one fused reduction; sharded DTensor gradients are reduced across ranks).

    Args:
        gradients: the gradient tensors (ordinary tensors or DTensor shards).

    Returns:
        the 2-norm of all of them together, as a float (not finite when an entry holds a NaN or inf).
    """
    return float(_full(torch.nn.utils.get_total_norm(gradients, foreach=True)))


def shard(model: torch.nn.Module, mesh: torch.distributed.device_mesh.DeviceMesh) -> PairScorer:
    """FSDP2 for ``model``: each decoder layer (the classes of ``model._no_split_modules``) its own ``fully_shard``
    unit, the ``PairScorer`` root holding the rest (embeddings, final norm, LM head; everything when the model
    names no such class).

    The root reshards after every forward, so a forward without a backward (the
    no-grad pass of gradient caching, generation) leaves no unsharded parameter
    behind. ``scorer.run(fn)`` is registered as a forward method: ``fn(model)``
    (generation) runs with the root's parameters unsharded, and transformers'
    ``generate`` keeps the ranks in step (``synced_gpus``) as it does for models
    it shards itself.

    Args:
        model: a transformers causal LM (its ``_no_split_modules`` name the decoder layer classes).
        mesh: the device mesh to shard over (``Parallel.wrap``: 1-D, every rank).

    Returns:
        the sharded ``PairScorer``; ``model``'s parameters are now DTensor shards.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    scorer = PairScorer(model)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(scorer, mesh=mesh, reshard_after_forward=True)
    register_fsdp_forward_method(scorer, "run")
    model._is_fsdp_managed_module = True  # transformers' marker: generate() then passes synced_gpus=True
    return scorer


class Parallel:
    """This process's part in a run: its rank, the device it uses, how the model is wrapped.

    Arguments:
        mode: ``"none"``, ``"ddp"`` or ``"fsdp"`` (``resolve_mode`` turns ``"auto"``
            into one of them). Other modes initialise the process group from
            torchrun's environment unless it already is (gloo on CPU, nccl on CUDA,
            device ``cuda:LOCAL_RANK``).

    Attributes:
        mode: as given.
        rank, world_size: this process's rank and the number of processes (0 and 1 for ``"none"``).
        device: the device this process uses when CUDA is available: ``cuda`` for ``"none"``,
            else ``cuda:LOCAL_RANK``; the CPU otherwise.

    Raises:
        ValueError: ``mode`` is not one of ``"none"``, ``"ddp"``, ``"fsdp"``.
    """

    def __init__(self, mode: str):
        if mode not in MODES[1:]:
            raise ValueError(f"mode must be one of {', '.join(MODES[1:])}, got {mode!r}")
        self.mode = mode
        if mode == "none":
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def check_step_size(self, queries_per_step: int) -> None:
        """Every rank needs at least one query of each optimiser step (it must take part in the gradient reduction).

        Args:
            queries_per_step: batch_size x gradient_accumulation_steps.

        Raises:
            ValueError: fewer queries per step than processes.
        """
        if queries_per_step < self.world_size:
            raise ValueError(
                f"batch_size x gradient_accumulation_steps = {queries_per_step} queries per optimiser step, fewer "
                f"than the {self.world_size} processes: each needs at least one; raise batch_size or "
                "gradient_accumulation_steps, or run fewer processes")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module every forward runs through: a ``PairScorer`` of ``model``, in DDP or sharded under FSDP2.

        Args:
            model: the causal LM; under FSDP2 its parameters become shards (``shard``).

        Returns:
            the ``PairScorer`` (``"none"``), the ``PairScorer`` in ``DistributedDataParallel``
            (``"ddp"``, buffers not broadcast), or the sharded ``PairScorer`` root (``"fsdp"``).
        """
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            return shard(model, init_device_mesh(self.device.type, (self.world_size,)))
        scorer = PairScorer(model)
        if self.mode == "ddp":
            # broadcast_buffers=False: the buffers (rotary tables) are equal everywhere and never trained.
            return torch.nn.parallel.DistributedDataParallel(scorer, broadcast_buffers=False)
        return scorer

    def share(self, items: list, rank: int | None = None) -> list:
        """Rank ``rank``'s (default: this one's) contiguous share of ``items``; the first
        ``len % world_size`` take one more.

        Args:
            items: the list to split (a slice of it is returned).
            rank: the rank whose share to take; None (default): this process's.

        Returns:
            ``len(items) // world_size`` consecutive items, one more for the first
            ``len(items) % world_size`` ranks; the shares of ranks 0.. in order make ``items``.
        """
        rank = self.rank if rank is None else rank
        base, extra = divmod(len(items), self.world_size)
        start = rank * base + min(rank, extra)
        return items[start : start + base + (rank < extra)]

    def lockstep(self, chunk_counts: Callable[[int], list[int]]) -> list[int] | None:
        """The accumulate calls every rank makes under FSDP2, where each forward and backward is a collective.

        Arguments:
            chunk_counts: rank -> the number of chunks of each of that rank's calls (every rank
                computes every rank's: the step's queries are known to all).
        Returns:
            the chunks of each call, as many calls as the rank with most makes (a rank without
            that call makes a zero-weight one; one with fewer chunks pads); None outside FSDP2,
            where each rank makes its own calls.
        """
        if self.mode != "fsdp":
            return None
        counts = [chunk_counts(rank) for rank in range(self.world_size)]
        return [max(c[call] for c in counts if call < len(c)) for call in range(max(map(len, counts)))]

    def gradient_scale(self) -> int:
        """DDP and FSDP average the ranks' gradients: each rank's gradient times this makes the average their sum."""
        return self.world_size

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (any picklable objects) concatenated in rank order, on every rank.

        Args:
            items: this rank's objects (a collective: every rank calls it).

        Returns:
            a new list: rank 0's items, then rank 1's, ...
        """
        if self.world_size == 1:
            return list(items)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, list(items))
        return [item for part in gathered for item in part]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` (name -> number) summed over the ranks (float64), on every rank.

        Args:
            values: name -> number; every rank passes the same names (a collective).

        Returns:
            a new dict: name -> the sum over the ranks as a float (in one process: a copy of ``values``).
        """
        if self.world_size == 1:
            return dict(values)
        names = sorted(values)
        total = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(names, total.tolist()))

    def barrier(self) -> None:
        """Wait until every rank reaches this point (nothing to wait for in one process)."""
        if self.world_size > 1:
            dist.barrier()

    def generate(self, scorer: torch.nn.Module, generate: Callable[[list], list], prompts: list,
                 group: int) -> list:
        """``generate(prompts)`` with the work split across ranks; every rank gets every generation.

        Arguments:
            scorer: the module ``wrap`` returned (under FSDP2 ``generate`` runs through its ``run``).
            generate: prompts -> one ``Generation`` per prompt (e.g. a ``ResponseGenerator`` through
                ``run_generator``, in batches).
            prompts: ``group`` consecutive prompts per query (a query's prompts stay on one rank).
            group: the prompts per query (C).
        Returns:
            one ``Generation`` per prompt, in order.
        """
        if self.world_size == 1:
            return generate(prompts)
        queries = self.share([prompts[i : i + group] for i in range(0, len(prompts), group)])
        mine = [prompt for query in queries for prompt in query]
        if self.rank:  # sampling: each rank its own stream (rank 0 the one a single process draws)
            torch.manual_seed(torch.initial_seed() + self.rank)
        if self.mode == "fsdp":
            # Sharded layers all-gather in every forward, so every rank makes the same generate
            # calls: each pads its share to the largest with copies of the first prompt.
            most_queries = -(-(len(prompts) // group) // self.world_size)
            padded = mine + [prompts[0]] * (most_queries * group - len(mine))
            generated = scorer.run(lambda model: generate(padded))[: len(mine)]
        else:
            generated = generate(mine) if mine else []
        return self.gather(generated)

    # ------------------------------------------------------------------ checkpoints: full tensors, any world size

    def model_state(self, model: torch.nn.Module) -> dict:
        """``model``'s full state dict on rank 0 (under FSDP2 gathered to the CPU; other ranks get ``{}``).

        Args:
            model: the model ``wrap`` was given (under FSDP2 a collective: every rank calls it).

        Returns:
            ``model.state_dict()`` outside FSDP2 (on every rank); under FSDP2 the full
            tensors on the CPU on rank 0, ``{}`` on the other ranks.
        """
        if self.mode != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: torch.nn.Module, state: dict) -> None:
        """Load a full state dict (every rank holds it) into ``model``, each rank keeping its shard under FSDP2.

        Args:
            model: the model ``wrap`` was given.
            state: full (unsharded) tensors in the single-process format (``model_state``'s).
        """
        if self.mode != "fsdp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with every sharded tensor gathered: the single-process format.

        By hand rather than ``get_optimizer_state_dict``: the optimizer may step fp32
        master copies, which are no parameters of the model.

        Args:
            optimizer: the run's optimizer (under FSDP2 a collective: every rank calls it).

        Returns:
            ``optimizer.state_dict()`` as is outside FSDP2; under FSDP2 with each state tensor
            gathered in full onto the CPU, on every rank.
        """
        state = optimizer.state_dict()
        if self.mode != "fsdp":
            return state
        gathered = {index: {key: _full(value).cpu() if isinstance(value, torch.Tensor) else value
                            for key, value in entry.items()} for index, entry in state["state"].items()}
        return {**state, "state": gathered}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load ``optimizer_state``'s format; under FSDP2 each rank keeps the shards of its parameters.

        Args:
            optimizer: the run's optimizer, over the same parameters (in the same order) as the saved one.
            state: what ``optimizer_state`` returned (every rank holds it).
        """
        if self.mode == "fsdp":
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            state = {**state, "state": {index: {key: _shard_like(value, parameters[index])
                                                for key, value in entry.items()}
                                        for index, entry in state["state"].items()}}
        optimizer.load_state_dict(state)

    def master_state(self, master) -> dict | None:
        """``MasterWeights.state_dict()`` with sharded copies gathered (None without master weights).

        Args:
            master: a ``sami_fast.trainer.MasterWeights``, or None (under FSDP2 a collective:
                every rank calls it).

        Returns:
            ``{"master": tensors}`` (under FSDP2 full tensors on the CPU, on every rank), or None.
        """
        if master is None:
            return None
        state = master.state_dict()
        return {**state, "master": [_full(m).cpu() if self.mode == "fsdp" else m for m in state["master"]]}

    def load_master_state(self, master, state: dict) -> None:
        """Load ``master_state``'s format into ``master``; under FSDP2 each rank keeps its shards.

        Args:
            master: a ``sami_fast.trainer.MasterWeights``.
            state: what ``master_state`` returned (every rank holds it).

        Raises:
            ValueError: ``state`` holds another number of tensors than ``master`` has copies.
        """
        if self.mode == "fsdp":
            state = {**state, "master": [_shard_like(saved, m) for saved, m in zip(state["master"],
                                                                                 master.parameters(), strict=True)]}
        master.load_state_dict(state)

    def rng_states(self, local: dict) -> list[dict] | None:
        """Every rank's RNG states (``local`` on each), for a checkpoint; None in a single process.

        Args:
            local: this rank's RNG states (a collective with several processes: every rank calls it).

        Returns:
            the ranks' ``local`` in rank order, or None in a single process.
        """
        return self.gather([local]) if self.world_size > 1 else None

    def own_rng_states(self, checkpoint: dict) -> dict:
        """This rank's RNG states from a checkpoint: its own when the world size matches, else rank 0's.

        Args:
            checkpoint: a checkpoint's state: ``"rng"`` (rank 0's states) and ``"rank_rng"``
                (``rng_states``' list, or None).

        Returns:
            ``checkpoint["rank_rng"][rank]`` when that list has one entry per rank, else ``checkpoint["rng"]``.
        """
        saved = checkpoint.get("rank_rng")
        return saved[self.rank] if saved is not None and len(saved) == self.world_size else checkpoint["rng"]
