"""MFAC with a window sharded over torch.distributed processes: time per step, window bytes per
process and bytes sent per step, against one process, measured in the same run (gloo on CPU).

Per process and per step, the sharded optimizer sends
  all-reduce of the new Gram row   m float64     (ring all-reduce: 2 (w-1)/w x 8 m bytes)
  all-reduce of a finiteness flag  1 float64
  all-gather of the direction      d / w numbers (receives (w-1)/w x 4 d bytes in float32)
so bytes per step ~ 16 m (w-1)/w + 4 d (w-1)/w, while the window held per process is m d / w
numbers. With FSDP2 (fully_shard: each process holds 1/w of the parameters) the direction is not
gathered: the optimizer sends only the m-vector all-reduce and two flags (FSDP2's own all-gather
of parameters and reduce-scatter of gradients happen outside the optimizer, and are not counted). On one machine the processes share its cores, so this measures the cost of the
collectives, not a speed-up; the memory per process is what sharding buys.

    python benchmarks/distributed.py [--dim 1000000] [--window 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mfac import MFAC


def make_model(dim):
    torch.manual_seed(0)
    width = int(dim ** 0.5)
    return nn.Sequential(nn.Linear(width, width, bias=False), nn.Tanh(), nn.Linear(width, 10, bias=False))


def run_steps(model, opt, steps, batch, rank=0, world=1):
    gen = torch.Generator().manual_seed(1)
    width = (model.module if hasattr(model, "module") else model)[0].in_features
    timings = []
    for _ in range(steps):
        x = torch.randn(batch, width, generator=gen).chunk(world)[rank]
        y = torch.randint(0, 10, (batch,), generator=gen).chunk(world)[rank]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        start = time.perf_counter()
        opt.step()
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def _worker(rank, world, folder, args, mode):
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{mode}", rank=rank, world_size=world)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = make_model(args.dim)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
        opt = MFAC(model.parameters(), lr=1e-3, window=args.window, damp=1e-2)
    else:
        model = nn.parallel.DistributedDataParallel(make_model(args.dim))
        opt = MFAC(model.parameters(), lr=1e-3, window=args.window, damp=1e-2, process_group=dist.group.WORLD)
    step = run_steps(model, opt, args.steps, 64, rank, world)
    vector = torch.zeros(opt.dim // world)
    parts = [torch.empty_like(vector) for _ in range(world)]
    dist.barrier()
    start = time.perf_counter()
    for _ in range(5):
        dist.all_gather(parts, vector)
    gather = (time.perf_counter() - start) / 5
    if rank == 0:
        torch.save({"step": step, "window_bytes": opt.fisher.nbytes, "dim": opt.dim, "gather": gather},
                   f"{folder}/result-{mode}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    m, w = args.window, args.world
    model = make_model(args.dim)
    opt = MFAC(model.parameters(), lr=1e-3, window=m, damp=1e-2)
    single = run_steps(model, opt, args.steps, 64)
    d = opt.dim
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("ddp", "fsdp"):
            mp.start_processes(_worker, args=(w, folder, args, mode), nprocs=w, join=True, start_method="spawn")
            results[mode] = torch.load(os.path.join(folder, f"result-{mode}.pt"), weights_only=True)
    result, fsdp = results["ddp"], results["fsdp"]
    sent = 16 * m * (w - 1) / w + 8 + 4 * d * (w - 1) / w
    print(f"# MFAC with a sharded window: torch {torch.__version__}, gloo, {w} processes on one machine "
          f"sharing {os.cpu_count()} cores; d = {d:,}, window {m}, median optimizer step over {args.steps}\n")
    print("| setting | window bytes per process | bytes sent per step per process | optimizer step ms | ratio |\n"
          "|---|---|---|---|---|")
    print(f"| one process | {opt.fisher.nbytes / 1e6:.1f} MB | 0 | {1e3 * single:.1f} | 1.00 |")
    print(f"| {w} processes, sharded | {result['window_bytes'] / 1e6:.1f} MB | {sent / 1e6:.2f} MB | "
          f"{1e3 * result['step']:.1f} | {result['step'] / single:.2f} |")
    fsdp_sent = 16 * m * (w - 1) / w + 8 + 4
    print(f"| {w} processes, FSDP2 parameter shards | {fsdp['window_bytes'] / 1e6:.1f} MB | "
          f"{fsdp_sent / 1e3:.2f} kB | {1e3 * fsdp['step']:.1f} | {fsdp['step'] / single:.2f} |")
    bandwidth = 4 * (d // w) * (w - 1) / result["gather"]
    print(f"\nall-gather of the direction alone: {1e3 * result['gather']:.1f} ms ({bandwidth / 1e9:.2f} GB/s received "
          f"per process)")
    bert_d, bert_m, gpus = 110_000_000, 1024, 8
    bert_sent = 16 * bert_m * (gpus - 1) / gpus + 8 + 4 * bert_d * (gpus - 1) / gpus
    print(f"\nEstimate for BERT-base (d = 110M), m = {bert_m}, {gpus} GPUs: a bfloat16 window of "
          f"{bert_m * bert_d * 2 / gpus / 1e9:.1f} GB per GPU instead of {bert_m * bert_d * 2 / 1e9:.0f} GB, and "
          f"{bert_sent / 1e6:.0f} MB received per GPU per step (the direction's all-gather; the Gram row is "
          f"{16 * bert_m / 1e3:.0f} kB): about {1e3 * bert_sent / 100e9:.1f} ms at 100 GB/s (NVLink class), "
          f"{1e3 * bert_sent / 12.5e9:.0f} ms at 12.5 GB/s (100 Gb/s network).")


if __name__ == "__main__":
    main()
