"""Settings come from cdc.toml, CDC_* variables and flags, in rising precedence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from cdc import cli
from cdc.cli import options as cli_options
from cdc.config import FIELDS, Settings, flag_name, load_settings
from cdc.errors import ConfigError
from cdc.log import scrub


class TestPrecedence:
    def test_flags_win_over_environment_which_wins_over_the_file(self, tmp_path: Path) -> None:
        """Each layer overrides only what it sets."""
        config = tmp_path / "cdc.toml"
        config.write_text('dsn = "postgresql://file/db"\nslot = "from_file"\n'
                          'publication = "pub_file"\nflush_rows = 10\n')
        env = {"CDC_SLOT": "from_env", "CDC_FLUSH_ROWS": "20"}
        s = load_settings({"flush_rows": 30}, config, env)
        assert (s.dsn, s.slot, s.publication, s.flush_rows) == (
            "postgresql://file/db", "from_env", "pub_file", 30)

    def test_config_file_may_use_a_cdc_table(self, tmp_path: Path) -> None:
        """[cdc] section or top level: both work."""
        config = tmp_path / "c.toml"
        config.write_text('[cdc]\ndsn = "postgresql://x/db"\ntables = ["public.a", "b"]\n')
        assert load_settings({}, config, {}).tables == ("public.a", "b")

    def test_sizes_and_durations_accept_units(self) -> None:
        """64MB, 512KiB, 500ms, 2m are understood."""
        s = load_settings({"dsn": "postgresql://x/db", "flush_bytes": "512KiB",
                           "flush_seconds": "500ms"}, None, {"CDC_STATUS_SECONDS": "2m"})
        assert (s.flush_bytes, s.flush_seconds, s.status_seconds) == (524288, 0.5, 120.0)

    def test_cdc_config_variable_names_the_file(self, tmp_path: Path) -> None:
        """CDC_CONFIG points at a config file like --config does."""
        config = tmp_path / "x.toml"
        config.write_text('dsn = "postgresql://x/db"\nlake = "/data/lake"\n')
        assert load_settings({}, None, {"CDC_CONFIG": str(config)}).lake == "/data/lake"


class TestValidation:
    @pytest.mark.parametrize(("flags", "message"), [
        ({}, "no source database given"),
        ({"dsn": "x", "slot": "Bad-Name"}, "slot name 'Bad-Name' is not valid"),
        ({"dsn": "x", "plugin": "decoderbufs"}, "output plugin 'decoderbufs' is not supported"),
        ({"dsn": "x", "flush_rows": 0}, "flush limits must be positive"),
        ({"dsn": "x", "flush_bytes": "lots"}, "not a size"),
        ({"dsn": "x", "snapshot_mode": "fast"}, "snapshot mode 'fast' is not supported"),
        ({"dsn": "x", "log_format": "xml"}, "log format 'xml' is not supported"),
        ({"dsn": "x", "workers": 0}, "workers must be at least 1"),
        ({"dsn": "x", "optimize_every": "-1"}, "optimize_every must be at least 0"),
        ({"dsn": "x", "chunk_rows": "1.5"}, "not a whole number"),
        ({"dsn": "x", "max_lag_seconds": "soon"}, "not a duration"),
    ])
    def test_invalid_settings_are_refused_with_a_fix(self, flags: dict[str, object],
                                                      message: str) -> None:
        """Validation happens once, with a message naming the setting."""
        with pytest.raises(ConfigError, match=message):
            load_settings(flags, None, {})

    def test_unknown_config_file_keys_are_refused(self, tmp_path: Path) -> None:
        """A typo in cdc.toml is an error, not silently ignored."""
        config = tmp_path / "cdc.toml"
        config.write_text('dsn = "x"\nflush_row = 5\n')
        with pytest.raises(ConfigError, match="unknown keys: flush_row"):
            load_settings({}, config, {})


class TestSecrets:
    @pytest.mark.parametrize("text", [
        "postgresql://alice:hunter2@db:5432/x",
        "host=db password=hunter2 user=alice",
        "host=db password='hunter2' user=alice",
    ])
    def test_passwords_are_scrubbed_from_log_text(self, text: str) -> None:
        """Whatever a log line carries, the password is replaced."""
        assert "hunter2" not in scrub(text)

    def test_redacted_settings_show_no_password(self) -> None:
        """Settings printed for operators name host and user but not the password."""
        s = load_settings({"dsn": "postgresql://alice:hunter2@db:5432/x"}, None, {})
        assert s.redacted()["dsn"] == "alice@db:5432/x"


# The value each layer gives a setting in TestEveryOption: (file, environment, flag) as they
# are written there, then what each must parse to. Booleans are flags: True is `--name`,
# False `--no-name`.
LAYERS: dict[str, tuple[object, str, object, object, object, object]] = {
    "dsn": ("postgresql://f/db", "postgresql://e/db", "postgresql://g/db",
            "postgresql://f/db", "postgresql://e/db", "postgresql://g/db"),
    "lake": ("/f", "/e", "/g", "/f", "/e", "/g"),
    "s3_endpoint": ("http://f:1", "http://e:1", "http://g:1",
                    "http://f:1", "http://e:1", "http://g:1"),
    "s3_max_attempts": (3, "4", "5", 3, 4, 5),
    "slot": ("f_slot", "e_slot", "g_slot", "f_slot", "e_slot", "g_slot"),
    "publication": ("f_pub", "e_pub", "g_pub", "f_pub", "e_pub", "g_pub"),
    "tables": (["public.f"], "public.e,public.e2", "public.g",
               ("public.f",), ("public.e", "public.e2"), ("public.g",)),
    "plugin": ("wal2json", "pgoutput", "wal2json", "wal2json", "pgoutput", "wal2json"),
    "binary": ("on", "off", "auto", "on", "off", "auto"),
    "flush_rows": (10, "20", "30", 10, 20, 30),
    "flush_bytes": ("1KiB", "2KiB", "3KiB", 1024, 2048, 3072),
    "flush_seconds": ("1s", "2s", "3s", 1.0, 2.0, 3.0),
    "status_seconds": ("1s", "2s", "3s", 1.0, 2.0, 3.0),
    "progress_seconds": ("1m", "2m", "3m", 60.0, 120.0, 180.0),
    "max_backoff_seconds": ("1s", "2s", "3s", 1.0, 2.0, 3.0),
    "heartbeat_seconds": ("1s", "0", "3s", 1.0, 0.0, 3.0),
    "silence_seconds": ("1s", "2s", "0", 1.0, 2.0, 0.0),
    "slot_busy_seconds": ("1m", "2m", "3s", 60.0, 120.0, 3.0),
    "lease_seconds": ("10s", "20s", "30s", 10.0, 20.0, 30.0),
    "compact_every": ("1s", "500ms", "0", 1.0, 0.5, 0.0),
    "until_caught_up": (True, "false", True, True, False, True),
    "metrics_port": (9101, "9102", "9103", 9101, 9102, 9103),
    "publish_via_partition_root": (False, "true", False, False, True, False),
    "contracts": ("/f", "/e", "/g", "/f", "/e", "/g"),
    "keys": (["public.f=a,b"], "public.e=c;public.e2=d", "public.g=e",
             ("public.f=a,b",), ("public.e=c", "public.e2=d"), ("public.g=e",)),
    "snapshot_mode": ("updated_at", "consistent", "updated_at",
                      "updated_at", "consistent", "updated_at"),
    "workers": (3, "4", "5", 3, 4, 5),
    "chunk_rows": (100, "200", "300", 100, 200, 300),
    "updated_at_column": ("f_at", "e_at", "g_at", "f_at", "e_at", "g_at"),
    "updated_at": (["public.f=f_at"], "public.e=e_at", "public.g=g_at",
                   ("public.f=f_at",), ("public.e=e_at",), ("public.g=g_at",)),
    "history": (False, "on", "off", False, True, False),
    "updated_at_lookback": ("1m", "0", "10m", 60.0, 0.0, 600.0),
    "unconvertible": ("quarantine", "fail", "quarantine",
                      "quarantine", "fail", "quarantine"),
    "resync_chunk_rows": (10, "20", "30", 10, 20, 30),
    "resync_wait_seconds": ("1m", "2s", "3", 60.0, 2.0, 3.0),
    "optimize_every": (1, "0", "3", 1, 0, 3),
    "vacuum_retention_hours": (1, "2", "0", 1, 2, 0),
    "maintain_before": ("2026-01-01", "2026-01-02", "2026-01-03",
                        "2026-01-01", "2026-01-02", "2026-01-03"),
    "retention_days": (30, "40", "50", 30, 40, 50),
    "status_json": (True, "0", True, True, False, True),
    "max_lag_bytes": ("1GB", "2MiB", "3", 10**9, 2 * 2**20, 3),
    "max_lag_seconds": ("5m", "6s", "7", 300.0, 6.0, 7.0),
    "max_compaction_lag_seconds": ("1h", "2m", "3s", 3600.0, 120.0, 3.0),
    "query_format": ("csv", "json", "table", "csv", "json", "table"),
    "as_of": ("2026-11-30T12:00:00Z", "2026-11-29", "2026-11-28T01:02:03+01:00",
              "2026-11-30T12:00:00Z", "2026-11-29", "2026-11-28T01:02:03+01:00"),
    "as_of_lsn": ("0/1A", "0/2B", "1/3C", "0/1A", "0/2B", "1/3C"),
    "athena_database": ("f_db", "e_db", "g_db", "f_db", "e_db", "g_db"),
    "athena_location": ("s3://f/l", "s3://e/l", "s3://g/l", "s3://f/l", "s3://e/l", "s3://g/l"),
    "exclude_tables": (["public.f"], "public.e,public.e2", "public.g",
                       ("public.f",), ("public.e", "public.e2"), ("public.g",)),
    "keyless_tables": ("insert-only", "refuse", "insert-only",
                       "insert-only", "refuse", "insert-only"),
    "table_sync_seconds": ("1s", "2s", "0", 1.0, 2.0, 0.0),
    "backfill_new_tables": (False, "true", False, False, True, False),
    "check_json": (True, "0", True, True, False, True),
    "check_strict": (True, "0", True, True, False, True),
    "keep_publication": (True, "0", True, True, False, True),
    "log_format": ("json", "console", "json", "json", "console", "json"),
    "log_level": ("debug", "warning", "error", "debug", "warning", "error"),
}
NOT_SETTINGS = {"config", "help", "version"}


# typer vendors its own click (typer._click): its commands and parameters are read by their
# attributes (commands, params, param_type_name, opts, secondary_opts, is_flag, help).
def _commands() -> list[tuple[list[str], Any]]:
    """Every runnable command of `cdc`, with the words that name it."""
    found: list[tuple[list[str], Any]] = []

    def walk(words: list[str], command: Any) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk([*words, name], sub)
        else:
            found.append((words, command))

    walk([], typer.main.get_command(cli.app))
    return found


def _options() -> list[tuple[list[str], Any]]:
    return [(words, p) for words, command in _commands() for p in command.params
            if p.param_type_name == "option" and p.name not in NOT_SETTINGS]


class _Loaded(Exception):  # a signal, not an error: the settings were loaded
    def __init__(self, settings: Settings) -> None:
        self.settings = settings


class TestEveryOption:
    """Every option of every command is a setting with a flag, a CDC_* variable and a key."""

    def test_every_setting_is_an_option_of_some_command(self) -> None:
        """No setting is reachable only through the environment or the file."""
        assert {p.name for _, p in _options()} == set(FIELDS)
        assert set(LAYERS) == set(FIELDS)

    @pytest.mark.parametrize(("words", "option"), _options(),
                             ids=lambda v: " ".join(v) if isinstance(v, list) else v.name)
    def test_its_flag_is_named_for_its_key_and_its_help_names_its_variable(
            self, words: list[str], option: Any) -> None:
        """`--flush-rows` is `flush_rows` and CDC_FLUSH_ROWS; FLAG_NAMES lists the others."""
        assert option.name is not None
        assert option.opts[0] == flag_name(option.name)
        assert f"CDC_{option.name.upper()}" in (option.help or "")

    @pytest.mark.parametrize(("words", "option"), _options(),
                             ids=lambda v: " ".join(v) if isinstance(v, list) else v.name)
    def test_flag_beats_environment_beats_file(
            self, words: list[str], option: Any, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Through the real command line: each layer wins over the ones below it."""
        name = str(option.name)
        in_file, in_env, in_flag, from_file, from_env, from_flag = LAYERS[name]
        config = tmp_path / "cdc.toml"
        config.write_text(f"{name} = {json.dumps(in_file)}\n")
        if option.is_flag:
            flag = [option.opts[0] if in_flag else option.secondary_opts[0]]
        else:
            flag = [option.opts[0], str(in_flag)]

        def loaded(flags: dict[str, Any], config_file: str | None, **kw: Any) -> Settings:
            raise _Loaded(load_settings(flags, config_file, **kw))

        monkeypatch.setattr(cli_options, "load_settings", loaded)
        arguments = ["x" for _, c in _commands() if _ == words
                     for p in c.params if p.param_type_name == "argument"]
        base = {f"CDC_{f.upper()}": None for f in FIELDS}
        if name != "dsn":
            base["CDC_DSN"] = "postgresql://base/db"
        for extra, env, expected in ((flag, in_env, from_flag), ([], in_env, from_env),
                                     ([], None, from_file)):
            result = CliRunner().invoke(
                cli.app, [*words, *arguments, "--config", str(config), *extra],
                env={**base, f"CDC_{name.upper()}": env})
            assert isinstance(result.exception, _Loaded), result.output
            assert getattr(result.exception.settings, name) == expected, (extra, env)

    def test_the_readme_option_table_lists_every_setting(self) -> None:
        """Each setting has a row: flag, variable, key."""
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        rows = [line.replace("[no-]", "") for line in readme.splitlines()
                if line.startswith("| `--")]
        for name in FIELDS:
            cells = [f"`{flag_name(name)}", f"`CDC_{name.upper()}`", f"`{name}`"]
            assert any(all(c in row for c in cells) for row in rows), name
