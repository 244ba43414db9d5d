"""Settings: flags over LSTM_* variables over defaults, with clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from service.settings import Settings


def test_defaults() -> None:
    s = Settings.from_args([], env={})
    assert (s.port, s.metrics_port, s.device, s.ort_threads, s.model) == (
        50051,
        9464,
        "auto",
        1,
        None,
    )
    assert s.metrics_bind_host == s.host == "127.0.0.1"


def test_every_field_has_a_flag_and_a_variable() -> None:
    special = {
        "device": "cpu",
        "log_format": "text",
        "log_level": "DEBUG",
        "host": "::1",
        "state_store": "sqlite:///var/lib/lstm/state.db",
        "store_sync": "full",
        "store_reset": "yes",
        "model_control": "explicit",
        "load_model": "a,b",
        "admin_tenants": "ops",
    }
    tls = {"tls_cert": "c.pem", "tls_key": "k.pem", "tls_client_ca": "ca.pem"}
    needs = {  # fields that only make sense with others
        "tls_cert": tls,
        "tls_key": tls,
        "tls_client_ca": tls,
        "tenant_from_cert": tls,
    }
    special["tenant_from_cert"] = "yes"
    for f in dataclasses.fields(Settings):
        text = special.get(f.name, "2048")
        with_ = [
            arg
            for name, value in needs.get(f.name, {}).items()
            if name != f.name
            for arg in ("--" + name.replace("_", "-"), value)
        ]
        from_env = Settings.from_args(with_, env={"LSTM_" + f.name.upper(): text})
        from_flag = Settings.from_args([*with_, "--" + f.name.replace("_", "-"), text], env={})
        assert getattr(from_env, f.name) == getattr(from_flag, f.name), f.name
        value = getattr(from_flag, f.name)
        assert value is True if text == "yes" else str(value) in (text, text + ".0"), f.name


def test_a_boolean_flag_alone_means_true() -> None:
    assert Settings.from_args(["--store-reset"], env={}).store_reset is True
    assert Settings.from_args([], env={"LSTM_STORE_RESET": "0"}).store_reset is False
    assert Settings.from_args([], env={}).store_reset is False


def test_flags_win_over_environment() -> None:
    s = Settings.from_args(
        ["--max-batch", "32", "--session-ttl", "0"],
        env={"LSTM_MAX_BATCH": "8", "LSTM_MAX_SESSIONS": "5", "LSTM_MODEL": "m.onnx"},
    )
    assert (s.max_batch, s.session_ttl, s.max_sessions, s.model) == (32, 0.0, 5, "m.onnx")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch", "0"], {}, "--max-batch must be >= 1"),
        (["--device", "tpu"], {}, "invalid choice: 'tpu'"),
        ([], {"LSTM_PORT": "eighty"}, "LSTM_PORT='eighty' is not a valid int"),
        (["--session-ttl", "-1"], {}, "--session-ttl must be >= 0"),
        (["--state-store", "postgres://x"], {}, "sqlite:///path/to/state.db or redis://HOST:PORT"),
        (["--state-store", "redis://h:port/0"], {}, "Port could not be cast to integer"),
        (["--state-store", "sqlite://"], {}, "sqlite:// needs a file"),
        ([], {"LSTM_STORE_RESET": "maybe"}, "LSTM_STORE_RESET='maybe' is not a valid bool"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        Settings.from_args(argv, env=env)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
