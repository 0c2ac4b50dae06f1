"""scripts/compose.yml, checked without a Docker engine: valid against the Compose
specification's schema, its variables are settings the project reads, and only the gateway
can hold chat tokens. `docker compose config` also runs where the compose plugin is present."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "scripts" / "compose.yml"
APP_SERVICES = ("migrate", "gateway", "worker")
CHAT_TOKENS = {"DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _setting_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(name.upper())
        choices = getattr(field.validation_alias, "choices", None) or []
        names.update(choice.upper() for choice in choices if isinstance(choice, str))
    return names


def test_the_file_follows_the_compose_specification():
    pytest.importorskip("check_jsonschema")
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_broken_file_is_caught_by_the_same_check(tmp_path):
    pytest.importorskip("check_jsonschema")
    broken = tmp_path / "compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthcheks:"))
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(broken)], capture_output=True, text=True)
    assert done.returncode == 1


def test_every_app_variable_is_a_setting(compose):
    known = _setting_names()
    for service in APP_SERVICES:
        environment = compose["services"][service]["environment"]
        assert set(environment) <= known, service


def test_every_container_shares_postgresql_for_data_and_media(compose):
    for service in APP_SERVICES:
        environment = compose["services"][service]["environment"]
        assert environment["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["MEDIA_URL"] == environment["DATABASE_URL"]
        assert "@postgres:5432/" in environment["DATABASE_URL"]


def test_only_the_gateway_connects_to_the_chat_platforms(compose):
    worker = compose["services"]["worker"]
    assert worker["command"] == ["python", "-m", "bot", "--no-gallery"]
    assert {name: worker["environment"][name] for name in CHAT_TOKENS} == dict.fromkeys(
        CHAT_TOKENS, "")
    assert compose["services"]["gateway"]["command"] == ["python", "-m", "bot"]


def test_the_schema_is_migrated_before_the_app_starts(compose):
    for service in ("gateway", "worker"):
        assert compose["services"][service]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully")
    assert compose["services"]["migrate"]["command"] == [
        "sh", "-c", "talkmosaic db upgrade && talkmosaic db sweep"]


def test_docker_compose_accepts_it_where_installed(tmp_path):
    if not shutil.which("docker") or subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here")
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, env={"POSTGRES_PASSWORD": "x",
                                                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
