import pytest

from schemas.errors import ConfigError
from sluice.settings import load_settings


def test_defaults_load_and_slices_agree():
    s = load_settings()
    assert s.worker().batch_max_items == s.batch_max_items
    assert s.kafka().topics.requests == "sluice.requests"


def test_bad_value_fails_with_one_line_naming_the_setting(monkeypatch):
    monkeypatch.setenv("SLUICE_BATCH_MAX_WAIT_MS", "-5")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    msg = exc.value.message
    assert msg.startswith("SLUICE_BATCH_MAX_WAIT_MS='-5'") and "\n" not in msg


def test_bad_topic_prefix_is_refused(monkeypatch):
    monkeypatch.setenv("SLUICE_TOPIC_PREFIX", "no spaces allowed")
    with pytest.raises(ConfigError, match="SLUICE_TOPIC_PREFIX"):
        load_settings()


def test_bootstrap_follows_the_local_stack_port(monkeypatch):
    monkeypatch.setenv("SLUICE_KAFKA_PORT", "19092")
    monkeypatch.setenv("SLUICE_KAFKA_CONTROLLER_PORT", "19093")
    assert load_settings().bootstrap_servers == "127.0.0.1:19092"


def test_cli_reports_config_errors_in_one_line(monkeypatch, capsys):
    from sluice.cli import main

    monkeypatch.setenv("SLUICE_ORT_PROVIDER", "tpu")
    assert main(["status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sluice status: SLUICE_ORT_PROVIDER='tpu'") and "\n" not in err


def test_settings_doc_tables_match_the_code():
    from pathlib import Path

    from sluice.settings import SETTINGS_DOC, settings_table

    doc = (Path(__file__).resolve().parents[2] / SETTINGS_DOC).read_text()
    block = doc.split("<!-- settings:begin -->\n")[1].split("\n<!-- settings:end -->")[0]
    assert block == settings_table(), (
        f"{SETTINGS_DOC} is stale: regenerate it with `make docs` (sluice.settings.update_settings_doc)"
    )


def test_settings_table_names_every_setting_once():
    from sluice.settings import Settings, settings_table

    table = settings_table()
    for name in Settings.model_fields:
        assert table.count(f"| `SLUICE_{name.upper()}` |") == 1, name


def test_topic_replication_defaults_to_one_broker():
    s = load_settings()
    got = s.topic_replication()
    assert (got["replication_factor"], got["min_insync_replicas"]) == (1, 1)


def test_production_replication_loads(monkeypatch):
    monkeypatch.setenv("SLUICE_TOPIC_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("SLUICE_TOPIC_MIN_INSYNC_REPLICAS", "2")
    got = load_settings().topic_replication()
    assert (got["replication_factor"], got["min_insync_replicas"]) == (3, 2)
    # the state topics keep the latest record per key
    assert got["per_topic"]["sluice.control"] == {"cleanup.policy": "compact"}
    assert got["per_topic"]["sluice.admission-state"] == {"cleanup.policy": "compact"}


def test_min_insync_above_the_replication_factor_is_one_line_naming_both(monkeypatch):
    monkeypatch.setenv("SLUICE_TOPIC_MIN_INSYNC_REPLICAS", "2")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    msg = exc.value.message
    assert "\n" not in msg
    assert "SLUICE_TOPIC_MIN_INSYNC_REPLICAS=2" in msg and "SLUICE_TOPIC_REPLICATION_FACTOR=1" in msg


@pytest.mark.parametrize("name", ["SLUICE_TOPIC_REPLICATION_FACTOR", "SLUICE_TOPIC_MIN_INSYNC_REPLICAS"])
def test_replication_settings_are_at_least_one(monkeypatch, name):
    monkeypatch.setenv(name, "0")
    with pytest.raises(ConfigError, match=f"^{name}='0'"):
        load_settings()


def test_ensure_topics_refuses_min_insync_above_replicas_before_connecting():
    import asyncio

    from sluice.admin import ensure_topics

    # nothing listens on port 1: the check comes first
    with pytest.raises(ValueError, match="min.insync.replicas=3"):
        asyncio.run(ensure_topics("127.0.0.1:1", {"t.requests": 1}, replication_factor=2, min_insync_replicas=3))


def test_secrets_come_from_files_and_are_never_printed(monkeypatch, tmp_path, capsys):
    from sluice.cli import main

    kafka_pw, redis_pw = "kafka-Secret-4711", "redis-Secret-0815"
    (tmp_path / "k").write_text(kafka_pw + "\n")
    (tmp_path / "r").write_text(redis_pw + "\n")
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SLUICE_KAFKA_SASL_USERNAME", "sluice")
    monkeypatch.setenv("SLUICE_KAFKA_SASL_PASSWORD", "overridden-by-the-file")
    monkeypatch.setenv("SLUICE_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "k"))
    monkeypatch.setenv("SLUICE_REDIS_USERNAME", "sluice")
    monkeypatch.setenv("SLUICE_REDIS_PASSWORD_FILE", str(tmp_path / "r"))
    s = load_settings()
    # the files win, and reach the clients
    assert s.kafka().rdkafka()["sasl.password"] == kafka_pw
    assert s.kafka().aiokafka()["sasl_plain_password"] == kafka_pw
    assert s.worker().redis_options() == {"username": "sluice", "password": redis_pw}
    # and nothing shows them: reprs, dumps as JSON, `sluice settings`
    shown = repr(s) + str(s) + repr(s.worker()) + s.model_dump_json() + s.worker().model_dump_json()
    assert main(["settings"]) == 0
    shown += capsys.readouterr().out
    assert kafka_pw not in shown and redis_pw not in shown and "overridden-by-the-file" not in shown


def test_sasl_without_credentials_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="needs SLUICE_KAFKA_SASL_USERNAME and a password"):
        load_settings()
    monkeypatch.setenv("SLUICE_KAFKA_SASL_USERNAME", "sluice")
    monkeypatch.setenv("SLUICE_KAFKA_SASL_PASSWORD_FILE", "/nonexistent/pw")
    with pytest.raises(ConfigError, match="SLUICE_KAFKA_SASL_PASSWORD_FILE: cannot read it"):
        load_settings()


def test_a_redis_url_with_a_password_is_refused(monkeypatch):
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://user:pw@127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="SLUICE_REDIS_URL holds credentials"):
        load_settings().worker()
