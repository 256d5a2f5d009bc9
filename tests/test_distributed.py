"""MFAC with its window sharded over torch.distributed processes (gloo, 2 CPU processes)."""

import gc
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import torch.multiprocessing as mp
from torch import nn

from mfac import MFAC
from mfac.distributed import get_optimizer_state_dict, set_optimizer_state_dict

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS, WINDOW, SAVE_AT = 12, 4, 6  # three windows of steps; a checkpoint half way


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


CLIP = 0.05  # a max_grad_norm below this model's gradient norms, so that the clipping acts


def make_optimizer(params, group=None, **settings):
    return MFAC(params, lr=0.05, window=WINDOW, damp=1e-2, momentum=0.9, process_group=group, **settings)


def train(model, opt, data, rank=None, world=1, start=0, stop=STEPS, on_step=None):
    for step in range(start, stop):
        x, y = data[step]
        if rank is not None:  # each process its half of the batch; DDP averages the gradients
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)


def _save_atomically(obj, path):
    """A result file either exists whole or not at all, whatever happens to the process afterwards."""
    torch.save(obj, f"{path}.partial")
    os.replace(f"{path}.partial", path)


def _init(rank, world, rendezvous):
    # A peer that fails leaves the other waiting in a collective: fail within minutes, not gloo's default 30.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))


def _finish():
    """Wait for the peer, then drop every object that still holds the process group before destroying it.

    Without this, DDP's reference cycles can keep gloo's process group alive until interpreter shutdown,
    where its threads are torn down in an undefined order (seen once in CI as an abort after the run).
    """
    dist.barrier()
    gc.collect()


def spawn(worker, folder, results, processes=2):
    """Run worker(rank, processes, folder) in that many processes (two unless told) and load each rank's
    result file.

    A process that dies by a signal after both result files are complete has crashed in torch's own teardown;
    the results are still checked by the caller. Any failure before that re-raises.
    """
    try:
        mp.start_processes(worker, args=(processes, str(folder)), nprocs=processes, join=True, start_method="spawn")
    except mp.ProcessExitedException as exc:
        if exc.exit_code >= 0 or not all((folder / name).exists() for name in results):
            raise
        import warnings

        warnings.warn(f"a worker crashed after writing its results: {exc}", RuntimeWarning, stacklevel=2)
    return [torch.load(folder / name, weights_only=True) for name in results]


def _worker(rank, world, folder):
    _init(rank, world, f"{folder}/rendezvous")
    try:
        data = batches()
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = make_optimizer(model.parameters(), dist.group.WORLD)
        saved = {}

        def keep(step):
            if step == SAVE_AT:
                saved["model"] = {k: v.clone() for k, v in model.module.state_dict().items()}
                saved["opt"] = opt.state_dict()
                dcp.save({"model": model.module.state_dict(), "optim": get_optimizer_state_dict(opt)},
                         checkpoint_id=f"{folder}/dcp")

        train(model, opt, data, rank, world, on_step=keep)
        final = {k: v.clone() for k, v in model.module.state_dict().items()}
        # Resume each process from its own checkpoint, in a fresh model and optimizer.
        resumed = nn.parallel.DistributedDataParallel(make_model())
        resumed.module.load_state_dict(saved["model"])
        opt2 = make_optimizer(resumed.parameters(), dist.group.WORLD)
        opt2.load_state_dict(saved["opt"])
        train(resumed, opt2, data, rank, world, start=SAVE_AT)
        # And from the distributed checkpoint, into a fresh model and optimizer that have not stepped.
        fresh = make_model()
        opt3 = make_optimizer(fresh.parameters(), dist.group.WORLD)
        state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(opt3)}
        dcp.load(state, checkpoint_id=f"{folder}/dcp")
        fresh.load_state_dict(state["model"])
        set_optimizer_state_dict(opt3, state["optim"])
        from_dcp = nn.parallel.DistributedDataParallel(fresh)
        train(from_dcp, opt3, data, rank, world, start=SAVE_AT)
        result = {"final": final, "resumed": resumed.module.state_dict(), "opt": saved["opt"],
                  "from_dcp": from_dcp.module.state_dict(), "rows_at_save": saved["opt"]["mfac"]["window"]["grads"],
                  "window_shape": tuple(opt.fisher.state_dict()["grads"].shape), "window_bytes": opt.fisher.nbytes,
                  "gram": opt.fisher.state_dict()["gram"]}
        del model, resumed, opt, opt2, saved, keep, fresh, opt3, state, from_dcp
        _save_atomically(result, f"{folder}/rank{rank}.pt")
        _finish()
    finally:
        dist.destroy_process_group()


def prune_batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(8)]


def prune(model, data, group=None):
    from mfac.prune import prune_oneshot

    return prune_oneshot(model, 0.6, data, nn.functional.cross_entropy, num_grads=32, block_size=16, recompute=2,
                         per_sample=True, process_group=group)


def _prune_worker(rank, world, folder):
    _init(rank, world, f"{folder}/rendezvous-prune")
    try:
        mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in prune_batches()]
        model = make_model()
        masks = prune(model, mine, dist.group.WORLD)
        _save_atomically({"masks": masks.state_dict(), "weights": model.state_dict()}, f"{folder}/prune{rank}.pt")
        del masks, model
        _finish()
    finally:
        dist.destroy_process_group()


def test_obs_pruning_over_two_processes_agrees_with_one(tmp_path):
    results = spawn(_prune_worker, tmp_path, [f"prune{r}.pt" for r in range(2)])
    for name in results[0]["weights"]:  # every process ends with the same model, bit for bit
        assert torch.equal(results[0]["weights"][name], results[1]["weights"][name]), name
    model = make_model()
    single = prune(model, prune_batches())
    differ = sum(int((results[0]["masks"][n] != single[n]).sum()) for n in single)
    assert differ <= 2, differ  # float round-off may only swap ties at the threshold
    if differ == 0:
        for name, value in model.state_dict().items():
            assert torch.allclose(results[0]["weights"][name], value, rtol=1e-4, atol=1e-6), name


def test_distributed_obs_refuses_the_unstreamed_route():
    from mfac.prune import prune_oneshot

    with pytest.raises(ValueError, match="block_size <= num_grads"):
        prune_oneshot(make_model(), 0.5, prune_batches(), nn.functional.cross_entropy, num_grads=8, block_size=16,
                      process_group=object())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two processes' results and the folder holding their distributed checkpoint (folder / "dcp")."""
    folder = tmp_path_factory.mktemp("ddp")
    return spawn(_worker, folder, [f"rank{r}.pt" for r in range(2)]), folder


@pytest.fixture(scope="module")
def two_processes(ddp_run):
    return ddp_run[0]


def single_process_run(**settings):
    model = make_model()
    opt = make_optimizer(model.parameters(), **settings)
    train(model, opt, batches())
    return model, opt


def assert_matches_one_process(parameters: dict, **settings):
    """Parameters after training equal one process's run within float32 round-off (relative 1e-5)."""
    model, _ = single_process_run(**settings)
    for name, value in model.state_dict().items():
        err = float((parameters[name] - value).norm() / value.norm())
        assert err <= 1e-5, (name, err)


def load_in_one_process(checkpoint):
    """A fresh model and MFAC in this process, loaded from a distributed checkpoint's folder."""
    model = make_model()
    opt = make_optimizer(model.parameters())
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(opt)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(opt, state["optim"])
    assert opt.steps == SAVE_AT and opt.fisher.num_grads == min(SAVE_AT, WINDOW)
    return model, opt


def test_sharded_window_matches_one_process(two_processes):
    _, opt = single_process_run()
    for result in two_processes:
        assert_matches_one_process(result["final"])
    # The float64 m x m state is the same on both processes, and matches one process's.
    assert torch.equal(two_processes[0]["gram"], two_processes[1]["gram"])
    assert torch.allclose(two_processes[0]["gram"], opt.fisher.state_dict()["gram"], rtol=1e-5)


def test_each_process_holds_half_the_window(two_processes):
    dim = sum(p.numel() for p in make_model().parameters())
    shapes = [r["window_shape"] for r in two_processes]
    assert [s[0] for s in shapes] == [WINDOW, WINDOW] and sum(s[1] for s in shapes) == dim
    assert all(abs(s[1] - dim / 2) <= 1 for s in shapes)
    _, opt = single_process_run()
    rows_bytes = WINDOW * dim * 4
    for result in two_processes:  # the rows halve; the small float64 state is the same size everywhere
        assert result["window_bytes"] - (opt.fisher.nbytes - rows_bytes) == WINDOW * result["window_shape"][1] * 4
        assert WINDOW * result["window_shape"][1] * 4 <= rows_bytes / 2 + WINDOW * 4


def test_each_process_resumes_exactly_from_its_own_checkpoint(two_processes):
    for result in two_processes:
        for name, value in result["final"].items():
            assert torch.equal(result["resumed"][name], value), name


def test_each_process_resumes_exactly_from_the_distributed_checkpoint(two_processes):
    for result in two_processes:
        for name, value in result["final"].items():
            assert torch.equal(result["from_dcp"][name], value), name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_distributed_checkpoint_of_two_processes_resumes_in_one(ddp_run):
    results, folder = ddp_run
    model, opt = load_in_one_process(folder / "dcp")
    # The one window is the two shards side by side, bit for bit.
    assert torch.equal(opt.fisher.state_dict()["grads"], torch.cat([r["rows_at_save"] for r in results], dim=1))
    train(model, opt, batches(), start=SAVE_AT)
    assert_matches_one_process(model.state_dict())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_distributed_checkpoint_refuses_another_model(ddp_run):
    _, folder = ddp_run
    model = nn.Sequential(nn.Linear(10, 17), nn.Tanh(), nn.Linear(17, 3))
    opt = make_optimizer(model.parameters())
    state = {"optim": get_optimizer_state_dict(opt)}
    with pytest.raises(CheckpointException) as refused:  # DCP itself refuses rows of another size
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
    assert any("Size mismatch" in str(f) and "window.grads" in str(f) for f in refused.value.failures.values())
    state["optim"]["mfac"]["window"]["dim"] = 1234
    with pytest.raises(ValueError, match="d = 1234"):
        set_optimizer_state_dict(opt, state["optim"])
    assert opt.steps == 0 and opt.fisher is None


def test_a_sharded_state_refuses_to_load_into_one_process(two_processes):
    model = make_model()
    opt = make_optimizer(model.parameters())
    with pytest.raises(ValueError, match="process 0 of 2.*one process"):
        opt.load_state_dict(two_processes[0]["opt"])
    assert opt.steps == 0 and opt.fisher is None  # unchanged


def test_process_group_needs_an_initialised_backend():
    with pytest.raises(RuntimeError, match="init_process_group"):
        MFAC(make_model().parameters(), process_group=object())


def test_the_ddp_example_runs_under_torchrun(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_mfac.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(example), "--steps", "20", "--window", "8", "--save", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process 0 of 2" in result.stdout and "process 1 of 2" in result.stdout
    states = [torch.load(tmp_path / f"mfac-rank{r}-of-2.pt", weights_only=True) for r in range(2)]
    assert [s["mfac"]["shard"]["rank"] for s in states] == [0, 1]


@pytest.mark.parametrize("dim,world", [(33, 2), (10, 3), (7, 3), (100, 8), (4, 4)])
def test_shards_are_torch_chunks(dim, world):
    from mfac.distributed import ShardLayout

    chunks = torch.arange(dim).chunk(world)
    assert len(chunks) == world
    for rank, chunk in enumerate(chunks):
        start, stop = ShardLayout(dim, world, rank).bounds()
        assert torch.equal(torch.arange(start, stop), chunk)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_distributed_checkpoint_in_one_process_resumes_bitwise(tmp_path):
    """Saved before the first step (an empty window) and after a few: both resume exactly."""
    data = batches()
    for save_at in (0, SAVE_AT):
        model = make_model()
        opt = make_optimizer(model.parameters())
        train(model, opt, data, stop=save_at)
        folder = str(tmp_path / f"dcp{save_at}")
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(opt)}, checkpoint_id=folder)
        train(model, opt, data, start=save_at)
        again = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
        opt2 = make_optimizer(again.parameters())
        state = {"model": again.state_dict(), "optim": get_optimizer_state_dict(opt2)}
        dcp.load(state, checkpoint_id=folder)
        again.load_state_dict(state["model"])
        set_optimizer_state_dict(opt2, state["optim"])
        assert opt2.steps == save_at and (opt2.fisher is None) == (save_at == 0)
        train(again, opt2, data, start=save_at)
        for name, value in model.state_dict().items():
            assert torch.equal(again.state_dict()[name], value), (save_at, name)


def _resume_sharded(make_sharded_model, checkpoint, rank, world):
    """In a worker: a fresh sharded model and MFAC loaded from a distributed checkpoint and trained
    from SAVE_AT to the end; returns the final parameters, gathered."""
    model = make_sharded_model()
    opt = make_optimizer(model.parameters())
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(opt, state["optim"])
    train(model, opt, batches(), rank, world, start=SAVE_AT)
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def _fsdp_worker(rank, world, folder):
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    _init(rank, world, f"{folder}/rendezvous-fsdp")
    try:
        mesh = init_device_mesh("cpu", (world,))
        data = batches()
        saved = {}

        def sharded_model():
            model = make_model()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        model = sharded_model()
        opt = make_optimizer(model.parameters())

        def keep(step):
            if step == SAVE_AT:
                saved["model"] = {k: v.to_local().clone() for k, v in model.state_dict().items()}
                saved["opt"] = opt.state_dict()
                dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(opt)},
                         checkpoint_id=f"{folder}/dcp-fsdp")

        train(model, opt, data, rank, world, on_step=keep)
        final = {k: v.full_tensor() for k, v in model.state_dict().items()}
        clipped_model = sharded_model()  # max_grad_norm: the norm must be summed over the shards
        train(clipped_model, make_optimizer(clipped_model.parameters(), max_grad_norm=CLIP), data, rank, world)
        clipped = {k: v.full_tensor() for k, v in clipped_model.state_dict().items()}
        from_dcp = _resume_sharded(sharded_model, f"{folder}/dcp-fsdp", rank, world)
        # A checkpoint written by one process (plain parameters) loads into the sharded run.
        from_one = _resume_sharded(sharded_model, f"{folder}/dcp-one", rank, world)
        resumed = sharded_model()
        for name, value in resumed.state_dict().items():
            value.to_local().copy_(saved["model"][name])
        opt2 = make_optimizer(resumed.parameters())
        opt2.load_state_dict(saved["opt"])
        train(resumed, opt2, data, rank, world, start=SAVE_AT)
        refusals = []
        from torch.distributed.tensor import Replicate, distribute_tensor

        for params in ([*resumed.parameters(), nn.Parameter(torch.zeros(3))],
                       [nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()]))]):
            try:
                make_optimizer(params)
            except ValueError as error:
                refusals.append(str(error))
        late = make_optimizer(resumed.parameters())
        late.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
        try:
            late.step()
        except ValueError as error:
            refusals.append(str(error))
        result = {"final": final, "resumed": {k: v.full_tensor() for k, v in resumed.state_dict().items()},
                  "refusals": refusals, "from_dcp": from_dcp, "from_one": from_one, "clipped": clipped,
                  "window_shape": tuple(opt.fisher.state_dict()["grads"].shape), "dim": opt.dim, "shard": saved["opt"]["mfac"]["shard"]}
        del model, resumed, opt, opt2, saved, keep
        _save_atomically(result, f"{folder}/fsdp{rank}.pt")
        _finish()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Two FSDP2 processes' results and their folder: "dcp-fsdp" is their distributed checkpoint,
    "dcp-one" the one written first by one process at the same step, which they also resume from."""
    pytest.importorskip("torch.distributed.tensor")
    folder = tmp_path_factory.mktemp("fsdp")
    model = make_model()
    opt = make_optimizer(model.parameters())
    train(model, opt, batches(), stop=SAVE_AT)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(opt)},
                 checkpoint_id=str(folder / "dcp-one"))
    return spawn(_fsdp_worker, folder, [f"fsdp{r}.pt" for r in range(2)]), folder


@pytest.fixture(scope="module")
def fsdp_processes(fsdp_run):
    return fsdp_run[0]


def test_fsdp2_parameters_train_as_one_process(fsdp_processes):
    """fully_shard'ed parameters: each process's window holds its own shards, and training matches one
    process within float32 round-off; nothing is gathered."""
    for result in fsdp_processes:
        assert_matches_one_process(result["final"])
    dim = sum(p.numel() for p in make_model().parameters())
    assert sum(r["dim"] for r in fsdp_processes) == dim  # the shards partition the coordinates
    assert [r["window_shape"] for r in fsdp_processes] == [(WINDOW, r["dim"]) for r in fsdp_processes]
    assert [r["shard"]["rank"] for r in fsdp_processes] == [0, 1]


def test_fsdp2_clips_by_the_global_gradient_norm(fsdp_processes):
    """max_grad_norm under FSDP2: each process holds a shard of the gradient, and the clipping uses
    the norm of the whole one, so training matches one process with the same clipping (which itself
    differs from training without it: the clipping acted)."""
    for result in fsdp_processes:
        assert_matches_one_process(result["clipped"], max_grad_norm=CLIP)
    clipped, _ = single_process_run(max_grad_norm=CLIP)
    plain, _ = single_process_run()
    assert not torch.allclose(clipped[0].weight, plain[0].weight, rtol=1e-3)


def test_fsdp2_refuses_mixed_or_replicated_parameters(fsdp_processes):
    for result in fsdp_processes:
        mixed, replicated, added_later = result["refusals"]
        assert "both DTensor parameters (FSDP2) and plain ones" in mixed
        assert "not sharded" in replicated and "fully_shard" in replicated
        assert "mixes FSDP2 (DTensor) and plain parameters" in added_later


def test_fsdp2_processes_resume_exactly(fsdp_processes):
    """From each process's own state_dict, and from a distributed checkpoint of the same two processes."""
    for result in fsdp_processes:
        for name, value in result["final"].items():
            assert torch.equal(result["resumed"][name], value), name
            assert torch.equal(result["from_dcp"][name], value), name


def test_fsdp2_processes_resume_from_one_process_checkpoint(fsdp_processes):
    """The rows are saved in the whole model's flat coordinates in every form, so a one-process
    checkpoint resumes under FSDP2 and ends where the one-process run ends (float32 round-off)."""
    for result in fsdp_processes:
        assert_matches_one_process(result["from_one"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_fsdp2_checkpoint_resumes_in_one_process(fsdp_run):
    _, folder = fsdp_run
    model, opt = load_in_one_process(folder / "dcp-fsdp")
    train(model, opt, batches(), start=SAVE_AT)
    assert_matches_one_process(model.state_dict())


def _hsdp_worker(rank, world, folder):
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    torch.set_num_threads(1)
    _init(rank, world, f"{folder}/rendezvous-hsdp")
    try:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))

        def hybrid_model():
            return fully_shard(make_model(), mesh=mesh)  # a 2-D mesh: HSDP

        model = hybrid_model()
        opt = make_optimizer(model.parameters())

        def keep(step):
            if step == SAVE_AT:
                dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(opt)},
                         checkpoint_id=f"{folder}/dcp-hsdp")

        train(model, opt, batches(), rank, world, on_step=keep)
        final = {k: v.full_tensor() for k, v in model.state_dict().items()}
        from_dcp = _resume_sharded(hybrid_model, f"{folder}/dcp-hsdp", rank, world)
        result = {"final": final, "from_dcp": from_dcp,
                  "window_shape": tuple(opt.fisher.state_dict()["grads"].shape), "shard": opt.state_dict()["mfac"]["shard"]}
        del model, opt, keep
        _save_atomically(result, f"{folder}/hsdp{rank}.pt")
        _finish()
    finally:
        dist.destroy_process_group()


def test_hsdp_replicas_of_sharded_windows_train_as_one_process(tmp_path):
    """HSDP on 4 processes (2 replicas of 2 shards): each process's window covers half of the
    coordinates, the replicas stay identical, training matches one process within float32 round-off,
    and the distributed checkpoint resumes exactly."""
    pytest.importorskip("torch.distributed.tensor")
    results = spawn(_hsdp_worker, tmp_path, [f"hsdp{r}.pt" for r in range(4)], processes=4)
    dim = sum(p.numel() for p in make_model().parameters())
    for result in results:
        assert_matches_one_process(result["final"])
        for name, value in result["final"].items():
            assert torch.equal(result["from_dcp"][name], result["final"][name]), name
            assert torch.equal(result["final"][name], results[0]["final"][name]), name
    assert sum(r["window_shape"][1] for r in results) == 2 * dim  # each coordinate in one process per replica
    assert [r["shard"]["replicas"] for r in results] == [2] * 4
    assert sorted(r["shard"]["rank"] for r in results) == [0, 0, 1, 1]


def _nccl_worker(rank, world, folder):
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"file://{folder}/rendezvous-nccl", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        device = torch.device("cuda", rank)
        model = nn.parallel.DistributedDataParallel(make_model().to(device), device_ids=[rank])
        opt = make_optimizer(model.parameters(), dist.group.WORLD)
        data = [(x.to(device), y.to(device)) for x, y in batches()]
        train(model, opt, data, rank, world)
        result = {"final": {k: v.cpu() for k, v in model.module.state_dict().items()},
                  "window_shape": tuple(opt.fisher.state_dict()["grads"].shape), "gram": opt.fisher.state_dict()["gram"].cpu()}
        del model, opt
        _save_atomically(result, f"{folder}/nccl{rank}.pt")
        _finish()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="needs two CUDA devices and NCCL")
def test_sharded_window_over_nccl_matches_one_process(tmp_path):
    """The DDP route on two GPUs with NCCL: half of the window on each, the same float64 m x m state on both,
    and parameters within 1e-5 of one CPU process (TF32 off)."""
    results = spawn(_nccl_worker, tmp_path, [f"nccl{r}.pt" for r in range(2)])
    for result in results:
        assert_matches_one_process(result["final"])
    assert torch.equal(results[0]["gram"], results[1]["gram"])
    assert sum(r["window_shape"][1] for r in results) == sum(p.numel() for p in make_model().parameters())
