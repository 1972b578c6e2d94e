"""Settings come from cdc.toml, CDC_* variables and flags, in rising precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc.config import load_settings
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
