"""The model store: install verifies, activate is atomic, rollback is instant, old models are pruned."""

from pathlib import Path

import pytest
from bundle_tools import bundle_variant

from lineguard.agent.bundle import BundleError
from lineguard.agent.rollout.store import ModelStore, ModelStoreError, serving_bundle, store_root
from lineguard.agent.signing import SignatureError, load_public_key, public_key_path


@pytest.fixture
def trusted(signing_key: Path):
    return [load_public_key(public_key_path(signing_key))]


@pytest.fixture
def versions(trained_work: Path, signing_key: Path, tmp_path: Path) -> list[Path]:
    return [
        bundle_variant(trained_work / "bundle", tmp_path / f"v{i}", signing_key, model_version=f"1.0.{i}")
        for i in range(1, 5)
    ]


def test_install_activate_and_rollback(tmp_path, versions, trusted):
    store = ModelStore(tmp_path / "models", keep=3)
    for bundle in versions[:2]:
        store.install(bundle, trusted)
    store.activate("brick-test@1.0.1")
    store.activate("brick-test@1.0.2")
    assert store.active() == "brick-test@1.0.2" and store.previous() == "brick-test@1.0.1"
    assert (store.active_path / "model.onnx").is_file()
    assert store.rollback() == "brick-test@1.0.1"
    assert store.active() == "brick-test@1.0.1"


def test_only_the_last_models_are_kept_but_never_the_active_or_previous(tmp_path, versions, trusted):
    store = ModelStore(tmp_path / "models", keep=2)
    for bundle in versions:
        label = f"brick-test@{store.install(bundle, trusted).model_version}"
        store.activate(label)
    assert store.labels() == ["brick-test@1.0.3", "brick-test@1.0.4"]


def test_the_active_model_is_what_the_agent_serves_after_a_restart(tmp_path, versions, trusted):
    configured = versions[0]
    assert serving_bundle(tmp_path, configured) == configured
    store = ModelStore(store_root(tmp_path))
    store.install(versions[1], trusted)
    store.activate("brick-test@1.0.2")
    assert serving_bundle(tmp_path, configured).resolve() == (store_root(tmp_path) / "brick-test@1.0.2").resolve()


def test_a_tampered_or_unsigned_bundle_never_enters_the_store(tmp_path, trained_work, signing_key, trusted):
    store = ModelStore(tmp_path / "models")
    unsigned = bundle_variant(trained_work / "bundle", tmp_path / "u", None, model_version="9.9.9")
    with pytest.raises(SignatureError, match="unsigned"):
        store.install(unsigned, trusted)
    tampered = bundle_variant(trained_work / "bundle", tmp_path / "t", signing_key, model_version="9.9.8")
    (tampered / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="altered"):
        store.install(tampered, trusted)
    assert store.labels() == []


def test_unknown_models_and_an_empty_history_are_refused(tmp_path):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="not in the store"):
        store.activate("nope@1")
    with pytest.raises(ModelStoreError, match="no previous model"):
        store.rollback()


def test_each_model_id_has_its_own_active_version_history_and_rollback(tmp_path, trained_work, signing_key, trusted):
    source = trained_work / "bundle"
    bricks = [bundle_variant(source, tmp_path / f"b{i}", signing_key, model_version=f"1.0.{i}") for i in (1, 2)]
    caps = [
        bundle_variant(source, tmp_path / f"c{i}", signing_key, model_id="cap-test", model_version=f"2.0.{i}")
        for i in (1, 2)
    ]
    root = store_root(tmp_path / "state")
    brick, cap = ModelStore(root, slot="brick-test"), ModelStore(root, slot="cap-test")
    for bundle in bricks + caps:
        brick.install(bundle, trusted)
    brick.activate("brick-test@1.0.1")
    cap.activate("cap-test@2.0.1")
    cap.activate("cap-test@2.0.2")
    assert (brick.active(), cap.active()) == ("brick-test@1.0.1", "cap-test@2.0.2")
    assert brick.previous() is None and cap.previous() == "cap-test@2.0.1"
    assert cap.rollback() == "cap-test@2.0.1" and brick.active() == "brick-test@1.0.1"
    assert ModelStore(root).active() is None  # the one-model link is untouched
    state = tmp_path / "state"
    assert serving_bundle(state, bricks[1], "cap-test").resolve() == (root / "cap-test@2.0.1").resolve()
    assert serving_bundle(state, bricks[1], "other") == bricks[1]


def test_a_bundle_is_routed_to_its_model_id_and_one_no_camera_uses_is_refused_naming_those_it_serves(tmp_path):
    from lineguard.agent.config import AgentConfig, CameraConfig, ModelConfig
    from lineguard.agent.rollout.swap import rollback, slot_of

    config = AgentConfig(
        state_dir=tmp_path,
        models=(ModelConfig(id="brick", bundle=tmp_path / "b"), ModelConfig(id="cap", bundle=tmp_path / "c")),
        cameras=(CameraConfig(name="top", model="brick"), CameraConfig(name="lid", model="cap")),
    )
    assert slot_of(config, "cap") == "cap"
    with pytest.raises(
        BundleError, match="no camera of this agent uses model gear; its cameras use model ids brick, cap"
    ):
        slot_of(config, "gear")
    with pytest.raises(BundleError, match="name the model to roll back: this agent serves model ids brick, cap"):
        rollback(config)
    assert slot_of(AgentConfig(state_dir=tmp_path), "anything") == ""  # one model: every push replaces it
