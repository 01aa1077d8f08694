"""deploy/Dockerfile.serve and Dockerfile.train, read as instructions (no Docker engine
here), and the trainer's entrypoint run for real on a small corpus."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.deploy_assets import (
    DEPLOY,
    ROOT,
    app_paths,
    compose_env,
    dockerfile_instructions,
    final_stage,
    settings_env_names,
    settings_from_env,
    url_paths,
)

SERVE = DEPLOY / "Dockerfile.serve"
TRAIN = DEPLOY / "Dockerfile.train"
ENTRYPOINT = DEPLOY / "train-entrypoint.sh"


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def user_of(instructions: list[tuple[str, str]]) -> str:
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the final stage sets no USER"
    return users[-1]


def runs(instructions: list[tuple[str, str]]) -> str:
    return "\n".join(args for keyword, args in instructions if keyword == "RUN")


def test_serve_image_installs_the_base_dependencies_without_torch() -> None:
    instructions = dockerfile_instructions(SERVE)
    assert re.search(r"\bpip install \.(\s|$)", runs(instructions)), (
        "install the project, no extras"
    )
    assert "torch" not in {requirement_name(r) for r in project()["dependencies"]}  # type: ignore[attr-defined]
    copied = {
        args.split()[0]
        for keyword, args in instructions
        if keyword == "COPY" and "--from" not in args
    }
    assert not copied & {"training", "export", "."}, "the serving image needs no training code"
    assert "pip install" not in runs(final_stage(instructions)), (
        "the runtime stage installs nothing"
    )


def test_serve_image_runs_as_a_non_root_user() -> None:
    user = user_of(final_stage(dockerfile_instructions(SERVE)))
    assert user.split(":")[0] not in ("", "0", "root")


def test_serve_image_healthcheck_asks_healthz_on_the_served_port() -> None:
    final = final_stage(dockerfile_instructions(SERVE))
    (check,) = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert url_paths(check) == ["/healthz"]
    assert "/healthz" in app_paths()
    assert "SIMMER_PORT" in check


def test_serve_image_settings_are_valid_and_expose_the_listening_port() -> None:
    final = final_stage(dockerfile_instructions(SERVE))
    simmer_env = {k: v for k, v in env_of(final).items() if k.startswith("SIMMER_")}
    assert set(simmer_env) <= settings_env_names(), set(simmer_env) - settings_env_names()
    settings = settings_from_env(simmer_env)
    assert settings.host == "0.0.0.0"
    exposed = [args for keyword, args in final if keyword == "EXPOSE"]
    assert exposed == [str(settings.port)]
    assert str(settings.bundle) == compose_env("simmer")["SIMMER_BUNDLE"]
    (cmd,) = [args for keyword, args in final if keyword == "CMD"]
    assert cmd == '["python", "-m", "service"]'


def test_train_image_pins_the_cpu_build_of_the_train_extras_torch() -> None:
    extras: dict[str, list[str]] = project()["optional-dependencies"]  # type: ignore[assignment]
    (pin,) = [r for r in extras["train"] if requirement_name(r) == "torch"]
    instructions = dockerfile_instructions(TRAIN)
    text = runs(instructions)
    assert re.search(rf"pip install --index-url \S+ {re.escape(pin)}(\s|$)", text), pin
    (index,) = [args for keyword, args in instructions if keyword == "ARG" and "INDEX" in args]
    assert index.split("=", 1)[1].rstrip("/").endswith("/whl/cpu")
    assert text.index(pin) < text.index('pip install ".[train]"'), "torch must come first"


def test_train_image_runs_the_entrypoint_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions(TRAIN)
    (copy,) = [
        args for keyword, args in instructions if keyword == "COPY" and ENTRYPOINT.name in args
    ]
    source, target = copy.split()
    assert (ROOT / source).resolve() == ENTRYPOINT.resolve()
    (cmd,) = [args for keyword, args in final_stage(instructions) if keyword == "CMD"]
    assert Path(target).name in cmd
    assert user_of(instructions).split(":")[0] not in ("", "0", "root")
    assert env_of(instructions)["BUNDLE"] == compose_env("trainer")["BUNDLE"]
    assert os.access(ENTRYPOINT, os.X_OK)


def test_corpus_fetcher_takes_the_cache_option_the_entrypoint_passes() -> None:
    assert 'training.fetch --cache "$CACHE"' in ENTRYPOINT.read_text()
    result = subprocess.run(
        [sys.executable, "-m", "training.fetch", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--cache" in result.stdout, result.stderr


@pytest.mark.slow
def test_trainer_entrypoint_writes_a_verified_bundle_then_skips(
    tmp_path: Path, epicurious_path: Path
) -> None:
    from simmer.bundle import load_bundle

    bundle = tmp_path / "models" / "default"
    env = {
        **os.environ,
        "BUNDLE": str(bundle),
        "CORPUS": str(epicurious_path),
        "PRESET": "tiny",
        "MAX_RECIPES": "100",
        "RUN_DIR": str(tmp_path / "run"),
        "PYTHON": sys.executable,
    }
    first = subprocess.run(
        ["sh", str(ENTRYPOINT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert load_bundle(bundle).name
    stamp = (bundle / "manifest.json").stat().st_mtime_ns

    second = subprocess.run(
        ["sh", str(ENTRYPOINT)],
        cwd=ROOT,
        env={**env, "CORPUS": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert (bundle / "manifest.json").stat().st_mtime_ns == stamp
