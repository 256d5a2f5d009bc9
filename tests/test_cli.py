"""The `mfac` command, run for real in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "demo-report.schema.json").read_text())
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mfac(*args, cwd=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "MFAC_DEBUG"}
    return subprocess.run([sys.executable, "-m", "mfac", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = mfac("demo", "--quick", "--out", out, "--seed", 0)
    assert result.returncode == 0, result.stderr
    return out, result


def test_demo_report_validates_and_is_sane(demo):
    out, result = demo
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    for name, run in report["training"].items():
        assert run["final_train_loss"] < 0.5 * run["initial_train_loss"], name
    curves = report["pruning"]["curves"]
    top = max(range(len(curves["obs"]) - 1), key=lambda i: curves["obs"][i]["sparsity"])  # last is 2:4
    assert curves["obs"][top]["test_accuracy"] >= curves["magnitude"][top]["test_accuracy"]
    for method in curves.values():
        for point in method:
            expected = 0.5 if point["target"] == "2:4" else float(point["target"])
            assert abs(point["sparsity"] - expected) < 1e-3
    assert report["finetune"]["pruned_weights_still_zero"] is True
    assert "report.md" in result.stdout and str(out) in result.stdout
    assert (out / "report.md").read_text().startswith("# mfac demo (quick)")
    assert not list(out.parent.glob(".*partial*"))  # the staging folder is gone


def test_demo_plots_are_real_images(demo):
    out, _ = demo
    matplotlib = pytest.importorskip("matplotlib.image")
    for name in ("loss_curves.png", "pruning.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        image = matplotlib.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 300


def test_demo_is_deterministic_for_a_seed(demo, tmp_path):
    out, _ = demo
    again = mfac("demo", "--quick", "--out", tmp_path / "again", "--seed", 0, "--quiet")
    assert again.returncode == 0, again.stderr
    first, second = (json.loads((p / "report.json").read_text()) for p in (out, tmp_path / "again"))
    assert first["pruning"]["curves"] == second["pruning"]["curves"]
    assert [r["final_train_loss"] for r in first["training"].values()] == \
           [r["final_train_loss"] for r in second["training"].values()]


def test_train_then_prune_reloads_with_reported_sparsity(tmp_path):
    trained = mfac("train", "--model", "cnn", "--data", "digits", "--steps", 60, "--out", tmp_path / "t", "--quiet")
    assert trained.returncode == 0, trained.stderr
    pruned = mfac("prune", "--model", "cnn", "--data", "digits", "--checkpoint", tmp_path / "t" / "model.pt",
                  "--sparsity", 0.75, "--num-grads", 16, "--recompute", 2, "--out", tmp_path / "p", "--quiet")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert abs(report["sparsity"] - 0.75) < 1e-3

    from mfac.models import small_cnn
    from mfac.prune import Masks

    model = small_cnn()
    model.load_state_dict(torch.load(tmp_path / "p" / "pruned.pt"))
    masks = Masks(torch.load(tmp_path / "p" / "masks.pt"))
    assert masks.sparsity() == report["sparsity"]
    params = dict(model.named_parameters())
    zeros = sum(int((params[n][~m] == 0).sum()) for n, m in masks.items())
    assert zeros == sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("args,fragment", [
    (["train", "--model", "vgg"], "invalid choice"),
    (["train", "--data", "imagenet"], "unknown --data"),
    (["train", "--data", "cifar-npz:/nonexistent.npz"], "no such CIFAR file"),
    (["train", "--model", "resnet20"], "resnet20 needs 3x32x32 images"),
    (["prune", "--sparsity", "1.5"], "--sparsity must be in"),
    (["prune", "--pattern", "3:5"], "divides by 5"),
    (["prune", "--checkpoint", "/nonexistent.pt"], "no such checkpoint"),
    (["demo", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_end_with_one_line(args, fragment, tmp_path):
    result = mfac(*args, "--out", tmp_path / "x") if args[0] != "demo" else mfac(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_checkpoint_that_does_not_fit(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    result = mfac("prune", "--checkpoint", tmp_path / "wrong.pt", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert "does not fit --model mlp" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_version_and_help():
    import mfac as package

    version = mfac("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mfac {package.__version__}"
    for command in ("demo", "train", "prune", "bench"):
        help_text = mfac(command, "--help")
        assert help_text.returncode == 0 and "usage: mfac " + command in help_text.stdout
    assert "(default: 0.9)" in mfac("prune", "--help").stdout


def test_library_imports_without_cli_extras():
    code = ("import sys; sys.modules['tqdm'] = None; sys.modules['matplotlib'] = None; "
            "import mfac, mfac.prune, mfac.optim, mfac.cli; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_ctrl_c_leaves_no_half_written_report(tmp_path):
    import signal
    import time

    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "mfac", "demo", "--quick", "--out", str(out), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (out / "report.json").exists()
    assert not list(tmp_path.glob(".*partial*"))
