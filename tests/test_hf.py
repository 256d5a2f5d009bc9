"""MFAC and gradual pruning inside Hugging Face's Trainer, on a tiny BERT with a test-written vocabulary."""

import json
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import tiny_bert  # noqa: E402
from mfac import MFAC  # noqa: E402
from mfac.hf import SCHEDULE_FILE, STATE_FILE, PruningCallback, default_pruning_params  # noqa: E402

SENTENCES = ["the movie was good", "a very boring film", "great fun", "the plot is not good at all it was awful",
             "love it", "i hate the actors", "not bad", "a great great movie with very good actors",
             "boring", "very very good", "awful plot", "fun fun fun film"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1]


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.items = [dict(tokenizer(text), labels=label) for text, label in zip(SENTENCES, LABELS)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_trainer(tokenizer, output_dir, model=None, callbacks=(), max_steps=6, **overrides):
    model = model if model is not None else tiny_bert()
    settings = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                    learning_rate=1e-2, save_steps=3, save_strategy="steps", logging_steps=1, report_to=[],
                    use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=1.0)
    settings.update(overrides)
    extra = {}
    if "optimizers" not in settings and "optimizer_cls_and_kwargs" not in settings:
        extra["optimizer_cls_and_kwargs"] = (MFAC, {"lr": 1e-2, "window": 4, "damp": 1e-2})
    for key in ("optimizers", "optimizer_cls_and_kwargs", "processing_class"):
        if key in settings:
            extra[key] = settings.pop(key)
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(model=model, args=args, train_dataset=Sentences(tokenizer),
                                data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                callbacks=list(callbacks), **extra), model


class StopAt(transformers.TrainerCallback):
    """Ends training after a step, as a kill right after that step's checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def inner(optimizer):
    """Trainer wraps the optimizer (accelerate's AcceleratedOptimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def mean_loss(model, tokenizer):
    model.eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return float(model(**batch, labels=torch.tensor(LABELS)).loss)


def test_trainer_trains_with_mfac_from_optimizer_cls_and_kwargs(tokenizer, tmp_path):
    """Gradient accumulation, clipping and the default linear LR schedule, MFAC underneath."""
    trainer, model = make_trainer(tokenizer, tmp_path, max_steps=12, gradient_accumulation_steps=2)
    before, start = weights(model), mean_loss(model, tokenizer)
    trainer.train()
    optimizer = inner(trainer.optimizer)
    assert isinstance(optimizer, MFAC) and optimizer.fisher.window == 4
    assert optimizer.steps == 12 and optimizer.param_groups[0]["lr"] == 0.0
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert mean_loss(model, tokenizer) < start - 0.005  # it learns (0.693 -> 0.684 measured)


def test_trainer_resumes_mfac_bitwise(tokenizer, tmp_path):
    """Six steps straight, or three, a new process-like restart from checkpoint-3, and three more:
    the same weights bit for bit (CPU, dropout off). Trainer loads the optimizer with weights_only=True."""
    straight, model_a = make_trainer(tokenizer, tmp_path / "a")
    straight.train()
    first, _ = make_trainer(tokenizer, tmp_path / "b", callbacks=[StopAt(3)])
    first.train()
    assert (tmp_path / "b" / "checkpoint-3" / "optimizer.pt").is_file()
    resumed, model_b = make_trainer(tokenizer, tmp_path / "b", model=tiny_bert(seed=5))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert isinstance(inner(resumed.optimizer), MFAC)
    for name, value in model_a.named_parameters():
        assert torch.equal(value, dict(model_b.named_parameters())[name]), name


def test_trainer_takes_an_mfac_instance_with_its_scheduler(tokenizer, tmp_path):
    model = tiny_bert()
    optimizer = MFAC(model.parameters(), lr=1e-2, window=4, damp=1e-2)
    trainer, _ = make_trainer(tokenizer, tmp_path, model=model, optimizers=(optimizer, None),
                              lr_scheduler_type="linear", max_steps=4)
    trainer.train()
    assert inner(trainer.optimizer) is optimizer
    assert optimizer.param_groups[0]["lr"] == 0.0  # the linear schedule reached its end


def test_default_pruning_params_are_the_encoder_linears():
    model = tiny_bert()
    names = default_pruning_params(model)
    assert len(names) == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    assert all(".encoder.layer." in n and n.endswith(".weight") for n in names)
    with pytest.raises(ValueError, match="params"):
        default_pruning_params(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_pruning_callback_follows_the_schedule_and_keeps_masks(tokenizer, tmp_path, method):
    callback = PruningCallback(0.6, start_step=2, end_step=6, every=2, method=method, num_grads=4, block_size=8)
    trainer, model = make_trainer(tokenizer, tmp_path, callbacks=[callback], max_steps=8,
                                  optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-2}))
    seen = {}

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            named = dict(model.named_parameters())
            seen[state.global_step] = callback.sparsity
            for name, mask in callback.pruner.masks.items():
                assert torch.all(named[name][~mask] == 0), (state.global_step, name)

    trainer.add_callback(Watch())
    trainer.train()
    pruner = callback.pruner
    total = sum(m.numel() for m in pruner.masks.values())
    for step, sparsity in seen.items():
        expected = pruner.target_sparsity(max(s for s in (0, 2, 4, 6) if s <= step)) if step >= 2 else 0.0
        assert abs(sparsity - expected) <= 1 / total + 1e-12, (step, sparsity, expected)
    assert sum(int((~m).sum()) for m in pruner.masks.values()) == round(0.6 * total)
    logged = [entry["sparsity"] for entry in trainer.state.log_history if "sparsity" in entry]
    assert logged and logged[-1] == pytest.approx(callback.sparsity)
    assert callback.compacted_folder is None and not (tmp_path / "compacted").exists()  # unstructured: no compaction
    # The saved model is plain and loads in plain transformers with the zeros.
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    named = dict(reloaded.named_parameters())
    for name, mask in pruner.masks.items():
        assert torch.all(named[name][~mask] == 0) and not torch.all(named[name][mask] == 0)


def test_pruning_callback_resumes_from_a_checkpoint(tokenizer, tmp_path):
    def run(folder, max_steps, resume=None):
        callback = PruningCallback(0.5, start_step=1, end_step=5, every=2, method="magnitude")
        trainer, model = make_trainer(tokenizer, folder, callbacks=[callback, StopAt(max_steps)], max_steps=6)
        trainer.train(resume_from_checkpoint=resume)
        return callback, model

    straight, model_a = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    saved = json.loads((tmp_path / "b" / "checkpoint-3" / "mfac_pruning.json").read_text())
    assert saved["step"] == 3 and (tmp_path / "b" / "checkpoint-3" / STATE_FILE).is_file()
    resumed, model_b = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert resumed.pruner.current_step == 6
    for name, mask in straight.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name])
    for name, value in model_a.named_parameters():
        assert torch.equal(value, dict(model_b.named_parameters())[name]), name


def test_pruning_callback_resumes_a_checkpoint_written_without_it(tokenizer, tmp_path):
    """No state files (Trainer ran without the callback): the state is rebuilt from the weights."""
    trainer, _ = make_trainer(tokenizer, tmp_path, max_steps=3)
    trainer.train()
    callback = PruningCallback(0.5, start_step=1, end_step=5, every=2, method="magnitude")
    resumed, _ = make_trainer(tokenizer, tmp_path, callbacks=[callback], max_steps=6)
    with pytest.warns(UserWarning, match="rebuilt from the model's weights"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert callback.pruner.current_step == 6 and callback.sparsity == pytest.approx(0.5, abs=1e-3)


def test_pruning_callback_validates_its_arguments():
    with pytest.raises(ValueError, match="end_step"):
        PruningCallback(0.5, start_step=5, end_step=2, every=1)
    with pytest.raises(ValueError, match="final_sparsity"):
        PruningCallback(1.5, start_step=1, end_step=2, every=1)
    with pytest.raises(ValueError, match="method"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, method="random")
    with pytest.raises(ValueError, match="num_grads"):  # the pruning settings too, when the callback is made
        PruningCallback(0.5, start_step=1, end_step=2, every=1, num_grads=0)
    with pytest.raises(ValueError, match="block_size"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, block_size=0)


def test_pruning_callback_defaults_come_from_mfac_defaults():
    from mfac import defaults

    settings = PruningCallback(0.5, start_step=1, end_step=2, every=1).settings
    assert (settings.num_grads, settings.block_size, settings.recompute, settings.relative_damp, settings.per_sample) \
        == (defaults.GRADUAL_NUM_GRADS, defaults.PRUNE_BLOCK_SIZE, defaults.GRADUAL_RECOMPUTE,
            defaults.PRUNE_RELATIVE_DAMP, True)
    same = PruningCallback(0.5, start_step=1, end_step=2, every=1, num_grads=None, block_size=None, recompute=None)
    assert same.settings == settings  # None means the default here as everywhere
    assert PruningCallback(0.5, start_step=1, end_step=2, every=1, block_size=defaults.EXACT).settings.exact


def test_trainer_with_mfac_under_bf16_mixed_precision(tokenizer, tmp_path):
    """Trainer's CPU autocast (bf16=True): activations in bfloat16, parameters, gradients and the
    window in float32."""
    trainer, model = make_trainer(tokenizer, tmp_path, max_steps=6, bf16=True, save_strategy="no")
    seen = []
    model.classifier.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.train()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # autocast was on
    optimizer = inner(trainer.optimizer)
    assert optimizer.steps == 6 and optimizer.skipped_steps == 0
    assert optimizer.fisher.storage_dtype == torch.float32
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


# Structured pruning inside Trainer --------------------------------------------------------------------------


def logits(model, tokenizer):
    model.eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("structure,method,scope,kept,format_", [
    ("heads", "obs", "global", {"heads": 2}, "mfac"),  # 2 of 4 heads kept, one per layer
    ("neurons", "magnitude", "layer", {"neurons": 24}, "transformers"),  # 12 of 24 kept in each layer
])
def test_structured_pruning_callback_saves_the_compacted_model(tokenizer, tmp_path, structure, method, scope, kept,
                                                               format_):
    from mfac.hf_compact import load_compacted

    callback = PruningCallback(0.5, start_step=2, end_step=6, every=2, method=method, scope=scope, structure=structure,
                               num_grads=4, block_size=8)
    assert callback.compact_at_end  # the default with structure=
    trainer, model = make_trainer(tokenizer, tmp_path, callbacks=[callback], max_steps=8, processing_class=tokenizer,
                                  optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-2}))

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            named = dict(model.named_parameters())
            for name, mask in callback.pruner.masks.items():
                assert torch.all(named[name][~mask] == 0), (state.global_step, name)

    trainer.add_callback(Watch())
    trainer.train()
    pruner = callback.pruner
    assert pruner.structured and callback.sparsity == 0.5  # exactly: 2 of 4 heads, or 12 of 24 neurons per layer
    assert [entry["sparsity"] for entry in trainer.state.log_history if "sparsity" in entry][-1] == 0.5
    named = dict(model.named_parameters())
    for group, removed in zip(pruner.groups, pruner.removed_structures()):
        assert group.kind == structure
        for part in group.params:  # every entry of a removed structure is exactly zero after training
            values = named[part.name].detach().movedim(part.axis, 0).reshape(group.count, -1)
            assert torch.all(values[removed] == 0) and torch.all(values[~removed].abs().sum(1) > 0), part.name
    # The in-memory model is the full-size model with the zeros; the saved one is smaller.
    assert model.config.intermediate_size == 24 and model.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    expected = logits(model, tokenizer)
    folder = tmp_path / "compacted"
    assert callback.compacted_folder == folder and callback.compacted_format == format_
    assert (folder / "tokenizer_config.json").is_file()  # the Trainer's tokenizer is saved with it
    sizes = {}
    for name, (before, after) in callback.compaction.sizes.items():
        kind = "heads" if "attention" in name else "neurons"
        sizes[kind] = sizes.get(kind, 0) + after
    assert sizes == kept
    if format_ == "transformers":
        small = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
        assert small.config.intermediate_size == 12
    else:
        small = load_compacted(folder)
        assert [layer.attention.self.num_attention_heads for layer in small.bert.encoder.layer] == [1, 1]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.allclose(logits(small, tokenizer), expected, atol=1e-5)
    assert torch.allclose(logits(load_compacted(folder), tokenizer), expected, atol=1e-5)
    trainer.evaluate(Sentences(tokenizer))  # Trainer still works with the in-memory model


def test_structured_pruning_callback_resumes_from_a_checkpoint(tokenizer, tmp_path):
    def run(folder, max_steps, resume=None):
        callback = PruningCallback(0.5, start_step=1, end_step=5, every=2, method="magnitude", structure="neurons")
        trainer, model = make_trainer(tokenizer, folder, callbacks=[callback, StopAt(max_steps)], max_steps=6)
        trainer.train(resume_from_checkpoint=resume)
        return callback, model

    straight, model_a = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    saved = json.loads((tmp_path / "b" / "checkpoint-3" / "mfac_pruning.json").read_text())
    assert saved["step"] == 3 and saved["schedule"]["structure"] == ["neurons"]
    resumed, model_b = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert resumed.pruner.current_step == 6 and resumed.sparsity == straight.sparsity == 0.5
    for name, mask in straight.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name])
    for name, value in model_a.named_parameters():
        assert torch.equal(value, dict(model_b.named_parameters())[name]), name
    from mfac.hf_compact import load_compacted

    assert torch.equal(logits(load_compacted(tmp_path / "a" / "compacted"), tokenizer),
                       logits(load_compacted(tmp_path / "b" / "compacted"), tokenizer))
    # A callback with another structure refuses that checkpoint.
    other = PruningCallback(0.5, start_step=1, end_step=5, every=2, method="magnitude", structure="heads")
    trainer, _ = make_trainer(tokenizer, tmp_path / "b", callbacks=[other], max_steps=6)
    with pytest.raises(ValueError, match="schedule"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))


def test_structured_pruning_callback_validates_its_arguments(tokenizer, tmp_path):
    from mfac.prune import ParamSlice, StructureGroup

    with pytest.raises(ValueError, match="structure must be one of"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, structure="rows")
    with pytest.raises(ValueError, match="structure must be one of"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, structure=())
    with pytest.raises(ValueError, match="params="):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, structure="heads", params=["x.weight"])
    group = StructureGroup("a", "neurons", 2, (ParamSlice("a.weight", 0),))
    with pytest.raises(ValueError, match="not both"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, structure="heads", groups=[group])
    with pytest.raises(TypeError, match="groups"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, groups=["a"])
    with pytest.raises(ValueError, match="compact_at_end"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, compact_at_end=True)
    with pytest.raises(ValueError, match="compact_at_end"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, structure="heads", compact_at_end="yes")
    with pytest.raises(TypeError, match="pattern"):
        PruningCallback(0.5, start_step=1, end_step=2, every=1, structure="heads", pattern="2:4")
    assert not PruningCallback(0.5, start_step=1, end_step=2, every=1).compact_at_end
    assert not PruningCallback(0.5, start_step=1, end_step=2, every=1, structure="heads",
                               compact_at_end=False).compact_at_end
    # A model without such structures: refused when training begins, before any step.
    callback = PruningCallback(0.5, start_step=1, end_step=2, every=1, method="magnitude", structure="channels")
    trainer, model = make_trainer(tokenizer, tmp_path, callbacks=[callback], max_steps=3)
    before = weights(model)
    with pytest.raises(ValueError, match="found no channels"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# Pruning state: atomic, readable or refused by name, rebuilt from the weights, reproducible resumes ---------


def run_pruned(tokenizer, folder, stop, resume=None, method="magnitude", sparsity=0.5, **options):
    callback = PruningCallback(sparsity, start_step=1, end_step=5, every=2, method=method, **options)
    trainer, model = make_trainer(tokenizer, folder, callbacks=[callback, StopAt(stop)], max_steps=6)
    trainer.train(resume_from_checkpoint=resume)
    return callback, model


def assert_same_run(first, model_a, second, model_b):
    assert second.pruner.current_step == first.pruner.current_step == 6
    for name, mask in first.pruner.masks.items():
        assert torch.equal(mask, second.pruner.masks[name]), name
    for name, value in model_a.named_parameters():
        assert torch.equal(value, dict(model_b.named_parameters())[name]), name


def test_pruning_state_is_written_atomically_and_a_broken_file_is_named(tokenizer, tmp_path, monkeypatch):
    import mfac.hf_state

    written = []
    real = mfac.hf_state.atomic_write_bytes
    monkeypatch.setattr(mfac.hf_state, "atomic_write_bytes",
                        lambda path, data: written.append(path) or real(path, data))
    run_pruned(tokenizer, tmp_path / "b", 3)
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert checkpoint / SCHEDULE_FILE in written
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith("mfac")) == [SCHEDULE_FILE, STATE_FILE]
    for name in (SCHEDULE_FILE, STATE_FILE):  # half a file: an error naming it, not a bare JSONDecodeError
        spare = tmp_path / "copy"
        shutil.copytree(checkpoint, spare)
        data = (spare / name).read_bytes()
        (spare / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"{name} is unreadable"):
            run_pruned(tokenizer, tmp_path / "b", 6, resume=str(spare))
        shutil.rmtree(spare)


def test_pruning_callback_resumes_from_a_folder_outside_output_dir(tokenizer, tmp_path):
    straight, model_a = run_pruned(tokenizer, tmp_path / "a", 6)
    run_pruned(tokenizer, tmp_path / "b", 3)
    elsewhere = tmp_path / "elsewhere" / "saved"
    shutil.move(str(tmp_path / "b" / "checkpoint-3"), str(elsewhere))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PruningCallback")  # read from its files, not rebuilt
        resumed, model_b = run_pruned(tokenizer, tmp_path / "c", 6, resume=str(elsewhere))
    assert_same_run(straight, model_a, resumed, model_b)


@pytest.mark.parametrize("structure", [None, "neurons"])
def test_pruning_callback_rebuilds_a_missing_state_from_the_weights(tokenizer, tmp_path, structure):
    """A kill between Trainer's checkpoint (and rotation) and on_save: the folder has no state files."""
    options = {} if structure is None else {"structure": structure, "compact_at_end": False}
    straight, model_a = run_pruned(tokenizer, tmp_path / "a", 6, **options)
    run_pruned(tokenizer, tmp_path / "b", 3, **options)
    checkpoint = tmp_path / "b" / "checkpoint-3"
    (checkpoint / STATE_FILE).unlink()
    (checkpoint / SCHEDULE_FILE).unlink()
    with pytest.warns(UserWarning, match="rebuilt from the model's weights"):
        resumed, model_b = run_pruned(tokenizer, tmp_path / "b", 6, resume=str(checkpoint), **options)
    assert_same_run(straight, model_a, resumed, model_b)


def test_obs_pruning_callback_resumes_bit_for_bit(tokenizer, tmp_path):
    """OBS to 80%: each pruning step's gradient batches depend on (seed, step) only, so the resumed run
    ends with the uninterrupted run's masks and weights, bit for bit (MFAC underneath)."""
    options = dict(method="obs", sparsity=0.8, num_grads=4, block_size=8)
    straight, model_a = run_pruned(tokenizer, tmp_path / "a", 6, **options)
    run_pruned(tokenizer, tmp_path / "b", 3, **options)
    resumed, model_b = run_pruned(tokenizer, tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"),
                                  **options)
    assert straight.sparsity == pytest.approx(0.8, abs=1e-3)
    assert_same_run(straight, model_a, resumed, model_b)
