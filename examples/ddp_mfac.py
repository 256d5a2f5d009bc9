"""Data-parallel training with MFAC's window sharded over the processes (torch.distributed).

Each process trains on its share of every batch (DistributedDataParallel averages the gradients),
and MFAC(..., process_group=...) keeps 1/world of every window row: the window's memory divides by
the number of processes, and a step sends one all-reduce of an m-vector and one all-gather of the
direction. Runs on CPU with gloo on scikit-learn's bundled digits, or on GPUs with NCCL:

    torchrun --nproc_per_node 2 examples/ddp_mfac.py            # CPU, 2 processes
    torchrun --nproc_per_node 8 examples/ddp_mfac.py --backend nccl   # one node of 8 GPUs

Each process writes its own checkpoint (``--save``); resume with the same number of processes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from mfac import MFAC
from mfac.data import load_digits
from mfac.training import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--save", default=None, help="folder for per-process checkpoints")
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
    for step in range(args.steps):
        index = torch.randint(0, len(split.train_x), (64,), generator=generator).chunk(world)[rank]
        x, y = split.train_x[index].to(device), split.train_y[index].to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    window = opt.fisher
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        torch.save(opt.state_dict(), os.path.join(args.save, f"mfac-rank{rank}-of-{world}.pt"))
    print(f"process {rank} of {world}: window rows {window.window} x {window.dim} of {opt.dim} coordinates "
          f"({window.nbytes / 1e6:.2f} MB here), test accuracy "
          f"{100 * accuracy(model.module.cpu(), split.test_x, split.test_y):.1f}%", flush=True)
    dist.barrier()  # every process is done with its peers before the connections close
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
