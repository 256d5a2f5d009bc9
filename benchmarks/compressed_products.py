"""The compressed window's two products at MiniLM-L6's size, kernel against kernel.

Builds a compressed window layout for d = 22.7M, m = 1024 at density 1% (blocks of 8192) with
random bfloat16 values and, in every row's block, distinct random offsets in ascending order (as
the compression kernel writes them; ``--order random`` keeps top-k's order), then
times ``sparse_dots`` (G x) and ``sparse_combine`` (beta x + alpha G^T a) of two builds of
``mfac/kernels/window.c``: the one at git revision ``--old`` (default HEAD~1) and the working
tree's, both compiled here with ``cc -O3 -march=native -fopenmp``, medians of 3, 2 threads.
GB/s counts the entries read (value and offset, 4 bytes each). About 2 min (most of it drawing the
offsets) and 3 GB.

    python benchmarks/compressed_products.py [--old REV] [--order ascending|random]
"""
import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from mfac.kernels import BlockLayout

SOURCE = Path(__file__).resolve().parents[1] / "src" / "mfac" / "kernels" / "window.c"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--old", default="HEAD~1", help="git revision of the kernel to compare with")
parser.add_argument("--order", choices=["ascending", "random"], default="ascending",
                    help="order of the offsets within a row's block: ascending (what the compression writes) or random")
args = parser.parse_args()
ORDER = args.order
folder = Path(tempfile.mkdtemp())
(folder / "old.c").write_bytes(subprocess.run(["git", "show", f"{args.old}:src/mfac/kernels/window.c"],
                                               cwd=SOURCE.parent, check=True, capture_output=True).stdout)
LIBS = {}
for name, source in (("old", folder / "old.c"), ("current", SOURCE)):
    LIBS[name] = folder / f"{name}.so"
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(LIBS[name]),
                    "-lm"], check=True)
d, m, density, block = 22_700_000, 1024, 0.01, 8192
lay = BlockLayout.build(d, density, block, m)
nnz = lay.nnz
print(f"d = {d:,}, m = {m}, density {density:g}: {nnz:,} entries per row, {nnz * m:,} in all\n")
print("| kernel | G x ms | G x GB/s | G^T a ms | G^T a GB/s |\n|---|---|---|---|---|")
gen = torch.Generator().manual_seed(0)
values = torch.randn(m * nnz, generator=gen).bfloat16()
offsets = torch.empty(m * nnz, dtype=torch.int16)
for bi in range(lay.starts.numel() - 1):
    kept = int(lay.starts[bi + 1] - lay.starts[bi]); size = min(block, d - bi * block)
    # ascending within each row, as the compression kernel leaves them (ORDER=random: top-k's order)
    idx = torch.rand(m, size, generator=gen).topk(kept, dim=1).indices
    idx = idx if ORDER == "random" else idx.sort(dim=1).values
    start = int(lay.first[int(lay.starts[bi])])
    offsets[start: start + m * kept] = idx.reshape(-1).to(torch.int16)
x = torch.randn(d, generator=gen); a = torch.randn(m, generator=gen)
out = torch.empty(m, dtype=torch.float64); o2 = torch.empty(d)
P, I, INT, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
def tm(fn, n=3):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]
res = {}
for name in ("old", "current"):
    lib = ctypes.CDLL(str(LIBS[name]))
    lib.sparse_dots.argtypes = [P, INT, P, I, I, P, I, I, P, P, INT]
    lib.sparse_combine.argtypes = [P, INT, P, I, I, P, I, I, I, P, P, F, F, P, INT]
    nb = lay.starts.numel() - 1
    td = tm(lambda: lib.sparse_dots(values.data_ptr(), 1, offsets.data_ptr(), m, m, lay.starts.data_ptr(), nb, block, x.data_ptr(), out.data_ptr(), 2))
    r1 = out.clone()
    tc = tm(lambda: lib.sparse_combine(values.data_ptr(), 1, offsets.data_ptr(), m, m, lay.starts.data_ptr(), nb, block, d, a.data_ptr(), x.data_ptr(), 1.0, 1.0, o2.data_ptr(), 2))
    res[name] = (r1, o2.clone())
    gb = m * nnz * 4 / 1e9
    print(f"| {name} | {td * 1e3:.0f} | {gb / td:.1f} | {tc * 1e3:.0f} | {gb / tc:.1f} |")
print("\nlargest relative difference between the two kernels: G x", float(((res['current'][0]-res['old'][0]).abs().max()/res['old'][0].abs().max())),
      "combine", float(((res['current'][1]-res['old'][1]).abs().max()/res['old'][1].abs().max())))
