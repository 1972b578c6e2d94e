"""A password never appears in any output, log or lake file; bad settings are one line each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import SourceDb
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.config import Settings, load_settings
from cdc.lake.s3 import StorageOptions
from cdc.sandbox import free_port

PASSWORD = "p@ss:w/rd% 1x"  # noqa: S105 - the secret the tests look for
FORMS = (PASSWORD, quote(PASSWORD), quote(PASSWORD, safe=""), "rd% 1x", "rd%25")


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdc", *args], capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL, check=False,
                          env={**os.environ, **(env or {})})


def assert_no_password(*texts: str) -> None:
    for text in texts:
        for form in FORMS:
            assert form not in text, text


def url_dsn(source: SourceDb, password: str) -> str:
    params = conninfo_to_dict(source.dsn)
    return (f"postgresql://{params.get('user', 'postgres')}:{password}@{params['host']}:"
            f"{params['port']}/{params['dbname']}")


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("cdc: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class TestPasswordNeverShown:
    @pytest.mark.parametrize("form", ["url", "keyvalue"])
    def test_every_command_on_success(
        self, source: SourceDb, settings: Settings, form: str
    ) -> None:
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        source.execute("INSERT INTO t VALUES (1, 'a')")
        dsn = (url_dsn(source, quote(PASSWORD, safe="")) if form == "url"
               else make_conninfo(source.dsn, password=PASSWORD))
        common = ["--dsn", dsn, "--slot", settings.slot, "--publication", settings.publication]
        lake = ["--lake", settings.lake]
        outputs = []
        for args in (["check", *common], ["check", *common, "--json"],
                     ["snapshot", *common, *lake, "--log-format", "json", "--log-level", "debug"],
                     ["stream", *common, *lake, "--until-caught-up", "--log-level", "debug"],
                     ["stream", *common, *lake, "--until-caught-up", "--log-format", "json"],
                     ["status", "--dsn", dsn, "--slot", settings.slot, *lake, "--json"],
                     ["status", "--dsn", dsn, "--slot", settings.slot, *lake]):
            result = run(args)
            assert result.returncode == 0, result.stderr
            outputs += [result.stdout, result.stderr]
        assert_no_password(*outputs)
        files = [p for p in Path(settings.lake).rglob("*") if p.is_file()]
        assert files
        for path in files:
            data = path.read_bytes()
            for secret in FORMS:
                assert secret.encode() not in data, path

    def test_malformed_and_unreachable_dsns(self, source: SourceDb, tmp_path: Path) -> None:
        """Each is one line, a configuration error (2) or unreachable (4), and no password."""
        params = conninfo_to_dict(source.dsn)
        cases = {
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/db": 2,  # not percent-encoded
            f"host=127.0.0.1 password={PASSWORD}": 2,  # unquoted space
            f"mysql://root:{quote(PASSWORD, safe='')}@127.0.0.1/db": 2,
            f"postgresql://u:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/db": 4,
            make_conninfo(source.dsn, password=PASSWORD, dbname="no_such_db"): 4,
            make_conninfo(source.dsn, password=PASSWORD, port=str(free_port())): 4,
        }
        for dsn, code in cases.items():
            for args in (["stream", "--until-caught-up", "--lake", str(tmp_path / "l")],
                         ["check"], ["status", "--lake", str(tmp_path / "l")]):
                result = run([*args, "--dsn", dsn])
                assert result.returncode == code, (dsn, args, result.stderr)
                one_error(result)
                assert_no_password(result.stdout, result.stderr)
        assert params  # the source was reachable all along

    def test_settings_and_storage_options_repr_hide_secrets(self) -> None:
        dsn = f"postgresql://u:{quote(PASSWORD, safe='')}@h/db"
        settings = load_settings({"dsn": dsn}, env={})
        assert_no_password(repr(settings), repr(settings.dsn), repr(settings.__dict__))
        assert str(settings.dsn) == dsn  # the real value is still what connects
        options = StorageOptions({"AWS_SECRET_ACCESS_KEY": "sekrit", "AWS_REGION": "eu"})
        assert "sekrit" not in repr(options)
        assert "eu" in repr(options)


    @pytest.mark.parametrize("fmt", ["console", "json"])
    def test_a_logged_traceback_shows_no_local_variables(
        self, fmt: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import io

        import structlog

        from cdc.log import configure

        def fails(dsn: str) -> None:
            raise RuntimeError("boom")

        saved = structlog.get_config()
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        try:
            configure(fmt)
            try:
                fails(f"postgresql://u:{PASSWORD}@h/db")
            except RuntimeError:
                structlog.get_logger("t").exception("crashed")
        finally:
            structlog.configure(**saved)  # later tests log where they did before
        assert "boom" in err.getvalue()
        assert_no_password(err.getvalue())


class TestOneLinePerBadSetting:
    def test_metrics_port_out_of_range(self, tmp_path: Path) -> None:
        result = run(["stream", "--dsn", "host=x", "--metrics-port", "99999"])
        assert result.returncode == 2
        assert "not a TCP port" in one_error(result)

    def test_unknown_log_level(self) -> None:
        result = run(["stream", "--dsn", "host=x", "--log-level", "loud"])
        assert result.returncode == 2
        assert "log level 'loud'" in one_error(result)

    def test_keys_beside_the_cdc_table(self, tmp_path: Path) -> None:
        config = tmp_path / "cdc.toml"
        config.write_text('dsn = "host=x"\n[cdc]\nslot = "s"\n')
        result = run(["stream", "--config", str(config)])
        assert result.returncode == 2
        assert "beside its [cdc] table: dsn" in one_error(result)

    def test_unknown_aws_profile(self, tmp_path: Path) -> None:
        result = run(["compact", "--lake", "s3://bucket/lake"],
                     env={"AWS_PROFILE": "no_such_profile_here",
                          "AWS_CONFIG_FILE": str(tmp_path / "none")})
        assert result.returncode == 2
        assert "AWS profile not found" in one_error(result)
