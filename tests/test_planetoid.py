"""Planetoid's Cora as torch_geometric and the GCN and IGNN codes read it: the real raw files,
read without running any pickle's code, fetched by torch_geometric's download client, and
trained through the runner by both published recipes."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("torch_geometric")

from deqlab.tasks.graph.planetoid import PARTS, PlanetoidDataModule, read_planetoid

CORA = Path(__file__).parent / "fixtures" / "planetoid"  # the real Cora files


def test_cora_is_the_public_split_torch_geometric_reads():
    d = read_planetoid(CORA / "Cora" / "raw", "Cora")
    assert d["x"].shape == (2708, 1433) and set(d["x"].unique().tolist()) == {0.0, 1.0}
    assert d["edge_index"].shape[1] == 10556  # torch_geometric's Planetoid('Cora'): 10,556
    assert len(d["train"]) == 140 and len(d["val"]) == 500 and len(d["test"]) == 1000
    assert torch.bincount(d["y"][d["train"]]).tolist() == [20] * 7  # 20 per class
    assert torch.bincount(d["y"]).tolist() == [351, 217, 418, 818, 426, 298, 180]
    assert not set(d["test"].tolist()) & set(range(640))  # no test node in train or val
    dm = PlanetoidDataModule(str(CORA))
    dm.setup()
    graph, targets = dm.batches["test"]
    torch.testing.assert_close(graph.features[0].sum(1), torch.ones(2708))  # row-normalized
    assert int(targets.mask.sum()) == 1000 and graph.pf_eigenvalue == pytest.approx(1.0, abs=1e-4)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


def test_a_raw_file_naming_other_code_is_refused_before_it_runs(tmp_path):
    raw = tmp_path / "Cora" / "raw"
    shutil.copytree(CORA / "Cora" / "raw", raw)
    marker = tmp_path / "ran"
    (raw / "ind.cora.graph").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"ind\.cora\.graph names os\.makedirs"):
        PlanetoidDataModule(str(tmp_path)).setup()
    assert not marker.exists()


def test_missing_files_name_the_download_and_the_client_fetches_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set task\.datamodule\.download=true"):
        PlanetoidDataModule(str(tmp_path / "root")).setup()
    host = tmp_path / "host"  # the files as kimiyoung/planetoid serves them, one by one
    host.mkdir()
    for part in PARTS:
        shutil.copy(CORA / "Cora" / "raw" / f"ind.cora.{part}", host)
    dm = PlanetoidDataModule(str(tmp_path / "root"), download=True, url=str(host))
    dm.setup()
    assert int(dm.batches["train"][1].mask.sum()) == 140
    with pytest.raises(ValueError, match=r"have 1433 features.*set it to 1433"):
        PlanetoidDataModule(str(CORA), num_features=1000).setup()


def test_both_cora_recipes_train_through_the_runner(tmp_path):
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, metrics

    quick = ["trainer.max_epochs=2", f"paths.data_dir={CORA}", "trainer.num_sanity_val_steps=0"]
    quick += ["~callbacks.progress", "logger=csv"]
    for experiment, solves in (("ignn_cora", True), ("gcn_cora", False)):
        folder = tmp_path / experiment
        run(compose_cfg([f"experiment={experiment}", *quick], folder))
        rows = metrics(folder)
        assert any(r.get("test/acc") for r in rows)
        assert any(r.get("deq/val_fwd_nfe") for r in rows) == solves
