"""The `mfac` command, run for real in subprocesses (in process where a test looks inside)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from mfac import defaults

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
    pruned = mfac("prune", "--model", "cnn", "--data", "digits", "--checkpoint", tmp_path / "t" / "model.safetensors",
                  "--sparsity", 0.75, "--num-grads", 16, "--recompute", 2, "--out", tmp_path / "p", "--quiet")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert abs(report["sparsity"] - 0.75) < 1e-3

    from mfac.checkpoint import load_weights
    from mfac.models import small_cnn
    from mfac.prune import Masks

    model = small_cnn()
    model.load_state_dict(load_weights(tmp_path / "p" / "pruned.safetensors"))
    masks = Masks(load_weights(tmp_path / "p" / "masks.safetensors"))
    assert masks.sparsity() == report["sparsity"]
    params = dict(model.named_parameters())
    zeros = sum(int((params[n][~m] == 0).sum()) for n, m in masks.items())
    assert zeros == sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("args,fragment", [
    (["train", "--model", "vgg"], "expected one of mlp, cnn, resnet20 or hf:PATH"),
    (["train", "--data", "imagenet"], "unknown --data"),
    (["train", "--data", "cifar-npz:/nonexistent.npz"], "no such CIFAR file"),
    (["train", "--model", "resnet20"], "resnet20 needs 3x32x32 images"),
    (["prune", "--sparsity", "1.5"], "argument --sparsity: must be a finite number in [0, 1)"),
    (["prune", "--allow-untrained", "--pattern", "3:5"], "divides by 5"),
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


def test_defaults_come_from_mfac_defaults(monkeypatch, capsys):
    from mfac.cli.parser import build_parser

    from mfac.cli.optimizers import dtype_name, fill_recipe

    parser = build_parser()
    for model, recipe in (("mlp", defaults.SMALL_MODEL_RECIPE), ("hf:/some/folder", defaults.TRANSFORMER_RECIPE)):
        train = parser.parse_args(["train", "--model", model])
        fill_recipe(train)  # what the user leaves out comes from the model's recipe
        assert (train.lr, train.window, train.damp, train.momentum, train.density, train.window_dtype) == (
            recipe.lr, recipe.window, recipe.damp, recipe.momentum, recipe.density, dtype_name(recipe.window_dtype))
        assert train.max_grad_norm == (recipe.max_grad_norm or 0.0)  # 0: no clipping
    given = parser.parse_args(["train", "--model", "hf:/x", "--window", "8", "--window-dtype", "float32"])
    fill_recipe(given)
    assert (given.window, given.window_dtype, given.damp) == (8, "float32", defaults.TRANSFORMER_RECIPE.damp)
    prune = parser.parse_args(["prune"])
    assert (prune.num_grads, prune.block_size) == (None, defaults.PRUNE_BLOCK_SIZE)  # None: PRUNE_NUM_GRADS, capped
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--help"])
    help_text = capsys.readouterr().out
    assert f"default {defaults.PRUNE_RELATIVE_DAMP:g} when --damp is not given" in help_text
    assert f"default {defaults.PRUNE_RECOMPUTE} one-shot, {defaults.GRADUAL_RECOMPUTE} per pruning step" in help_text


@pytest.mark.parametrize("given,expected", [
    ([], {"block_size": defaults.PRUNE_BLOCK_SIZE, "recompute": defaults.PRUNE_RECOMPUTE}),
    (["--block-size", "0", "--recompute", "3"], {"block_size": defaults.EXACT, "recompute": 3}),
    (["--gradual", "--steps", "20"], {"block_size": defaults.PRUNE_BLOCK_SIZE,
                                      "recompute": defaults.GRADUAL_RECOMPUTE}),
    (["--gradual", "--steps", "20", "--block-size", "0"], {"block_size": defaults.EXACT,
                                                           "recompute": defaults.GRADUAL_RECOMPUTE}),
])
def test_prune_hands_its_settings_to_the_pruner(given, expected, tmp_path, monkeypatch, capsys):
    """--block-size 0 is the library's explicit "exact"; --recompute defaults to the library's."""
    import mfac.cli.prune
    import mfac.cli.prune_gradual
    from mfac.cli import main

    seen = {}

    def pruner(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    if "--gradual" in given:
        monkeypatch.setattr(mfac.cli.prune_gradual, "GradualPruner", pruner)
    else:
        monkeypatch.setattr(mfac.cli.prune, "prune_oneshot", pruner)
    monkeypatch.delenv("MFAC_DEBUG", raising=False)
    out = str(tmp_path / "x")
    assert main(["prune", *given, "--num-grads", "16", "--allow-untrained", "--quiet", "--out", out]) == 1
    assert "stop here" in capsys.readouterr().err
    assert {key: seen[key] for key in expected} == expected
    assert seen["num_grads"] == 16 and seen["damp"] is None and seen["relative_damp"] is None


def test_bench_says_what_it_needs_without_a_source_checkout(tmp_path):
    import shutil

    import mfac as package

    line = one_line_error(mfac("bench", "--benchmarks", tmp_path), 2)
    assert f"--benchmarks {tmp_path}" in line and "fisher.py" in line
    installed = tmp_path / "site-packages"  # the package alone, as pip installs it from a wheel
    shutil.copytree(Path(package.__file__).parent, installed / "mfac", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**{k: v for k, v in os.environ.items() if k != "MFAC_DEBUG"}, "PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-m", "mfac", "bench"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    line = one_line_error(result, 2)
    assert "source checkout" in line and "--benchmarks DIR" in line and str(installed) in line
    if (ROOT / "benchmarks" / "fisher.py").exists():  # a checkout: found beside the package, nothing is run here
        from mfac.cli.bench import find_benchmarks

        assert find_benchmarks(None) == (ROOT / "benchmarks").resolve()


def test_cli_modules_form_no_import_cycle():
    """The parser imports no command module and no command module imports the parser; mfac.cli has no cycle."""
    import ast

    import mfac.cli as cli

    folder = Path(cli.__file__).parent
    names = {path.stem for path in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mfac.cli."):
                imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[2] for alias in node.names if alias.name.startswith("mfac.cli.")}
        graph[path.stem] = imported & names
    commands = {"demo", "train", "prune", "bench"}
    assert not graph["parser"] & commands, graph["parser"]
    assert not [name for name in commands if "parser" in graph[name]]

    def reaches(start, target, seen=()):
        return any(name == target or (name not in seen and reaches(name, target, (*seen, name)))
                   for name in graph.get(start, ()))

    assert not [name for name in graph if name != "__init__" and reaches(name, name)]
    assert not (folder / "common.py").exists()


def test_library_imports_without_cli_extras():
    code = ("import sys; sys.modules['tqdm'] = None; sys.modules['matplotlib'] = None; "
            "import mfac, mfac.prune, mfac.optim, mfac.cli; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_ctrl_c_leaves_no_half_written_report(tmp_path):
    import signal
    import time

    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "mfac", "demo", "--quick", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()  # the first progress line: training has begun, seconds of work remain
    assert first.startswith("train "), first
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (out / "report.json").exists()
    assert not list(tmp_path.glob(".*partial*"))


# The command-line contract: exit 2 for bad usage before any work, 1 for failures, 130 for Ctrl-C

def one_line_error(result, status):
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def write_files(folder: Path) -> dict:
    import numpy as np

    folder.mkdir(exist_ok=True)
    files = {"text": folder / "notes.txt", "empty": folder / "empty.pt", "random": folder / "random.pt",
             "truncated": folder / "truncated.pt", "npz_without_x": folder / "bad.npz"}
    files["text"].write_text("just some text\n")
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(3000))
    torch.save({"0.weight": torch.zeros(100, 100)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:1000])
    np.savez(files["npz_without_x"], images=np.zeros((4, 32, 32, 3), dtype=np.uint8), y=np.zeros(4, dtype=np.uint8))
    return files


BAD_USAGE = [
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "-1"], "--batch-size"),
    (["train", "--batch-size", "5000"], "--batch-size must be in [1, 1348]"),
    (["train", "--lr", "1e300"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--damp", "1e-45"], "--damp"),
    (["train", "--seed", str(2**70)], "--seed"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--checkpoint", "{text}"], "not a readable torch file"),
    (["train", "--checkpoint", "{empty}"], "not a readable torch file"),
    (["train", "--checkpoint", "{random}"], "not a readable torch file"),
    (["train", "--checkpoint", "{truncated}"], "not a readable torch file"),
    (["train", "--data", "mnist-idx:{text}"], "not an MNIST IDX"),
    (["train", "--data", "cifar-npz:{text}"], "not a CIFAR"),
    (["train", "--data", "cifar-npz:{npz_without_x}"], "has no array 'x'"),
    (["prune", "--damp", "0"], "--damp"),
    (["prune", "--num-grads", "0"], "--num-grads"),
    (["train", "--resume", "{folder}"], "no checkpoint.pt"),
]


@pytest.mark.parametrize("args,fragment", BAD_USAGE)
def test_bad_usage_exits_2_with_one_line_before_any_work(args, fragment, tmp_path):
    files = {name: str(path) for name, path in write_files(tmp_path / "files").items()}
    args = [a.format(**files, folder=tmp_path / "files") for a in args]
    out = tmp_path / "out"
    line = one_line_error(mfac(*args, "--out", out), 2)
    assert fragment in line, line
    assert not out.exists()


def test_out_folder_problems_are_found_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert "is a file" in one_line_error(mfac("train", "--out", tmp_path / "a_file"), 2)
    assert "is a file" in one_line_error(mfac("prune", "--allow-untrained", "--out", tmp_path / "a_file" / "inside"), 2)
    assert "cannot be written" in one_line_error(mfac("demo", "--out", "/proc/mfac-cannot-write-here"), 2)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert "not empty" in one_line_error(mfac("train", "--steps", 3, "--out", used), 2)
    forced = mfac("train", "--steps", 3, "--out", used, "--force", "--quiet")
    assert forced.returncode == 0, forced.stderr
    assert (used / "keep.txt").read_text() == "mine" and (used / "model.safetensors").exists()


def test_a_diverging_run_says_so_exits_1_and_writes_valid_json(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(mfac("train", "--optimizer", "sgd", "--lr", "1e30", "--steps", 50, "--out", out, "--quiet"),
                          1)
    assert "diverged" in line
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert report["diverged"] is True and report["diverged_at_step"] >= 1


def test_train_resumes_bitwise_after_kill_9(tmp_path):
    from mfac.checkpoint import load_weights

    settings = ["train", "--model", "mlp", "--optimizer", "mfac", "--steps", 1500, "--checkpoint-every", 7, "--quiet"]
    reference = mfac(*settings, "--out", tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "mfac", *map(str, settings), "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere in the middle of training, possibly inside a save
    process.kill()
    process.wait()
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = mfac("train", "--resume", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["resumed_at_steps"] and 0 < report["resumed_at_steps"][0] < 1500
    expected, got = load_weights(tmp_path / "whole" / "model.safetensors"), load_weights(run / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert "differs from the resumed run" in one_line_error(mfac("train", "--resume", run, "--lr", "0.5"), 2)


def test_atomic_save_survives_kill_9_at_any_moment(tmp_path):
    import random
    import time

    target = tmp_path / "state.pt"
    code = ("import sys, torch; from mfac import checkpoint\n"
            "state = {'w': torch.randn(2_000_000), 'step': 0}\n"
            "while True:\n    state['step'] += 1; checkpoint.save(state, sys.argv[1])\n")
    rng = random.Random(0)
    for _ in range(4):
        process = subprocess.Popen([sys.executable, "-c", code, str(target)])
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.5))
        process.kill()
        process.wait()
        from mfac.checkpoint import load

        assert load(target)["w"].shape == (2_000_000,)


def test_ctrl_c_while_loading_exits_130_without_traceback(tmp_path):
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "mfac", "demo", "--quick", "--quiet", "--out", tmp_path / "x"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # torch is still being imported
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr


def test_ctrl_c_after_the_work_is_finished_keeps_its_status():
    """A Ctrl-C in the interpreter's shutdown (here from an exit handler, where CPython has not yet put
    the default action back) neither kills the process (-2) nor turns a finished run into 130."""
    script = ("import atexit, os, signal, time, mfac.cli\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
              "mfac.cli.main = lambda argv=None: 0\n"
              "mfac.cli.run_program()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)


# Hugging Face models on text ---------------------------------------------------------------------

WORDS = "the a movie film was is good bad great awful not very boring fun plot actors love hate it".split()
POSITIVE = ["the movie was good", "great fun", "love it", "a great great movie with very good actors",
            "very very good", "fun fun fun film", "good plot", "the actors were great"]
NEGATIVE = ["a very boring film", "the plot is not good at all it was awful", "i hate the actors", "boring",
            "awful plot", "bad bad movie", "not fun", "the film was awful"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny BERT folder (config, weights, tokenizer) and an SST-2-like TSV folder, written by the test."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    model_dir, data_dir = root / "bert", root / "text"
    model_dir.mkdir()
    data_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    rows = [f"{label}\t{text}" for pair in zip(POSITIVE, NEGATIVE) for label, text in zip((1, 0), pair)]
    (data_dir / "mini_train.tsv").write_text("label\tsentence\n" + "\n".join(rows * 4) + "\n")
    (data_dir / "mini_dev.tsv").write_text("label\tsentence\n" + "\n".join(rows[:8]) + "\n")
    return model_dir, data_dir


def test_train_and_prune_a_hugging_face_model_on_tsv_text(tiny_hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    model_dir, data_dir = tiny_hf
    common = ["--model", f"hf:{model_dir}", "--data", f"tsv:{data_dir}", "--batch-size", 8, "--quiet"]
    result = mfac("train", *common, "--steps", 30, "--optimizer", "adam", "--lr", 3e-3, "--checkpoint-every", 10,
                  "--out", tmp_path / "train")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "train" / "report.json").read_text())
    assert report["final_train_loss"] < report["initial_train_loss"] - 0.02  # it learns: 0.693 -> 0.661 measured
    assert report["files"][0] == "model/" and "mini_train.tsv" in report["data"]
    trained = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "train" / "model"))
    assert trained.config.num_labels == 2
    result = mfac("prune", *common, "--method", "obs", "--sparsity", 0.5, "--num-grads", 16, "--per-sample",
                  "--block-size", 16, "--recompute", 2, "--checkpoint", tmp_path / "train" / "model" / "model.safetensors",
                  "--out", tmp_path / "prune")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "prune" / "report.json").read_text())
    assert abs(report["sparsity"] - 0.5) < 1e-3 and report["files"][0] == "model/"
    assert all(".encoder.layer." in name for name in report["per_tensor_sparsity"])
    pruned = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "prune" / "model"))
    named = dict(pruned.named_parameters())
    zeros = sum(int((named[name] == 0).sum()) for name in report["per_tensor_sparsity"])
    total = sum(named[name].numel() for name in report["per_tensor_sparsity"])
    assert zeros == round(0.5 * total)


def test_hugging_face_training_resumes_bitwise(tiny_hf, tmp_path):
    model_dir, data_dir = tiny_hf
    common = ["train", "--model", f"hf:{model_dir}", "--data", f"tsv:{data_dir}", "--batch-size", 4, "--quiet",
              "--window", 4, "--lr", 1e-3]
    assert mfac(*common, "--steps", 6, "--checkpoint-every", 3, "--out", tmp_path / "straight").returncode == 0
    first = mfac(*common, "--steps", 3, "--checkpoint-every", 3, "--out", tmp_path / "split")
    assert first.returncode == 0, first.stderr
    resumed = mfac("train", "--resume", tmp_path / "split", "--steps", 6, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    from mfac.checkpoint import load_weights

    a = load_weights(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_weights(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,fragment", [
    (["--model", "hf:/nonexistent"], "not a Hugging Face model folder"),
    (["--data", "digits"], "a Hugging Face model takes text data, tsv:PATH"),
    (["--data", "tsv:/nonexistent"], "no such file or folder"),
])
def test_bad_hugging_face_arguments_end_with_one_line(tiny_hf, tmp_path, args, fragment):
    model_dir, data_dir = tiny_hf
    base = {"--model": f"hf:{model_dir}", "--data": f"tsv:{data_dir}"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = mfac("train", *[x for pair in base.items() for x in pair], "--out", tmp_path / "x", "--quiet")
    assert result.returncode == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr


@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_gradual_pruning_of_a_hugging_face_model(tiny_hf, tmp_path, method):
    transformers = pytest.importorskip("transformers")
    model_dir, data_dir = tiny_hf
    result = mfac("prune", "--gradual", "--model", f"hf:{model_dir}", "--data", f"tsv:{data_dir}", "--batch-size", 8,
                  "--steps", 12, "--prune-start", 2, "--prune-end", 10, "--prune-every", 4, "--sparsity", 0.6,
                  "--method", method, "--num-grads", 8, "--per-sample", "--block-size", 8, "--lr", 3e-3, "--quiet",
                  "--out", tmp_path / "gradual")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "gradual" / "report.json").read_text())
    assert abs(report["sparsity"] - 0.6) < 1e-3 and report["gradual"]["end_step"] == 10
    assert len(report["gradual"]["batch_losses"]) == 12
    pruned = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "gradual" / "model"))
    named = dict(pruned.named_parameters())
    zeros = sum(int((named[name] == 0).sum()) for name in report["per_tensor_sparsity"])
    total = sum(named[name].numel() for name in report["per_tensor_sparsity"])
    assert zeros == round(0.6 * total)


def test_gradual_pruning_of_a_built_in_model(tmp_path):
    result = mfac("prune", "--gradual", "--steps", 30, "--sparsity", 0.8, "--num-grads", 16, "--quiet",
                  "--out", tmp_path / "g")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert abs(report["sparsity"] - 0.8) < 1e-3 and report["gradual"] == {**report["gradual"], "start_step": 3,
                                                                             "end_step": 21, "every": 2}
    assert report["files"] == ["pruned.safetensors", "masks.safetensors", "pruned.sparse.safetensors", "report.md",
                               "report.json", "checkpoint.pt"]
    assert report["file_bytes_after"] == report["file_bytes"]["pruned.sparse.safetensors"] < report["file_bytes_before"]
    assert report["nonzero_parameters_after"] < report["parameters_after"] == report["parameters_before"]
    bad = mfac("prune", "--gradual", "--steps", 10, "--prune-end", 20, "--out", tmp_path / "h")
    assert bad.returncode == 2 and "--prune-end 20" in bad.stderr


# Structured pruning, compaction, and what the report says about size and speed ------------------

SIZE_KEYS = [f"{name}_{when}" for name in ("parameters", "nonzero_parameters", "flops_per_sample", "file_bytes",
                                           "latency_ms") for when in ("before", "after")]


def digits_split(model_name):
    from mfac.cli.tasks import load_task

    split = load_task("digits", 0).split
    return split.flattened() if model_name == "mlp" else split


def masked_model(model_name, path):
    """The CLI's built-in model with the (masked, dense) weights of ``path``."""
    from mfac.checkpoint import load_weights
    from mfac.cli.tasks import build_model, load_task

    model = build_model(model_name, load_task("digits", 0))
    model.load_state_dict(load_weights(path))
    return model.eval()


@pytest.mark.parametrize("model,structure", [("mlp", "neurons"), ("cnn", "channels,neurons")])
def test_structured_prune_compacts_a_built_in_model(model, structure, tmp_path):
    from mfac.checkpoint import load_weights
    from mfac.cli.compacted import load_compacted_model, read_recipe
    from mfac.prune.compact import shrink_to_state
    from mfac.cli.tasks import build_model, load_task
    from mfac.training import accuracy

    out = tmp_path / "structured"
    result = mfac("prune", "--model", model, "--allow-untrained", "--structure", structure, "--compact",
                  "--sparsity", 0.5,
                  "--num-grads", 16, "--recompute", 2, "--latency-runs", 3, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == ["pruned.safetensors", "masks.safetensors", "compacted.safetensors", "report.md",
                               "report.json"]
    assert set(SIZE_KEYS) <= set(report) and report["settings"]["structure"] == structure.split(",")
    assert report["structure_sparsity"] == 0.5
    assert set(report["structures"]) == set(structure.split(","))
    assert all(n["after"] == n["before"] // 2 for n in report["structures"].values())
    assert report["compacted"]["structure_sizes"] == report["structure_sizes"]
    assert "multiply-adds" in report["measurement"]["flops_convention"]
    assert report["measurement"]["latency"]["batch_size"] == 32 and report["latency_ms_after"] > 0
    # the compacted file reloads, is smaller, and predicts exactly what the report says
    path = out / "compacted.safetensors"
    compacted = load_compacted_model(path)
    assert read_recipe(path)["structure_sizes"] == report["structure_sizes"]
    assert sum(p.numel() for p in compacted.parameters()) == report["parameters_after"] < report["parameters_before"]
    assert report["flops_per_sample_after"] < report["flops_per_sample_before"]
    assert report["file_bytes_after"] == path.stat().st_size == report["file_bytes"]["compacted.safetensors"]
    assert report["file_bytes_after"] < report["file_bytes_before"] == (out / "pruned.safetensors").stat().st_size
    split = digits_split(model)
    assert accuracy(compacted, split.test_x, split.test_y) == report["compacted"]["test_accuracy"]
    assert abs(report["compacted"]["test_accuracy"] - report["test_accuracy_after"]) <= 1 / len(split.test_y)
    masked = masked_model(model, out / "pruned.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(compacted(split.test_x), masked(split.test_x), rtol=1e-4, atol=1e-5)
    # the recipe in the docs: shrink a freshly built model to the saved shapes, then load the weights
    fresh = build_model(model, load_task("digits", 0))
    state = load_weights(path)
    shrink_to_state(fresh, state)
    fresh.load_state_dict(state)
    if model == "mlp":  # the FLOP convention: multiply-adds of the Linear layers, 64 -> hidden -> 10
        hidden = report["structure_sizes"]["1"][1]
        assert (report["flops_per_sample_before"], report["flops_per_sample_after"]) == (64 * 64 + 64 * 10,
                                                                                       64 * hidden + hidden * 10)
    assert "compacted.safetensors" in result.stdout and "multiply-adds per sample" in result.stdout


@pytest.mark.parametrize("structure,scope,loads_in", [("neurons", "layer", "transformers"),
                                                      ("heads,neurons", "global", "mfac")])
def test_structured_prune_compacts_a_hugging_face_model(tiny_hf, tmp_path, structure, scope, loads_in):
    transformers = pytest.importorskip("transformers")
    model_dir, data_dir = tiny_hf
    out = tmp_path / "structured"
    result = mfac("prune", "--model", f"hf:{model_dir}", "--data", f"tsv:{data_dir}", "--batch-size", 8,
                  "--structure", structure, "--scope", scope, "--compact", "--sparsity", 0.5, "--num-grads", 16,
                  "--per-sample", "--block-size", 16, "--recompute", 2, "--latency-runs", 3, "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == ["model/", "masks.safetensors", "compacted/", "report.md", "report.json"]
    assert set(SIZE_KEYS) <= set(report)
    assert report["compacted"]["loads_in"] == loads_in
    assert f"plain transformers loads it: {'yes' if loads_in == 'transformers' else 'no'}" in result.stdout
    assert report["structures"]["neurons"] == {"before": 64, "after": 32}
    if "heads" in structure:
        assert report["structures"]["heads"] == {"before": 4, "after": 2}
    masked = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    if loads_in == "transformers":
        compacted = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "compacted")).eval()
    else:
        from mfac.hf_compact import load_compacted

        compacted = load_compacted(out / "compacted")
    assert sum(p.numel() for p in compacted.parameters()) == report["parameters_after"] < report["parameters_before"]
    assert report["flops_per_sample_after"] < report["flops_per_sample_before"]
    assert report["file_bytes_after"] == (out / "compacted" / "model.safetensors").stat().st_size \
        < report["file_bytes_before"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "compacted"))
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(compacted(**batch).logits, masked(**batch).logits, rtol=1e-4, atol=1e-5)


STRUCTURE_USAGE = [
    (["--compact"], "--compact needs --structure"),
    (["--structure", "neurons", "--pattern", "2:4"], "--structure neurons cannot be combined with --pattern 2:4"),
    (["--structure", "neurons", "--gradual"], "--structure neurons prunes one-shot"),
    (["--structure", "rows"], "argument --structure: expected neurons, channels or heads"),
    (["--structure", "heads"], "--structure heads: --model mlp has no heads to remove; it has neurons"),
    (["--model", "cnn", "--structure", "heads,channels"], "--model cnn has no heads to remove; it has neurons and "
                                                          "channels"),
]


@pytest.mark.parametrize("args,fragment", STRUCTURE_USAGE,
                         ids=["compact-alone", "with-pattern", "with-gradual", "unknown", "heads-mlp", "heads-cnn"])
def test_structure_usage_errors_exit_2_with_one_line(args, fragment, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(mfac("prune", "--allow-untrained", *args, "--out", out), 2)
    assert fragment in line, line
    assert not out.exists()


def test_structure_that_a_hugging_face_model_lacks(tiny_hf, tmp_path):
    model_dir, data_dir = tiny_hf
    line = one_line_error(mfac("prune", "--model", f"hf:{model_dir}", "--data", f"tsv:{data_dir}", "--structure",
                               "channels", "--out", tmp_path / "x", "--quiet"), 2)
    assert "--structure channels" in line and "has no channels to remove; it has neurons and heads" in line
    assert not (tmp_path / "x").exists()


def test_unstructured_prune_also_writes_values_and_a_bitmask(tmp_path):
    from mfac.checkpoint import load_weights
    from mfac.sparse_io import load_sparse

    out = tmp_path / "sparse"
    result = mfac("prune", "--allow-untrained", "--sparsity", 0.95, "--num-grads", 16, "--recompute", 2,
                  "--latency-runs", 3, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == ["pruned.safetensors", "masks.safetensors", "pruned.sparse.safetensors", "report.md",
                               "report.json"]
    sizes = {name: (out / name).stat().st_size for name in report["files"][:3]}
    assert report["file_bytes"] == sizes
    assert sizes["pruned.sparse.safetensors"] < sizes["pruned.safetensors"] / 4
    assert (report["file_bytes_before"], report["file_bytes_after"]) == (sizes["pruned.safetensors"],
                                                                         sizes["pruned.sparse.safetensors"])
    assert report["parameters_before"] == report["parameters_after"] > report["nonzero_parameters_after"]
    assert report["flops_per_sample_before"] == report["flops_per_sample_after"]  # zeros stored densely still count
    weights, masks = load_sparse(out / "pruned.sparse.safetensors")
    dense, saved_masks = load_weights(out / "pruned.safetensors"), load_weights(out / "masks.safetensors")
    assert weights.keys() == dense.keys() and all(torch.equal(weights[k], dense[k]) for k in dense)
    assert masks.keys() == saved_masks.keys() and all(torch.equal(masks[k], saved_masks[k]) for k in masks)


def test_structure_help_and_kinds(monkeypatch, capsys):
    from mfac.cli.parser import STRUCTURES, build_parser
    from mfac.prune.structures import KINDS

    assert STRUCTURES == KINDS
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    help_text = capsys.readouterr().out
    assert "comma list such as heads,neurons" in help_text and "with --structure: also write the model" in help_text
    assert "before and after a one-shot prune (default: 20)" in help_text


# Issue 21: no finished work thrown away, labels that fit the head, requests the data can supply ---

def test_out_through_a_symlink_to_another_file_system_keeps_the_results(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    import shutil
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="mfac-test-out-", dir=shm))
    try:
        link = tmp_path / "link"
        link.symlink_to(target)
        result = mfac("prune", "--allow-untrained", "--method", "magnitude", "--latency-runs", 1, "--quiet",
                      "--out", link)
        assert result.returncode == 0, result.stderr
        report = json.loads((target / "report.json").read_text())
        assert sorted(report["files"]) == sorted(p.name for p in target.iterdir())  # no staging folder left
        assert not list(tmp_path.glob(".*partial*"))
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_a_dangling_symlink_as_out_is_a_usage_error_before_any_work(tmp_path):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere" / "out")
    for command in (["prune", "--allow-untrained"], ["train"], ["demo"]):
        line = one_line_error(mfac(*command, "--out", link), 2)
        assert f"--out: {link} is a symbolic link to {tmp_path / 'nowhere' / 'out'}, which does not exist" in line
    assert not (tmp_path / "nowhere").exists()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "symbolic link that does not lead to a folder" in one_line_error(mfac("train", "--out", loop), 2)


def test_results_that_cannot_be_moved_into_out_are_kept(tmp_path, monkeypatch, capsys):
    """The final rename fails (as across file systems): the finished results stay where they are, and
    the one line says where."""
    import errno

    import mfac.cli.output
    from mfac.cli import main

    def cross_device(staging, dest):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(mfac.cli.output, "publish", cross_device)
    monkeypatch.delenv("MFAC_DEBUG", raising=False)
    out = tmp_path / "out"
    assert main(["prune", "--allow-untrained", "--method", "magnitude", "--latency-runs", "1", "--quiet",
                 "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert "the results are complete but could not be moved into --out" in line and "Invalid cross-device" in line
    kept = [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert len(kept) == 1 and f"kept in {kept[0]}" in line
    assert json.loads((kept[0] / "report.json").read_text())["files"][0] == "pruned.safetensors"
    assert (kept[0] / "pruned.safetensors").is_file() and not out.exists()


def test_num_grads_beyond_the_data_is_refused_with_the_numbers(tmp_path):
    line = one_line_error(mfac("prune", "--allow-untrained", "--num-grads", 100000000, "--out", tmp_path / "x"), 2)
    assert "--num-grads 100000000" in line and "42 batches of --batch-size 32" in line and "--num-grads 42" in line
    line = one_line_error(mfac("prune", "--allow-untrained", "--num-grads", 5000, "--per-sample",
                               "--out", tmp_path / "x"), 2)
    assert "--num-grads 5000" in line and "1,344 samples" in line and "--num-grads 1344 or fewer" in line
    line = one_line_error(mfac("prune", "--gradual", "--steps", 10, "--num-grads", 500, "--out", tmp_path / "x"), 2)
    assert "--num-grads 500" in line and "42 batches" in line
    assert not (tmp_path / "x").exists()


def test_num_grads_left_out_is_what_the_data_holds():
    from argparse import Namespace

    from mfac.cli.prune_jobs import resolve_num_grads

    args = Namespace(method="obs", per_sample=False, num_grads=None, batch_size=32)
    resolve_num_grads(args, 1344, 42, defaults.PRUNE_NUM_GRADS)
    assert args.num_grads == 42
    args = Namespace(method="obs", per_sample=True, num_grads=None, batch_size=32)
    resolve_num_grads(args, 1344, 42, defaults.PRUNE_NUM_GRADS)
    assert args.num_grads == defaults.PRUNE_NUM_GRADS


@pytest.fixture(scope="module")
def head_models(tiny_hf, tmp_path_factory):
    """Fine-tuned-looking classification heads of 2 and 3 labels (folders with their tokenizer)."""
    transformers = pytest.importorskip("transformers")
    model_dir, _ = tiny_hf
    root = tmp_path_factory.mktemp("heads")
    folders = {}
    for labels in (2, 3):
        folder = root / f"head{labels}"
        torch.manual_seed(labels)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=labels)
        model.save_pretrained(str(folder))
        transformers.AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(folder))
        folders[labels] = folder
    return folders


def relabelled(data_dir: Path, folder: Path, relabel) -> Path:
    folder.mkdir()
    for path in data_dir.glob("*.tsv"):
        lines = path.read_text().splitlines()
        rows = [line.split("\t", 1) for line in lines[1:]]
        (folder / path.name).write_text("\n".join([lines[0], *(f"{relabel(label)}\t{text}" for label, text in rows)])
                                        + "\n")
    return folder


def test_labels_must_fit_the_head_of_the_model(tiny_hf, head_models, tmp_path):
    model_dir, data_dir = tiny_hf
    shifted = relabelled(data_dir, tmp_path / "shifted", lambda label: int(label) + 1)  # 1/2 instead of 0/1
    real = relabelled(data_dir, tmp_path / "real", lambda label: f"{int(label) * 0.5 + 0.25:g}")  # a regression TSV
    common = ["--per-sample", "--num-grads", 4, "--quiet", "--out", tmp_path / "x"]
    line = one_line_error(mfac("prune", "--model", f"hf:{head_models[2]}", "--data", f"tsv:{shifted}", *common), 2)
    assert "mini_train.tsv / mini_dev.tsv" in line and "are {1, 2}" in line and "has 2 labels, 0..1" in line
    assert "--new-head" in line
    line = one_line_error(mfac("prune", "--model", f"hf:{head_models[3]}", "--data", f"tsv:{data_dir}", *common), 2)
    assert "are {0, 1}" in line and "has 3 labels, 0..2" in line and "fresh 2-label" in line
    line = one_line_error(mfac("train", "--model", f"hf:{model_dir}", "--data", f"tsv:{real}", *common[3:]), 2)
    assert "real numbers such as 0.25" in line and "mini_train.tsv" in line
    line = one_line_error(mfac("train", "--model", f"hf:{model_dir}", "--data", f"tsv:{shifted}", *common[3:]), 2)
    assert "integer labels must be 0..1" in line  # a new head: no unused output for a label 0 nobody has
    assert not (tmp_path / "x").exists()


def test_new_head_replaces_the_head_on_request(tiny_hf, head_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, data_dir = tiny_hf
    result = mfac("train", "--model", f"hf:{head_models[3]}", "--data", f"tsv:{data_dir}", "--new-head", "--steps", 1,
                  "--optimizer", "adam", "--checkpoint-every", 0, "--batch-size", 8, "--quiet", "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    trained = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "t" / "model"))
    assert trained.config.num_labels == 2
    kept = mfac("train", "--model", f"hf:{tmp_path / 't' / 'model'}", "--data", f"tsv:{data_dir}", "--steps", 1,
                "--optimizer", "adam", "--checkpoint-every", 0, "--batch-size", 8, "--quiet", "--out", tmp_path / "u")
    assert kept.returncode == 0, kept.stderr  # its own 0/1 head fits: kept, no flag needed


# Issue 23: defaults that fit the model, the CLI's own words, reports, one name for the pruned model --

def test_hugging_face_training_uses_the_transformer_recipe_and_states_its_memory(tiny_hf, tmp_path):
    model_dir, data_dir = tiny_hf
    result = mfac("train", "--model", f"hf:{model_dir}", "--data", f"tsv:{data_dir}", "--steps", 2, "--batch-size", 8,
                  "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    recipe = defaults.TRANSFORMER_RECIPE
    settings = report["settings"]
    assert (settings["lr"], settings["window"], settings["damp"], settings["density"], settings["window_dtype"],
            settings["max_grad_norm"]) == (recipe.lr, recipe.window, recipe.damp, recipe.density, "bfloat16", 1.0)
    memory = [line for line in result.stdout.splitlines() if line.startswith("memory:")]
    assert len(memory) == 1 and "window of 1024 gradients" in memory[0] and "bfloat16 at density 0.01" in memory[0]
    assert "one checkpoint:" in memory[0] and report["memory"]["optimizer_bytes"] > 0
    assert report["evaluated_on"] == "dev" and "dev accuracy" in result.stdout and "test accuracy" not in result.stdout
    for bar in ("it/s", "Loading weights", "Writing model shards"):  # transformers' own progress bars are silenced
        assert bar not in result.stderr, result.stderr
    markdown = (tmp_path / "t" / "report.md").read_text()
    assert markdown.startswith("# mfac train") and "| dev accuracy |" in markdown and "| --density | 0.01 |" in markdown


def test_train_refuses_what_cannot_fit_and_checkpoints_can_be_turned_off(tmp_path):
    line = one_line_error(mfac("train", "--window", 100000000, "--out", tmp_path / "x"), 2)
    assert "MFAC's window of 100000000 gradients" in line and "is available" in line
    assert "lower --window" in line and "--density" in line and "--window-dtype bfloat16" in line
    assert not (tmp_path / "x").exists()
    out = tmp_path / "off"
    result = mfac("train", "--steps", 5, "--checkpoint-every", 0, "--window-dtype", "bfloat16", "--density", 0.5,
                  "--window", 8, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "no checkpoints (--checkpoint-every 0)" in result.stdout and not (out / "checkpoint.pt").exists()
    report = json.loads((out / "report.json").read_text())
    assert "checkpoint.pt" not in report["files"] and report["settings"]["window_dtype"] == "bfloat16"
    line = one_line_error(mfac("train", "--resume", out), 2)
    assert "--checkpoint-every 0" in line and "nothing to resume" in line


def test_messages_use_the_command_lines_words(tmp_path):
    line = one_line_error(mfac("prune", "--window", 5), 2)
    assert "unrecognized arguments: --window 5" in line and "(see mfac prune --help)" in line
    line = one_line_error(mfac("prune", "--allow-untrained", "--method", "magnitude", "--pattern", "2:3",
                               "--out", tmp_path / "x"), 2)
    assert "--pattern 2:3" in line and "divides by 3" in line and "params=" not in line and "--pattern 2:4" in line
    line = one_line_error(mfac("prune", "--gradual", "--steps", 200, "--prune-start", 150, "--prune-end", 100,
                               "--out", tmp_path / "x"), 2)
    assert "--prune-end 100 comes before --prune-start 150" in line and "end_step" not in line
    line = one_line_error(mfac("prune", "--pattern", "4:2"), 2)
    assert "argument --pattern" in line and "(see mfac prune --help)" in line
    line = one_line_error(mfac("prune", "--prune-every", 3, "--out", tmp_path / "x"), 2)
    assert "--prune-every applies to --gradual" in line
    assert not (tmp_path / "x").exists()


def test_every_option_has_help_with_its_default_and_every_command_a_description():
    import argparse

    from mfac.cli.parser import build_parser

    parser = build_parser()
    for name, sub in parser.commands.items():
        assert sub.description, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.option_strings)
            if action.nargs != 0:  # not a flag: its default is shown, or said in words when it is None
                assert action.default is not None or "default" in action.help, (name, action.option_strings)
    top = mfac("--help").stdout
    assert "hf:" in top and "train a built-in model or an hf: model" in top


def test_pruning_an_untrained_built_in_model_needs_allow_untrained(tmp_path):
    line = one_line_error(mfac("prune", "--model", "cnn", "--out", tmp_path / "x"), 2)
    assert "--model cnn without --checkpoint would prune an untrained model" in line and "--allow-untrained" in line
    assert not (tmp_path / "x").exists()


def test_one_shot_report_records_only_the_settings_it_used(tmp_path):
    out = tmp_path / "p"
    result = mfac("prune", "--allow-untrained", "--method", "magnitude", "--latency-runs", 1, "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert not {"gradual", "steps", "optimizer", "lr", "prune_start", "prune_end", "checkpoint_every", "density",
                "num_grads", "recompute", "max_length"} & set(report["settings"])
    markdown = (out / "report.md").read_text()
    assert "## Per-layer sparsity" in markdown and "| test accuracy |" in markdown
    assert all(f"`{name}`" in markdown for name in report["per_tensor_sparsity"])


def test_gradual_prune_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """A --gradual run stopped after its step-14 checkpoint and resumed ends with the same pruned
    model, bit for bit, as one that ran straight through (per-sample OBS with a partial batch, so
    that the position in OBS's batches matters)."""
    import mfac.cli.prune_gradual as gradual
    from mfac.checkpoint import load_weights
    from mfac.cli import main

    monkeypatch.delenv("MFAC_DEBUG", raising=False)
    common = ["prune", "--gradual", "--steps", "24", "--optimizer", "mfac", "--sparsity", "0.8", "--per-sample",
              "--num-grads", "40", "--recompute", "2", "--checkpoint-every", "7", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    real = gradual.GradualPruner

    class Killed(real):
        def step(self):
            if self.current_step == 16:
                raise RuntimeError("killed")
            return super().step()

    monkeypatch.setattr(gradual, "GradualPruner", Killed)
    assert main([*common, "--out", str(tmp_path / "stopped")]) == 1
    assert not (tmp_path / "stopped" / "pruned.safetensors").exists()
    monkeypatch.setattr(gradual, "GradualPruner", real)
    capsys.readouterr()
    assert main(["prune", "--resume", str(tmp_path / "stopped"), "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs from the resumed run's" in capsys.readouterr().err
    assert main(["prune", "--resume", str(tmp_path / "stopped"), "--quiet"]) == 0
    expected = load_weights(tmp_path / "straight" / "pruned.safetensors")
    got = load_weights(tmp_path / "stopped" / "pruned.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    report = json.loads((tmp_path / "stopped" / "report.json").read_text())
    assert report["gradual"]["resumed_at_steps"] == [14] and len(report["gradual"]["batch_losses"]) == 24
    assert not {"pattern", "structure", "compact"} & set(report["settings"])
    assert (tmp_path / "stopped" / "report.md").read_text().startswith("# mfac prune --gradual")
    line = one_line_error(mfac("prune", "--resume", tmp_path / "nothing"), 2)
    assert "no checkpoint.pt there" in line and "mfac prune --gradual" in line


def test_a_model_folder_with_only_its_config_is_a_usage_error(tiny_hf, tmp_path):
    model_dir, data_dir = tiny_hf
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    line = one_line_error(mfac("train", "--model", f"hf:{folder}", "--data", f"tsv:{data_dir}", "--out", tmp_path / "x"),
                          2)
    assert line.startswith(f"mfac train: error: --model hf:{folder}") and not (tmp_path / "x").exists()


def load_benchmark(name):
    """A script of benchmarks/ as a module (its folder on sys.path: the scripts import each other)."""
    import importlib

    folder = ROOT / "benchmarks"
    if not (folder / f"{name}.py").exists():
        pytest.skip("benchmarks/ is only in a source checkout")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return importlib.import_module(name)


def test_bench_quick_tables_show_repeats_and_spread_and_flag_an_inconsistent_floor():
    # The quick mode itself takes minutes (and longer on a busy machine): its formatting is tested on a
    # real measurement at a tiny size, and on made-up rows for the floor check.
    fisher = load_benchmark("fisher")
    assert fisher.spread([0.003, 0.001, 0.002]) == "2.00 [1.00-3.00]"
    assert fisher.spread([1.5, 2.0, 1.0], 1, 3) == "1.500 [1.000-2.000]"
    row = fisher.measure(1000, 8, 4, warmup=2, setup_reps=2)
    assert {len(samples) for name, samples in row["samples"].items() if "setup" not in name} == {4}
    assert len(row["samples"]["static_setup"]) == len(row["samples"]["block_setup"]) == 2
    header, rule, line = fisher.quick_rows([row], 4)
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[:5] == ["d", "m", "reps", "floor ms", "push_ihvp ms"] and "block128 ihvp ms" in columns
    cells = dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|"))))
    assert cells["reps"] == "4" and cells["d"] == "1,000" and len(rule) == len(header) == len(line)
    for name in ("floor ms", "push_ihvp ms", "m x m ms", "static setup s", "static ihvp ms", "block128 ihvp ms"):
        median, low, high = map(float, cells[name].replace("[", " ").replace("]", " ").replace("-", " ").split())
        assert low <= median <= high, (name, cells[name])
    for name in ("floor ms", "push_ihvp ms", "/floor", "reps", "m x m ms"):
        assert name in fisher.QUICK_LEGEND  # every column is explained
    rows = [{"d": 10_000, "m": 64, "floor": 2e-3}, {"d": 10_000, "m": 256, "floor": 1e-3},
            {"d": 100_000, "m": 64, "floor": 1e-3}, {"d": 100_000, "m": 256, "floor": 4e-3}]
    notes = fisher.floor_notes(rows)
    assert len(notes) == 1 and "d = 10,000" in notes[0] and "m = 64" in notes[0] and "busy" in notes[0]
    optimizer = load_benchmark("optimizer")
    assert "reps" in optimizer.QUICK_LEGEND and "[min-max]" in optimizer.QUICK_LEGEND
    pruning = load_benchmark("pruning")
    assert pruning.QUICK_REPS >= 3 and "[min-max]" in pruning.QUICK_LEGEND


def test_bench_introduces_and_times_every_script(tmp_path):
    from mfac.cli.bench import ABOUT, SCRIPTS

    for script in SCRIPTS:  # stand-ins that print their arguments, so nothing slow runs here
        (tmp_path / script[0]).write_text("import sys\nprint('ran', *sys.argv[1:])\n")
    result = mfac("bench", "--benchmarks", tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "median and [min-max]" in out and "explains its columns" in out
    for script in SCRIPTS:
        assert f"$ python {tmp_path.name}/{' '.join(script)}\n# {ABOUT[script[0]]}" in out
        assert f"ran {' '.join(script[1:])}" in out and f"# {script[0]} took " in out
    help_text = mfac("bench", "--help").stdout
    assert "fisher.py --quick" in help_text and "minutes" in help_text


def test_a_model_folder_whose_torch_weights_run_code_is_refused(tiny_hf, tmp_path):
    import shutil

    model_dir, data_dir = tiny_hf
    folder = tmp_path / "bert"
    shutil.copytree(model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"weight": RunsCode()}, folder / "pytorch_model.bin")  # a torch file that would run code
    message = one_line_error(mfac("prune", "--model", f"hf:{folder}", "--data", f"tsv:{data_dir}", "--quiet",
                                  "--out", tmp_path / "out"), 2)
    assert "pytorch_model.bin was refused" in message and "--model" in message
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("window_dtype,density", [("float32", 1.0), ("bfloat16", 1.0), ("bfloat16", 0.25)])
def test_the_checkpoint_estimate_covers_a_saved_state_closely(window_dtype, density):
    """The checkpoint size stated before training (the model, and the optimizer's saved state: rows,
    Gram matrix, factor, momentum; no buffers kept only for reuse) is at least what torch.save writes
    for a full window, and not far above it."""
    import io

    from mfac import MFAC
    from mfac.cli.budget import estimate
    from mfac.cli.optimizers import DTYPES

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Linear(40, 10))
    opt = MFAC(model.parameters(), lr=0.1, window=32, damp=1e-2, window_dtype=DTYPES[window_dtype], density=density)
    for _ in range(40):
        opt.zero_grad()
        model(torch.randn(8, 300)).square().sum().backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    stated = estimate(model, "mfac", {"momentum": 0.0, "window": 32, "density": density,
                                      "window_dtype": window_dtype})["checkpoint_bytes"]
    assert buffer.tell() <= stated <= 1.15 * buffer.tell(), (buffer.tell(), stated)
