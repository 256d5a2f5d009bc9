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


def test_defaults_come_from_mfac_defaults(monkeypatch, capsys):
    from mfac.cli.parser import build_parser

    parser = build_parser()
    train = parser.parse_args(["train"])
    recipe = defaults.SMALL_MODEL_RECIPE
    assert (train.lr, train.window, train.damp, train.momentum) == (recipe.lr, recipe.window, recipe.damp,
                                                                    recipe.momentum)
    prune = parser.parse_args(["prune"])
    assert (prune.num_grads, prune.block_size) == (defaults.PRUNE_NUM_GRADS, defaults.PRUNE_BLOCK_SIZE)
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
    from mfac.cli import main

    seen = {}

    def pruner(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(mfac.cli.prune, "GradualPruner" if "--gradual" in given else "prune_oneshot", pruner)
    monkeypatch.delenv("MFAC_DEBUG", raising=False)
    assert main(["prune", *given, "--num-grads", "16", "--quiet", "--out", str(tmp_path / "x")]) == 1
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
    process = subprocess.Popen([sys.executable, "-m", "mfac", "demo", "--quick", "--out", str(out), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
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
    assert "is a file" in one_line_error(mfac("prune", "--out", tmp_path / "a_file" / "inside"), 2)
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
    assert report["files"] == ["model.safetensors", "masks.safetensors", "model.sparse.safetensors", "report.json"]
    assert report["file_bytes_after"] == report["file_bytes"]["model.sparse.safetensors"] < report["file_bytes_before"]
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
    result = mfac("prune", "--model", model, "--structure", structure, "--compact", "--sparsity", 0.5,
                  "--num-grads", 16, "--recompute", 2, "--latency-runs", 3, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == ["pruned.safetensors", "masks.safetensors", "compacted.safetensors", "report.json"]
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
    assert report["files"] == ["model/", "masks.safetensors", "compacted/", "report.json"]
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
    line = one_line_error(mfac("prune", *args, "--out", out), 2)
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
    result = mfac("prune", "--sparsity", 0.95, "--num-grads", 16, "--recompute", 2, "--latency-runs", 3,
                  "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == ["pruned.safetensors", "masks.safetensors", "pruned.sparse.safetensors", "report.json"]
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
