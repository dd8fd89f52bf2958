from pathlib import Path

import pytest

from lineguard.agent.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config(None)
    assert config.mqtt.port == 1883 and config.decision.deadline_ms == 250


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, 'agent_id = "a7"\n[mqtt]\nport = 1884\n')
    monkeypatch.setenv("LINEGUARD_MQTT__PORT", "1999")
    config = load_config(path)
    assert config.agent_id == "a7" and config.mqtt.port == 1999


def test_cameras_are_read_as_a_list_of_tables(tmp_path):
    path = write(tmp_path, '[[cameras]]\nname = "top"\nsource = "gige"\n[[cameras]]\nname = "side"\nsource = "usb"\n')
    assert [c.name for c in load_config(path).cameras] == ["top", "side"]


def test_cameras_name_their_models_and_without_models_every_camera_has_the_one_of_engine_bundle(tmp_path):
    single = load_config(write(tmp_path, '[engine]\nbundle = "/b"\n[[cameras]]\nname = "top"\n'))
    assert single.model_bundles == {"": Path("/b")} and single.cameras_of("") == ("top",)
    text = (
        '[[models]]\nid = "brick"\nbundle = "/b"\n[[models]]\nid = "cap"\nbundle = "/c"\n'
        '[[cameras]]\nname = "top"\nmodel = "brick"\n[[cameras]]\nname = "lid"\nmodel = "cap"\n'
        '[[cameras]]\nname = "side"\nmodel = "brick"\n'
    )
    several = load_config(write(tmp_path, text))
    assert several.model_bundles == {"brick": Path("/b"), "cap": Path("/c")}
    assert several.cameras_of("brick") == ("top", "side") and several.cameras_of("cap") == ("lid",)
    overridden = load_config(write(tmp_path, text.replace('bundle = "/c"\n', 'bundle = "/c"\nthreshold = 0.7\n')))
    assert (overridden.threshold_override("cap"), overridden.threshold_override("brick")) == (0.7, None)
    assert load_config(write(tmp_path, "[decision]\nthreshold = 3.0\n")).threshold_override("any-model") == 3.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port: Input should be less than or equal to 65535"),
        ("[mqtt]\nprot = 1\n", "mqtt.prot: unknown key"),
        ("[decision]\ndeadline_ms = -1\n", "decision.deadline_ms: Input should be greater than 0"),
        ('[[cameras]]\nname = "a"\n[[cameras]]\nname = "a"\n', "camera names must be unique"),
        ('[[cameras]]\nsource = "firewire"\n', "cameras.0.source"),
        ('[mqtt]\ntls_cert = "/c.pem"\n', "tls_cert and tls_key must be given together"),
        ('agent_id = "has space"\n', "agent_id: String should match pattern"),
        ('[[cameras]]\nmodel = "cap"\n', "camera cam0 names model 'cap', but no [[models]] are configured"),
        (
            '[[models]]\nid = "brick"\nbundle = "/b"\n[[cameras]]\nname = "top"\n',
            "camera top must name its model (cameras.model), one of brick",
        ),
        (
            '[[models]]\nid = "brick"\nbundle = "/b"\n[[models]]\nid = "brick"\nbundle = "/c"\n',
            "model ids must be unique",
        ),
        ('[[models]]\nid = "a b"\nbundle = "/b"\n', "models.0.id: String should match pattern"),
        (
            '[decision]\nthreshold = 2.0\n[[models]]\nid = "brick"\nbundle = "/b"\n[[cameras]]\nmodel = "brick"\n',
            "decision.threshold would override the threshold of every model; with [[models]] set models.threshold",
        ),
    ],
)
def test_each_bad_key_is_named_with_the_problem(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match="invalid configuration") as caught:
        load_config(write(tmp_path, text))
    assert fragment in str(caught.value)


def test_a_missing_or_unparsable_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[mqtt\n"))


def test_every_configuration_key_is_documented_in_the_readme():
    from pydantic import BaseModel

    from lineguard.agent.config import AgentConfig, CameraConfig

    readme = (Path(__file__).parents[2] / "README.md").read_text()

    def keys(prefix: str, model: type[BaseModel]) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += keys(f"{prefix}{name}.", annotation)
            elif name == "cameras":
                found += keys("cameras[].", CameraConfig)
            else:
                found.append(f"`{prefix}{name}`")
        return found

    missing = [key for key in keys("", AgentConfig) if key not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
