"""`lineguard-agent samples list|label|export` on a real store; the trainer reads what export writes."""

from __future__ import annotations

import json

import pytest
from test_samples_store import sample

from lineguard.agent.__main__ import main
from lineguard.agent.samples.export import EXPORT_INDEX, ExportIndex
from lineguard.agent.samples.store import Budgets, NewSample, SampleStore
from lineguard.trainer.data import discover_dataset


@pytest.fixture
def agent_toml(tmp_path):
    """An agent config whose store holds 12 rejects, 4 close calls and a failsafe, none labelled yet."""
    config = tmp_path / "agent.toml"
    config.write_text(f'agent_id = "press-3"\nstate_dir = "{tmp_path / "state"}"\n')
    store = SampleStore(tmp_path / "state" / "samples", Budgets(100, 2**30))
    for seq in range(1, 13):
        store.add(sample(seq))
    for seq in range(13, 17):
        store.add(sample(seq, kind="close-call"))
    store.add(NewSample("failsafe", sample(17, kind="failsafe").verdict))
    return config


def agent(*args: str) -> int:
    return main([*args])


def label_all(config, capsys) -> None:
    assert (
        agent(
            "samples",
            "label",
            "nok",
            "top-1",
            "top-2",
            "top-3",
            "top-4",
            "--defect-type",
            "crack",
            "--config",
            str(config),
        )
        == 0
    )
    assert (
        agent(
            "samples", "label", "ok", *(f"top-{seq}" for seq in range(5, 15)), "--by", "anna", "--config", str(config)
        )
        == 0
    )
    assert agent("samples", "label", "unsure", "top-15", "--config", str(config)) == 0
    assert agent("samples", "label", "ok", "top-17", "--config", str(config)) == 0  # a failsafe: no image to export
    capsys.readouterr()


def test_list_shows_every_class_with_its_counts_and_filters(agent_toml, capsys):
    assert agent("samples", "list", "--config", str(agent_toml)) == 0
    out = capsys.readouterr().out
    assert "17 shown of 17 stored" in out and "top/reject: 12 samples" in out and "top/close-call: 4 samples" in out
    assert agent("samples", "list", "--kind", "close-call", "--config", str(agent_toml)) == 0
    out = capsys.readouterr().out
    assert "4 shown of 17" in out and "top-16" in out and "top-1 " not in out


def test_labelling_an_unknown_sample_or_a_defect_type_on_ok_exits_2_with_the_reason(agent_toml, capsys):
    assert agent("samples", "label", "ok", "top-99", "--config", str(agent_toml)) == 2
    assert "top-99 is not stored on this agent" in capsys.readouterr().err
    assert agent("samples", "label", "ok", "top-1", "--defect-type", "crack", "--config", str(agent_toml)) == 2
    assert "belongs to a nok label" in capsys.readouterr().err


def test_export_writes_an_mvtec_folder_the_trainer_reads_with_ok_in_train_and_calibration_and_defects_in_calibration_and_test(
    agent_toml, tmp_path, capsys
):
    label_all(agent_toml, capsys)
    out = tmp_path / "export"
    assert agent("samples", "export", "--out", str(out), "--config", str(agent_toml)) == 0
    printed = capsys.readouterr().out
    assert "exported 14 labelled samples" in printed and "1 labelled unsure" in printed and "1 unlabelled" in printed
    dataset = discover_dataset(out, partial=True)
    assert {s.label for s in dataset.train} == {0} and len(dataset.train) + sum(
        s.label == 0 for s in dataset.calibration
    ) == 10
    assert {s.defect_type for s in dataset.calibration + dataset.test if s.label} == {"crack"}
    assert sum(s.label for s in dataset.calibration + dataset.test) == 4
    assert dataset.train and dataset.test and any(s.label == 0 for s in dataset.calibration)
    index = ExportIndex.model_validate_json((out / EXPORT_INDEX).read_text())
    assert len(index.images) == 14 and {image.kind for image in index.images} == {"reject", "close-call"}
    readme = (out / "README.md").read_text()
    assert (
        "brick@1.0.0 (14 images)" in readme
        and "camera(s): top" in readme
        and "lineguard-train run ORIGINAL_DATA" in readme
    )
    assert "captured from 2025-11-24" in readme


def test_a_sample_keeps_its_split_in_a_later_export_with_more_samples(agent_toml, tmp_path, capsys):
    label_all(agent_toml, capsys)
    assert agent("samples", "export", "--out", str(tmp_path / "first"), "--config", str(agent_toml)) == 0
    assert agent("samples", "label", "ok", "top-16", "--config", str(agent_toml)) == 0
    assert agent("samples", "export", "--out", str(tmp_path / "second"), "--config", str(agent_toml)) == 0

    def splits(folder):
        index = json.loads((folder / EXPORT_INDEX).read_text())
        return {image["sample_id"]: image["split"] for image in index["images"]}

    first, second = splits(tmp_path / "first"), splits(tmp_path / "second")
    assert len(second) == len(first) + 1 and all(second[key] == split for key, split in first.items())


def test_export_as_a_csv_manifest_reads_the_same(agent_toml, tmp_path, capsys):
    label_all(agent_toml, capsys)
    out = tmp_path / "csv"
    assert agent("samples", "export", "--format", "csv", "--out", str(out), "--config", str(agent_toml)) == 0
    from_csv = discover_dataset(out / "manifest.csv", partial=True)
    assert agent("samples", "export", "--out", str(tmp_path / "mvtec"), "--config", str(agent_toml)) == 0
    from_folder = discover_dataset(tmp_path / "mvtec", partial=True)
    for split in ("train", "calibration", "test"):
        assert sorted(p.path.name for p in from_csv.split(split)) == sorted(
            p.path.name for p in from_folder.split(split)
        )


def test_export_refuses_a_folder_that_is_not_empty_and_a_store_without_labels(agent_toml, tmp_path, capsys):
    assert agent("samples", "export", "--out", str(tmp_path / "none"), "--config", str(agent_toml)) == 2
    assert "no labelled samples to export" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert agent("samples", "export", "--out", str(tmp_path / "busy"), "--config", str(agent_toml)) == 2
    assert "is not empty" in capsys.readouterr().err


def test_export_takes_only_the_cameras_and_times_asked_for(agent_toml, tmp_path, capsys):
    label_all(agent_toml, capsys)
    # sample(seq) was captured at 1_764_000_000 + seq: 2025-11-24T16:00:00Z + seq seconds
    since = "2025-11-24T16:00:10"
    assert (
        agent("samples", "export", "--since", since, "--out", str(tmp_path / "late"), "--config", str(agent_toml)) == 0
    )
    index = ExportIndex.model_validate_json((tmp_path / "late" / EXPORT_INDEX).read_text())
    assert sorted(image.seq for image in index.images) == [10, 11, 12, 13, 14]
    assert (
        agent("samples", "export", "--camera", "side", "--out", str(tmp_path / "side"), "--config", str(agent_toml))
        == 2
    )
