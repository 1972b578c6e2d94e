"""The command line is usable from its help alone."""

from __future__ import annotations

import pytest
from rawlake import run_cdc


class TestHelp:
    def test_top_level_help_lists_every_command(self) -> None:
        """`cdc --help` names the commands a user needs."""
        result = run_cdc(["--help"])
        assert result.returncode == 0
        for command in ("stream", "snapshot", "status", "slot"):
            assert command in result.stdout

    @pytest.mark.parametrize(("command", "words"), [
        (["stream"], ["--dsn", "CDC_DSN", "--until-caught-up", "--flush-rows", "--metrics-port"]),
        (["snapshot"], ["--mode", "--workers", "cannot see deletes", "--updated-at"]),
        (["status"], ["--json", "--max-lag-bytes", "--max-lag-seconds"]),
        (["slot", "drop"], ["--slot", "retaining WAL"]),
    ])
    def test_each_command_documents_its_options(self, command: list[str],
                                                words: list[str]) -> None:
        """Each command's help names its options and their environment variables."""
        result = run_cdc([*command, "--help"])
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        for word in words:
            assert word in text, word

    def test_version_prints_the_version(self) -> None:
        """`cdc --version` answers without needing a database."""
        result = run_cdc(["--version"])
        assert result.returncode == 0
        assert result.stdout.startswith("cdc ")
