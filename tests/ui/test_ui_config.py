"""The dashboard's configuration: TOML plus LINEGUARD_UI_ variables, errors that name the key, check-config."""

from __future__ import annotations

import pytest

from lineguard.agent.config import ConfigError
from lineguard.agent.signing import generate_key_pair
from lineguard.ui.__main__ import main
from lineguard.ui.auth import add_user
from lineguard.ui.config import load_config


def test_the_defaults_serve_this_machine_only_and_follow_every_line():
    config = load_config(None)
    assert (config.http.host, config.http.port, config.line) == ("127.0.0.1", 8080, "+")
    assert config.label_key is None and config.auth.users_file is None


def test_the_environment_overrides_the_file(tmp_path, monkeypatch):
    path = tmp_path / "ui.toml"
    path.write_text('line = "line-2"\n[http]\nport = 9000\n[mqtt]\nport = 1884\n')
    monkeypatch.setenv("LINEGUARD_UI_HTTP__PORT", "9100")
    monkeypatch.setenv("LINEGUARD_UI_MQTT__PASSWORD", "secret")
    config = load_config(path)
    assert (config.line, config.http.port, config.mqtt.port) == ("line-2", 9100, 1884)
    assert config.mqtt.password.get_secret_value() == "secret"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[http]\nprot = 1\n", "http.prot: unknown key"),
        ('line = "line/1"\n', "line: String should match pattern"),
        ("[store]\nretention_days = 0\n", "store.retention_days: Input should be greater than 0"),
        ('[http]\ntls_cert = "/a.pem"\n', "tls_cert and tls_key must be given together"),
        ('[auth]\nproxy_header = "X Bad"\n', "auth.proxy_header"),
    ],
)
def test_a_bad_key_is_named_with_the_problem(tmp_path, text, fragment):
    path = tmp_path / "ui.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_check_config_reads_the_users_file_and_label_key_and_exits_2_naming_a_bad_one(tmp_path, capsys):
    key, _ = generate_key_pair(tmp_path / "labeller.pem")
    add_user(tmp_path / "users", "anna", "pw")
    path = tmp_path / "ui.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\nlabel_key = "{key}"\n[auth]\nusers_file = "{tmp_path / "users"}"\n'
    )
    assert main(["check-config", "--config", str(path)]) == 0
    assert "1 user(s), labelling on" in capsys.readouterr().out
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nlabel_key = "{tmp_path / "users"}"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    assert "label_key" in capsys.readouterr().err
    assert main(["check-config", "--config", str(tmp_path / "missing.toml")]) == 2
