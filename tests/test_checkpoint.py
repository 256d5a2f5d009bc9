"""mfac.checkpoint: hostile files run nothing and are named for what they are (unsafe, corrupt,
truncated); weights round-trip through safetensors and torch files; a save is atomic."""

import os

import pytest
import torch

from mfac import checkpoint
from mfac.models import load_checkpoint, mlp


# Files that try to run code ----------------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_file(tmp_path, payload_factory):
    marker = tmp_path / "pwned"
    _RunsCode.marker = marker
    path = tmp_path / "evil.pt"
    torch.save(payload_factory(_RunsCode()), path)
    return path, marker


@pytest.mark.parametrize("payload", [lambda evil: evil, lambda evil: {"state_dict": {"w": evil}},
                                     lambda evil: {"weight": torch.zeros(2), "extra": evil}])
def test_malicious_checkpoint_runs_nothing(tmp_path, payload):
    path, marker = malicious_file(tmp_path, payload)
    for load in (lambda: checkpoint.load(path), lambda: checkpoint.load_weights(path),
                 lambda: load_checkpoint(mlp(64, (8,)), path)):
        with pytest.raises(checkpoint.UnsafeFileError, match="asks to load the Python object .*system.*could run code"):
            load()
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", b"\x00" * 64, os.urandom(4096)])
def test_garbage_files_are_named_corrupt(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CorruptFileError, match="not a readable"):
        checkpoint.load_weights(path)


def test_truncated_file_is_named_corrupt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(mlp(64, (8,)).state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(checkpoint.CorruptFileError, match="truncated|not a readable"):
        checkpoint.load_weights(path)


def test_safetensors_weights_round_trip_and_load_into_models(tmp_path):
    pytest.importorskip("safetensors")
    model = mlp(64, (8,))
    checkpoint.save_weights(model.state_dict(), tmp_path / "w.safetensors")
    other = mlp(64, (8,))
    load_checkpoint(other, tmp_path / "w.safetensors")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    # A torch file of the same weights loads too.
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert set(checkpoint.load_weights(tmp_path / "w.pt")) == set(model.state_dict())


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save({"step": 1, "x": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2, "bad": Boom()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_a_folder_is_named_as_a_folder(tmp_path):
    from mfac import checkpoint

    with pytest.raises(IsADirectoryError, match="is a folder, not a checkpoint file"):
        checkpoint.load(tmp_path)
