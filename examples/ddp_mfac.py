"""Data-parallel training with MFAC's window sharded over the processes (torch.distributed).

Each process trains on its share of every batch (DistributedDataParallel averages the gradients),
and MFAC(..., process_group=...) keeps 1/world of every window row: the window's memory divides by
the number of processes, and a step sends one all-reduce of an m-vector and one all-gather of the
direction. Runs on CPU with gloo on scikit-learn's bundled digits, or on GPUs with NCCL:

    torchrun --nproc_per_node 2 examples/ddp_mfac.py            # CPU, 2 processes
    torchrun --nproc_per_node 8 examples/ddp_mfac.py --backend nccl   # one node of 8 GPUs

With ``--save DIR`` each process writes its own checkpoint (the optimizer's state dict with its shard
of the window, and under ``"run"`` the model, the step and the data position) into DIR at the end;
``--resume DIR`` continues such a run to ``--steps``, with the same number of processes, and ends
with the same model as a run that was never stopped:

    torchrun --nproc_per_node 2 examples/ddp_mfac.py --steps 150 --save run
    torchrun --nproc_per_node 2 examples/ddp_mfac.py --steps 300 --resume run --save run

Rank 0 prints one line per process, in rank order.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from mfac import MFAC, checkpoint
from mfac.data import load_digits
from mfac.training import accuracy


def checkpoint_path(folder: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"mfac-rank{rank}-of-{world}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=300, help="train until this step")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--save", default=None, help="folder for per-process checkpoints, written at the end")
    parser.add_argument("--resume", default=None, help="continue from the per-process checkpoints in this folder")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if args.backend == "nccl" else "cpu"
    split = load_digits(seed=0)
    torch.manual_seed(0)  # the same initial weights everywhere
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    model = nn.parallel.DistributedDataParallel(model)
    opt = MFAC(model.parameters(), lr=3e-3, window=args.window, damp=1e-2, momentum=0.9,
               process_group=dist.group.WORLD)
    generator = torch.Generator().manual_seed(0)  # the same batches everywhere; each process takes its slice
    start = 0
    if args.resume:
        path = checkpoint_path(args.resume, rank, world)
        found = torch.tensor([int(os.path.isfile(path))], device=device)
        dist.all_reduce(found)  # every process stops, or none does
        if int(found) != world:
            raise SystemExit(f"process {rank}: --resume {args.resume} needs mfac-rank<r>-of-{world}.pt for every one "
                             f"of the {world} processes (resume with the number of processes that saved it)")
        state = checkpoint.load(path)
        run = state.pop("run")
        model.module.load_state_dict(run["model"])
        opt.load_state_dict(state)
        generator.set_state(run["generator"])
        start = run["step"]
    for step in range(start, args.steps):
        index = torch.randint(0, len(split.train_x), (64,), generator=generator).chunk(world)[rank]
        x, y = split.train_x[index].to(device), split.train_y[index].to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        state = opt.state_dict()  # the optimizer's state, with the rest of the run beside it
        state["run"] = {"model": model.module.state_dict(), "generator": generator.get_state(),
                        "step": max(start, args.steps)}
        checkpoint.save(state, checkpoint_path(args.save, rank, world))
    window = opt.fisher
    line = (f"process {rank} of {world}: step {max(start, args.steps)}, window rows {window.window} x {window.dim} of "
            f"{opt.dim} coordinates ({window.nbytes / 1e6:.2f} MB here), test accuracy "
            f"{100 * accuracy(model.module.cpu(), split.test_x, split.test_y):.1f}%")
    lines = [None] * world
    dist.all_gather_object(lines, line)  # one process prints them all: no lines run together
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()  # every process is done with its peers before the connections close
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
