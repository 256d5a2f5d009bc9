"""prune_oneshot's answers to the common mistakes of a first day: each names the argument, what was
received and the fix, and comes before the model is touched; and its ``progress=`` output."""

import io

import pytest
import torch
from torch import nn

from mfac.progress import pruning_hooks
from mfac.prune import GradualPruner, prune_oneshot

QUICK = dict(sparsity=0.5, num_grads=4, recompute=2)


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def data(batches=4, size=8):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batches * size, 10, generator=gen), torch.randint(0, 3, (batches * size,), generator=gen)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def refused(error, match, **kwargs):
    """prune_oneshot raises ``error`` matching ``match`` and leaves the model's weights as they were."""
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(error, match=match):
        prune_oneshot(net, **{**QUICK, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_frozen_weights_are_refused_by_name_and_magnitude_prunes_them():
    net = model()
    net[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False: \['0.weight'\].*params=.*method='magnitude'"):
        prune_oneshot(net, data=data(), loss_fn=nn.CrossEntropyLoss(), **QUICK)
    assert (net[0].weight != 0).all()
    masks = prune_oneshot(net, 0.5, method="magnitude")
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    # leaving the frozen layer out works too
    prune_oneshot(net, data=data(), loss_fn=nn.CrossEntropyLoss(), params=["2.weight"], **QUICK)


@pytest.mark.parametrize("make", [lambda d: (b for b in d), lambda d: iter(d), lambda d: map(tuple, d)])
def test_a_generator_or_iterator_as_data_is_refused_with_list_advice(make):
    refused(TypeError, r"used up after one pass.*pass a list", data=make(data()), loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="pass a list"):
        GradualPruner(model(), 0.5, start_step=1, end_step=2, every=1, data=make(data()),
                      loss_fn=nn.CrossEntropyLoss())


def test_a_loss_that_takes_the_model_points_to_batch_loss():
    refused(TypeError, r"loss_fn takes \(model, batch\).*batch_loss=", data=data(),
            loss_fn=lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1]))
    # whatever its arguments are called, it fails on the first batch with the same hint
    refused(TypeError, r"'Tensor' object is not callable.*batch_loss=", data=data(),
            loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))


def test_a_loss_class_says_instantiate_it():
    refused(TypeError, r"loss_fn=CrossEntropyLoss is a class.*instantiate it, loss_fn=CrossEntropyLoss\(\)",
            data=data(), loss_fn=nn.CrossEntropyLoss)
    refused(TypeError, r"batch_loss=CrossEntropyLoss is a class", data=data(), batch_loss=nn.CrossEntropyLoss)


def test_a_loss_without_reduction_is_refused_as_not_a_scalar():
    refused(ValueError, r"shape \(8,\), not a scalar: a loss with reduction='none'", data=data(),
            loss_fn=nn.CrossEntropyLoss(reduction="none"))
    refused(ValueError, r"not a scalar", data=data(), per_sample=True, loss_fn=nn.CrossEntropyLoss(reduction="none"))


def test_one_x_y_tuple_as_data_says_wrap_it_in_a_list():
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    refused(TypeError, r"wrap it in a list: data=\[\(X, Y\)\]", data=(x, y), loss_fn=nn.CrossEntropyLoss())
    refused(TypeError, r"wrap it in a list", data=(x, y), batch_loss=lambda m, b: m(b[0]).sum())
    prune_oneshot(model(), data=[(x, y)], loss_fn=nn.CrossEntropyLoss(), **QUICK)  # the fix works


def test_dict_batches_with_loss_fn_point_to_batch_loss():
    batches = [{"x": x, "y": y} for x, y in data()]
    refused(TypeError, r"every batch must be an \(inputs, targets\) pair.*a dict.*batch_loss=", data=batches,
            loss_fn=nn.CrossEntropyLoss())


@pytest.mark.parametrize("kind", ["loss_fn", "batch_loss"])
def test_a_summed_loss_with_per_sample_is_refused_on_the_first_batch(kind):
    summed = nn.CrossEntropyLoss(reduction="sum")
    loss = {"loss_fn": summed} if kind == "loss_fn" else {"batch_loss": lambda m, b: summed(m(b[0]), b[1])}
    refused(ValueError, rf"per_sample=True: .* 4 times the mean .*{kind} sums over the samples.*reduction='mean'",
            data=data(), per_sample=True, **loss)
    mean = nn.CrossEntropyLoss()
    loss = {"loss_fn": mean} if kind == "loss_fn" else {"batch_loss": lambda m, b: mean(m(b[0]), b[1])}
    prune_oneshot(model(), data=data(), per_sample=True, **QUICK, **loss)  # the mean is accepted


def test_without_process_group_under_torch_distributed_warns_naming_the_argument(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning, match=r"2 processes, but no process_group= was passed.*process_group=torch"):
        prune_oneshot(model(), data=data(), loss_fn=nn.CrossEntropyLoss(), **QUICK)


def test_progress_is_off_by_default_and_plain_lines_on_stderr_when_asked(capsys):
    steps, rows = [], []
    prune_oneshot(model(), data=data(), loss_fn=nn.CrossEntropyLoss(), callback=lambda *a: steps.append(a),
                  on_gradient_rows=rows.append, **QUICK)
    assert capsys.readouterr().err == ""
    quiet_steps, quiet_rows, steps[:], rows[:] = list(steps), list(rows), [], []
    prune_oneshot(model(), data=data(), loss_fn=nn.CrossEntropyLoss(), callback=lambda *a: steps.append(a),
                  on_gradient_rows=rows.append, progress=True, **QUICK)
    err = capsys.readouterr().err
    assert "prune_oneshot, gradients: 8/8" in err and "sparsity=0.5" in err
    assert (steps, rows) == (quiet_steps, quiet_rows)  # the caller's hooks are still called, the same way
    prune_oneshot(model(), 0.5, method="magnitude", progress=True)
    assert "prune_oneshot: 1/1" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress must be True or False"):
        prune_oneshot(model(), 0.5, method="magnitude", progress="yes")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_pruning_hooks_draw_a_tqdm_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    stream = Terminal()
    with pruning_hooks("obs", 2, 4, "prune", stream=stream) as hooks:
        for step in (1, 2):
            hooks["on_gradient_rows"](4)
            hooks["callback"](step, 2, 0.25 * step)
    drawn = stream.getvalue()
    assert "prune, gradients" in drawn and "0/8" in drawn and "it/s" in drawn  # tqdm's bar, not plain lines
