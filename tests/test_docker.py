"""docker/: the compose stack and image are consistent with cdc (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from cdc.cli import app
from cdc.config import FIELDS

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def command_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(a) for a in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def cli_command(*path: str) -> Any:
    """The click command behind ``cdc <path>`` (typer builds it from the app)."""
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def test_the_cdc_service_builds_from_the_dockerfile_in_docker(compose: dict[str, Any]) -> None:
    """Its build context plus dockerfile names docker/Dockerfile, whose COPY sources exist."""
    build = services(compose)["cdc"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]

    assert dockerfile == DOCKER / "Dockerfile"
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "pip install ." in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (context / source).exists(), source


def test_the_cdc_service_runs_cdc_stream_with_options_that_exist(
    compose: dict[str, Any]
) -> None:
    """Every --option in its command is an option of `cdc stream`; the lake is the bucket."""
    args = command_args(services(compose)["cdc"])
    stream = cli_command("stream")
    known = {opt for param in stream.params for opt in param.opts}

    assert 'ENTRYPOINT ["cdc"]' in (DOCKER / "Dockerfile").read_text()  # args follow `cdc`
    assert args[0] == "stream"
    used = [a.split("=")[0] for a in args[1:] if a.startswith("--")]
    assert used, args
    assert set(used) <= known, set(used) - known
    assert {"--dsn", "--lake", "--s3-endpoint"} <= set(used)
    lake = args[args.index("--lake") + 1]
    assert lake == "s3://media-retail/lake"
    assert args[args.index("--s3-endpoint") + 1] == "http://minio:9000"


def test_the_bucket_of_the_lake_is_created_by_a_one_shot_mc_service(
    compose: dict[str, Any]
) -> None:
    """minio/mc makes the bucket; cdc waits for it to finish successfully."""
    all_services = services(compose)
    maker = all_services["create-bucket"]

    assert maker["image"].startswith("minio/mc")
    assert "mc mb --ignore-existing local/media-retail" in " ".join(maker["entrypoint"].split())
    depends = all_services["cdc"]["depends_on"]
    assert depends["create-bucket"]["condition"] == "service_completed_successfully"
    assert all_services["minio"]["image"].startswith("minio/minio")


def test_postgres_is_version_15_with_logical_wal(compose: dict[str, Any]) -> None:
    """The source runs postgres:15 with wal_level=logical, and the DSN points at it."""
    postgres = services(compose)["postgres"]

    assert postgres["image"] == "postgres:15"
    args = command_args(postgres)
    assert args[0] == "postgres"
    assert "wal_level=logical" in args
    cdc_args = command_args(services(compose)["cdc"])
    dsn = cdc_args[cdc_args.index("--dsn") + 1]
    env = environment(postgres)
    assert dsn == (f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{env['POSTGRES_DB']}")


def test_the_cdc_service_sets_only_environment_variables_cdc_reads(
    compose: dict[str, Any]
) -> None:
    """CDC_* names are settings (cdc.config.FIELDS); the rest are AWS SDK variables."""
    env = environment(services(compose)["cdc"])
    settings = {f"CDC_{name.upper()}" for name in FIELDS}

    assert env
    for name in env:
        assert name in settings or name.startswith("AWS_"), name
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    minio = environment(services(compose)["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
