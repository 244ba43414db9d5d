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
        "cuda_tf32": "yes",
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
        (["--device", "tpu"], {}, "--device must be auto, cpu, cuda or cuda:N (got 'tpu')"),
        (["--device", "cuda:one"], {}, "--device must be auto, cpu, cuda or cuda:N"),
        ([], {"LSTM_DEVICE": "gpu"}, "--device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
        (["--cuda-mem-limit", "8 gigs"], {}, "--cuda-mem-limit must be a byte count like"),
        (["--cuda-mem-limit", "-1"], {}, "--cuda-mem-limit must be a byte count like"),
        ([], {"LSTM_CUDA_TF32": "maybe"}, "LSTM_CUDA_TF32='maybe' is not a valid bool"),
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


@pytest.mark.parametrize(
    ("argv", "env", "device", "limit", "tf32"),
    [
        ([], {}, "auto", 0, False),
        (["--device", "cuda:1"], {}, "cuda:1", 0, False),
        (["--device", "cuda", "--cuda-mem-limit", "8GiB"], {}, "cuda", 8 << 30, False),
        (
            [],
            {"LSTM_DEVICE": "cuda:0", "LSTM_CUDA_MEM_LIMIT": "512MiB"},
            "cuda:0",
            512 << 20,
            False,
        ),
        (["--cuda-mem-limit", "1.5GB", "--cuda-tf32"], {}, "auto", 1_500_000_000, True),
        (["--cuda-mem-limit", "4096"], {"LSTM_CUDA_TF32": "1"}, "auto", 4096, True),
    ],
)
def test_cuda_flags(
    argv: list[str], env: dict[str, str], device: str, limit: int, tf32: bool
) -> None:
    s = Settings.from_args(argv, env=env)
    assert (s.device, s.cuda_mem_limit_bytes, s.cuda_tf32) == (device, limit, tf32)
