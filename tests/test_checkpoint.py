"""Loading weights from a file (``init_from``) and the weight converters, on small networks:
which tensors load, which are refused and why, and that a converted weight computes the same
function. The end-to-end runs are in test_runner.py and test_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deqlab.norm import apply_norm, weight_entries, weight_norm_entries
from deqlab.runner.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    check_compatible,
    initial_state,
    load_initial_weights,
    network_state,
    read_checkpoint,
    resolve_checkpoint,
)


class Net(nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.a = nn.Linear(2, width)
        self.b = nn.Linear(width, 1)


class ReferenceFormat(Net):
    """A network that knows a reference layout: its names carry a ``ref_`` prefix."""

    @staticmethod
    def is_reference_state(state):
        return all(k.startswith("ref_") for k in state)

    def convert_reference_state(self, state):
        if "ref_bad" in state:
            raise ValueError("ref_bad has no counterpart")
        return {k[4:]: v for k, v in state.items()}


def save(tmp_path, obj, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_a_deqlab_checkpoint_gives_its_net_entries_without_the_prefix():
    net = Net()
    ckpt = {"state_dict": {"net.a.weight": torch.ones(3, 2), "loss_scale": torch.ones(())}}
    assert list(network_state(ckpt, net, "x")) == ["a.weight"]


def test_a_plain_state_dict_is_taken_as_it_is_bare_or_under_state_dict():
    state = Net().state_dict()
    assert network_state(state, Net(), "x") is state
    assert network_state({"state_dict": state}, Net(), "x") is state


def test_a_reference_state_is_converted_by_the_network_and_its_errors_are_named():
    net = ReferenceFormat()
    state = {f"ref_{k}": v for k, v in Net().state_dict().items()}
    assert sorted(network_state(state, net, "x")) == sorted(Net().state_dict())
    assert network_state(state, Net(), "x") is state  # a network that knows no format
    with pytest.raises(CheckpointError, match=r"init_from=f.pt: ref_bad has no counterpart"):
        network_state({**state, "ref_bad": torch.ones(1)}, net, "f.pt")


def test_a_file_without_a_state_dict_of_tensors_is_refused():
    with pytest.raises(CheckpointError, match=r"init_from=f.pt: no state dict of tensors"):
        network_state({"state_dict": {"a": 1}}, Net(), "f.pt")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        network_state({"epoch": 3}, Net(), "f.pt")


def test_load_initial_weights_loads_every_tensor_and_reports_the_count(tmp_path):
    source, net = Net(), Net()
    report = load_initial_weights(save(tmp_path, source.state_dict()), net)
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    assert report == f"init_from {tmp_path / 'w.pt'}: loaded 4 tensors"


def test_strict_loading_refuses_a_network_of_other_widths_naming_the_first_misfit(tmp_path):
    path = save(tmp_path, Net(width=4).state_dict())
    net = Net(width=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(path, net)
    assert str(err.value) == (
        f"init_from={path}: 3 tensor(s) of the file do not fit this network and 3 of the "
        "network are not in the file (e.g. a.bias: shape (4,) in the file, shape (3,) here). "
        "Build the network the weights were trained with, or load what fits with "
        "init_from_strict=false"
    )
    for k, v in net.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_strict_loading_names_a_tensor_missing_from_the_file(tmp_path):
    state = Net().state_dict()
    del state["a.bias"]
    with pytest.raises(CheckpointError, match=r"0 tensor\(s\) .* and 1 of .*a.bias: absent in"):
        load_initial_weights(save(tmp_path, state), Net())


def test_loose_loading_takes_what_fits_and_names_what_it_skipped_and_left_new(tmp_path):
    source = Net(width=4)
    state = {**source.state_dict(), "extra": torch.ones(2)}
    state["b.bias"] = torch.full((1,), 7.0)  # fits: the same shape at every width
    net = Net(width=3)
    a_before = net.a.weight.clone()
    report = load_initial_weights(save(tmp_path, state), net, strict=False)
    assert net.b.bias.item() == 7.0
    assert torch.equal(net.a.weight, a_before)
    assert report.splitlines() == [
        f"init_from {tmp_path / 'w.pt'}: loaded 1 tensors",
        "  skipped (not usable here): a.bias, a.weight, b.weight, extra",
        "  new (not in the file): a.bias, a.weight, b.weight",
    ]


def test_a_missing_weights_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"init_from=.*nope.pt: no such file"):
        load_initial_weights(tmp_path / "nope.pt", Net())


def _layer(weight_normed: bool) -> nn.Module:
    layer = nn.Conv2d(3, 4, 3)
    return apply_norm(layer, "weight_norm") if weight_normed else layer


@pytest.mark.parametrize("target_norm", [True, False])
def test_weight_norm_pair_converts_to_the_same_function(target_norm):
    """A reference layer's (g, v) gives the same weight, loaded as (V, scale) into a
    weight-normalized layer or as the plain weight into an unnormalized one."""
    g, v = torch.rand(4, 1, 1, 1) + 0.5, torch.randn(4, 3, 3, 3)
    expected = g * v / v.flatten(1).norm(dim=1).reshape(4, 1, 1, 1)
    layer = _layer(target_norm)
    entries = weight_norm_entries("", g, v, {f".{k}": t for k, t in layer.state_dict().items()})
    layer.load_state_dict({k[1:]: t for k, t in entries.items()}, strict=False)
    torch.testing.assert_close(layer.weight, expected)


@pytest.mark.parametrize("target_norm", [True, False])
def test_plain_weight_converts_to_the_same_function(target_norm):
    w = torch.randn(4, 3, 3, 3)
    layer = _layer(target_norm)
    entries = weight_entries("", w, {f".{k}": t for k, t in layer.state_dict().items()})
    layer.load_state_dict({k[1:]: t for k, t in entries.items()}, strict=False)
    torch.testing.assert_close(layer.weight, w)
    if target_norm:  # V is w itself, and the scale its row norms
        torch.testing.assert_close(entries[".parametrizations.weight.original"], w)


def test_a_weight_norm_pair_cannot_load_into_another_parametrization():
    target = {"l.parametrizations.weight.original": torch.ones(4, 3)}
    with pytest.raises(ValueError, match="l: a weight-normalized weight cannot load into"):
        weight_norm_entries("l", torch.ones(4, 1), torch.ones(4, 3), target)


class Opaque:
    """Not a tensor or a plain container: a weights-only load must refuse it."""


def test_read_checkpoint_memory_maps_the_file(tmp_path):
    """Tensors are read from the page cache when touched, not copied at load (a resume of a
    large model does not hold two copies): the file is mapped into the process."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    path = save(tmp_path, {"state_dict": {"w": torch.ones(64)}}, "m.ckpt")
    ckpt = read_checkpoint(path)
    assert str(path) in maps.read_text()
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(64))


def test_a_truncated_checkpoint_is_named_with_what_to_do(tmp_path):
    path = save(tmp_path, {"state_dict": {"w": torch.ones(64)}}, "t.ckpt")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a readable checkpoint (")
    assert message.endswith(
        "). A process killed while writing leaves such a file; use another checkpoint of the "
        "run (checkpoints/best.ckpt, last.ckpt)."
    )
    assert "\n" not in message and "weights_only=False" not in message


def test_a_checkpoint_holding_objects_is_refused_without_loading_them(tmp_path):
    path = save(tmp_path, {"state_dict": {"w": torch.ones(2)}, "extra": Opaque()}, "o.ckpt")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(
        f"{path} is not a readable checkpoint (it holds objects other than tensors and plain "
        "containers). "
    )


def test_resolve_checkpoint_finds_last_in_the_run_folder_or_says_how(tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("last", tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(err.value) == (
        f"ckpt_path=last: there is no {last}. `last` resumes the run whose folder is "
        "hydra.run.dir (pass hydra.run.dir=<that run's folder>), or pass a checkpoint file: "
        "ckpt_path=<file.ckpt>"
    )
    last.parent.mkdir()
    torch.save({"state_dict": {}}, last)
    assert resolve_checkpoint("last", tmp_path) == last
    assert resolve_checkpoint(str(last), tmp_path / "elsewhere") == last
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(str(tmp_path / "x.ckpt"), tmp_path)
    assert str(err.value) == f"ckpt_path={tmp_path / 'x.ckpt'}: no such file"


def test_check_compatible_names_the_writer_or_the_first_differing_tensor():
    net = Net()
    ours = net.state_dict()
    check_compatible({"state_dict": ours}, net, "a.B", "a.B")  # the same: accepted
    with pytest.raises(CheckpointError) as err:
        check_compatible({"state_dict": ours}, net, "x.Other", "a.B")
    assert str(err.value) == (
        "the checkpoint was written by x.Other, this run trains a.B: pass a checkpoint of this task"
    )
    theirs = {**Net(width=4).state_dict(), "zz": torch.ones(1)}
    with pytest.raises(CheckpointError) as err:
        check_compatible({"state_dict": theirs}, net, "a.B", "a.B")
    assert str(err.value) == (
        "the checkpoint's network differs from this run's in 4 tensor(s), e.g. a.bias: "
        "shape (4,) in the checkpoint, shape (3,) here; use the network settings (net, norm) "
        "the checkpoint was trained with"
    )
    with pytest.raises(CheckpointError, match=r"in 4 tensor\(s\), e.g. a.bias: absent in the"):
        check_compatible({}, net, "a.B", "a.B")  # no state_dict at all


def test_checkpoints_go_to_new_folders_and_remote_urls_to_lightning(tmp_path, monkeypatch):
    """A local checkpoint is written atomically, its folders created; a URL is left to
    Lightning's own writer (fsspec), never turned into a local folder."""
    import fsspec

    monkeypatch.chdir(tmp_path)
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a" / "b" / "c.ckpt")
    assert torch.equal(read_checkpoint(tmp_path / "a" / "b" / "c.ckpt")["w"], torch.ones(2))
    io.save_checkpoint({"w": torch.arange(3.0)}, "memory://deqlab-test/c.ckpt")
    with fsspec.open("memory://deqlab-test/c.ckpt", "rb") as fh:
        assert torch.equal(torch.load(fh, weights_only=True)["w"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    # storage options go to Lightning's writer, which takes none
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "d.ckpt", storage_options={"a": 1})


def test_check_compatible_counts_only_the_differing_tensors():
    net = Net()
    with pytest.raises(CheckpointError, match=r"differs from this run's in 3 tensor\(s\), e.g. a"):
        check_compatible({"state_dict": Net(width=4).state_dict()}, net, "a.B", "a.B")


def test_a_truncated_checkpoint_gives_torchs_first_line_as_the_reason(tmp_path):
    path = save(tmp_path, {"state_dict": {"w": torch.ones(64)}}, "t.ckpt")
    path.write_bytes(path.read_bytes()[:50])
    try:
        torch.load(path, weights_only=True)
    except Exception as e:  # what torch says of this file, first line
        reason = str(e).strip().splitlines()[0]
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"{path} is not a readable checkpoint ({reason}). ")


@pytest.mark.parametrize(
    "error, reason",
    [
        (RuntimeError(""), "RuntimeError"),  # no message: the error's type
        (
            RuntimeError("Weights only load failed.\nRe-running with weights_only=False..."),
            "it holds objects other than tensors and plain containers",
        ),
        (  # the spelling of other torch versions
            RuntimeError("Unsupported global: GLOBAL x.Opaque (pass weights_only=False)"),
            "it holds objects other than tensors and plain containers",
        ),
        (
            RuntimeError("Weights only unpickler refused x.Opaque"),
            "it holds objects other than tensors and plain containers",
        ),
        (OSError("disk error\nmore"), "disk error"),
    ],
)
def test_read_errors_are_reported_by_their_cause(error, reason, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "c.ckpt")
    assert str(err.value).startswith(
        f"{tmp_path / 'c.ckpt'} is not a readable checkpoint ({reason}). "
    )


def test_load_initial_weights_converts_a_reference_file_and_names_it_in_errors(tmp_path):
    source = Net()
    ref = {f"ref_{k}": v for k, v in source.state_dict().items()}
    net = ReferenceFormat()
    assert load_initial_weights(save(tmp_path, ref), net).endswith("loaded 4 tensors")
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    bad = save(tmp_path, {"epoch": 3}, "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(bad, Net())
    assert str(err.value) == f"init_from={bad}: no state dict of tensors in it"


def test_strict_loading_names_a_tensor_of_the_file_that_the_network_lacks(tmp_path):
    state = {**Net().state_dict(), "aa.extra": torch.ones(2)}
    path = save(tmp_path, state)
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(path, Net())
    assert "(e.g. aa.extra: shape (2,) in the file, absent here)" in str(err.value)


@pytest.mark.parametrize(
    ("read", "key"),
    [
        (lambda url: initial_state(url), "init_from"),
        (lambda url: resolve_checkpoint(url, "."), "ckpt_path"),
        (lambda url: AtomicCheckpointIO().load_checkpoint(url), "ckpt_path"),
    ],
)
def test_a_url_is_refused_under_the_key_that_named_it(read, key):
    url = "https://example.com/runs/m.ckpt"
    with pytest.raises(CheckpointError) as err:
        read(url)
    assert str(err.value) == (
        f"{key}={url}: a URL; deqlab reads checkpoints from local files only. Download it "
        f"first and pass the file: {key}=<file.ckpt>"
    )


def test_init_from_without_a_network_checks_the_file_and_returns_its_tensors(tmp_path):
    """A task that builds its network later checks init_from first: a state dict (bare or under
    state_dict) comes back as it is; anything else is refused, naming the file."""
    weights = {"cell.weight": torch.arange(6.0).reshape(2, 3)}
    bare, wrapped, listed = tmp_path / "bare.pt", tmp_path / "wrapped.ckpt", tmp_path / "list.pt"
    torch.save(weights, bare)
    torch.save({"state_dict": weights, "epoch": 3}, wrapped)
    torch.save([torch.zeros(2)], listed)
    for path in (bare, wrapped):
        state = initial_state(path)
        assert state.keys() == weights.keys() and torch.equal(
            state["cell.weight"], weights["cell.weight"]
        )
    with pytest.raises(CheckpointError) as err:
        initial_state(listed)
    assert str(err.value) == f"init_from={listed}: no state dict of tensors in it"
