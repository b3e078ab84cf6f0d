"""The container image, built and started outside Docker by following the Dockerfile itself
(tests/support/dockerfile.py): its RUN and COPY lines under a temporary root, then its
ENTRYPOINT, HEALTHCHECK and STOPSIGNAL as the image's non-root user.

The build is the slow part (pip installs two locked environments and mypyc compiles the hot path,
a few minutes), done once for the module.  The default container binds 0.0.0.0:8080 and :8443
like the image; it runs in a network namespace of its own (`unshare --net`), where those ports
are free and nothing outside the namespace can reach them, and the probes and clients join it
with `nsenter`.  Every other gateway here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.dockerfile import Image, ImageBuild
from tests.support.process import free_port, http_get, wait_until

REPO = Path(__file__).resolve().parents[2]

# the build takes minutes on a loaded 2-core machine; every step inside has its own bound
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

#: Python that talks to the default container from inside its network namespace
CLIENT = r"""
import json, ssl, sys, urllib.error, urllib.request
certs = sys.argv[1]

def get(url, context=None):
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())

tls = ssl.create_default_context(cafile=f"{certs}/ca.crt")
mutual = ssl.create_default_context(cafile=f"{certs}/ca.crt")
mutual.load_cert_chain(f"{certs}/client.crt", f"{certs}/client.key")
echo = get("http://127.0.0.1:8080/echo/hello?x=1")
anonymous = get("https://localhost:8443/mtls/x", tls)
client = get("https://localhost:8443/mtls/x", mutual)
print(json.dumps({"echo": echo, "anonymous": anonymous, "client": client}))
"""


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Image, list[Path]]]:
    """The built image and the files it holds (before any test starts it)."""
    # not under pytest's 0700 temporary directory: the image's user must reach these files
    work = Path(tempfile.mkdtemp(prefix="gateway-image-"))
    try:
        built = ImageBuild(REPO / "Dockerfile", REPO, work).build()
        files = sorted(built.root.rglob("*"))
        yield built, files
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _in_image(image: Image, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*image.as_user(), *argv],
        env={**image.env, **env},
        cwd=image.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _hot_modules() -> set[str]:
    """The dotted names setup.py compiles."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HOT_MODULES":
            listed = ast.literal_eval(node.value)
            return {p.removesuffix(".py").replace("/", ".") for p in listed}
    raise AssertionError("setup.py has no HOT_MODULES")


def test_the_hot_path_is_compiled_and_loads_as_the_image_user(
    image: tuple[Image, list[Path]],
) -> None:
    built, _ = image
    assert (built.uid, built.gid) == (10001, 10001)
    code = (
        "import importlib, json, gateway._compiled as c; c.check_fresh(); "
        "names = sorted(c.compiled_modules()); "
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))"
    )
    result = _in_image(built, "python", "-I", "-c", code)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert set(loaded) == _hot_modules()
    venv = str(built.path("/opt/gateway"))
    assert all(path.startswith(venv) and path.endswith(".so") for path in loaded.values())


class _Upstream(http.server.ThreadingHTTPServer):
    seen: list[tuple[str, str]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Upstream

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("X-Forwarded-For", "")))
        body = json.dumps({"upstream": "local", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    server = _Upstream(("127.0.0.1", 0), _Handler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def test_gateway_run_from_the_image_proxies_to_a_local_upstream(
    image: tuple[Image, list[Path]], upstream: _Upstream
) -> None:
    built, _ = image
    http, admin = free_port(), free_port()
    config = built.root.parent / "proxy.yaml"
    config.write_text(
        gateway_yaml(
            listeners=[listener(http)],
            admin={"bind": f"127.0.0.1:{admin}"},
            shutdown={"drain_delay": "100ms", "timeout": "5s"},
            upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream.server_address[1]}")},
            routes=[route("app", "app", "/app")],
        )
    )
    config.chmod(0o644)
    # through the image's entrypoint, as `docker run IMAGE run -c ...` would start it; no
    # development certificates (this config has no TLS)
    gateway = subprocess.Popen(
        [*built.as_user(), *built.entrypoint, "run", "-c", str(config), "--no-watch"],
        env={**built.env, "GATEWAY_DEV_CERTS": "0"},
        cwd=built.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: gateway.poll() is not None or _ready(admin), 30, "readyz")
        assert gateway.poll() is None, gateway.communicate()[0].decode()
        status, body = http_get(f"http://127.0.0.1:{http}/app/hello?x=1")
        assert status == 200
        assert json.loads(body) == {"upstream": "local", "path": "/app/hello?x=1"}
        assert upstream.seen == [("/app/hello?x=1", "127.0.0.1")]
    finally:
        gateway.send_signal(signal.SIGTERM)
        out, _ = gateway.communicate(timeout=30)
    assert gateway.returncode == 0, out.decode()[-2000:]
    assert not list(built.path("/app/certs").iterdir())


class _Container:
    """The default container: the image's ENTRYPOINT and CMD as its user, in a network
    namespace of its own."""

    def __init__(self, image: Image, log: Path) -> None:
        self.image = image
        self.log_path = log
        self.log = log.open("ab")
        # unshare execs sh, which execs setpriv, then the entrypoint, then the gateway: one pid
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--",
                "/bin/sh",
                "-c",
                'ip link set lo up && exec "$@"',
                "container",
                *image.as_user(),
                *image.entrypoint,
                *image.cmd,
            ],
            env=image.env,
            cwd=image.workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def enter(
        self, *argv: str, as_user: bool = True, timeout: float = 30, **env: str
    ) -> subprocess.CompletedProcess[str]:
        user = self.image.as_user() if as_user else []
        return subprocess.run(
            ["nsenter", f"--target={self.proc.pid}", "--net", "--", *user, *argv],
            env={**self.image.env, **env},
            cwd=self.image.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def healthy(self) -> bool:
        """One run of the HEALTHCHECK's command, bounded by its --timeout as Docker bounds it."""
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        timeout = float(self.image.healthcheck_flags["timeout"].removesuffix("s"))
        try:
            return self.enter(*self.image.healthcheck, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> int:
        self.proc.send_signal(getattr(signal, self.image.stopsignal))
        try:
            return self.proc.wait(45)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def test_the_default_container_makes_its_certificates_at_first_start_and_becomes_healthy(
    image: tuple[Image, list[Path]],
) -> None:
    built, _ = image
    certs = built.path("/app/certs")
    log = built.root.parent / "container.log"
    container = _Container(built, log)
    try:
        wait_until(container.healthy, 60, "the HEALTHCHECK to pass")
        # the same command fails where nothing answers ready (port 9: nothing listens)
        closed = container.enter(
            *built.healthcheck, GATEWAY_HEALTH_URL="http://127.0.0.1:9/readyz", timeout=10
        )
        assert closed.returncode != 0
        # the CA's key was never written: nobody can sign another client certificate
        names = sorted(p.name for p in certs.iterdir())
        assert names == ["ca.crt", "client.crt", "client.key", "server.crt", "server.key"]
        for path in certs.iterdir():
            assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001)
        assert stat.S_IMODE((certs / "server.key").stat().st_mode) == 0o600
        answers = container.enter(sys.executable, "-c", CLIENT, str(certs), as_user=False)
        assert answers.returncode == 0, answers.stderr
        seen = json.loads(answers.stdout)
        assert seen["echo"][0] == 200
        assert seen["echo"][1]["path"] == "/echo/hello"
        assert seen["anonymous"][0] == 403
        assert seen["anonymous"][1]["type"].endswith("client_certificate_required")
        assert seen["client"][0] == 200
        assert "client-cert" in seen["client"][1]["headers"]
        first = (certs / "server.crt").read_bytes()
        # SIGTERM drains and exits 0
        assert container.stop() == 0, log.read_text()[-3000:]
        # a restart keeps the certificates it made
        again = _Container(built, log)
        try:
            wait_until(again.healthy, 60, "the HEALTHCHECK after a restart")
            assert (certs / "server.crt").read_bytes() == first
            assert again.stop() == 0
        finally:
            again.kill()
    finally:
        container.kill()
    lines = log.read_text().splitlines()
    assert any("the CA's key was discarded" in line for line in lines)


def test_the_sbom_lists_every_python_package_the_image_runs(
    image: tuple[Image, list[Path]],
) -> None:
    built, _ = image
    sbom = json.loads(built.path("/app/sbom.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    components = {_normal(c["name"]): c["version"] for c in sbom["components"]}
    lock = {}
    for match in re.finditer(
        r"^([A-Za-z0-9._-]+)==(\S+)(?: ; (.*?))? \\$",
        (REPO / "requirements.lock").read_text(),
        re.MULTILINE,
    ):
        lock[_normal(match.group(1))] = (match.group(2), match.group(3))
    assert components["uvloop"] == lock["uvloop"][0]
    for name, (version, marker) in lock.items():
        if marker is None:  # markers: only where they hold (async-timeout before 3.11.3)
            assert components.get(name) == version, name
    assert components["gateway"] == "0.1.0"
    # what built the image is not in it
    assert not {"pip", "setuptools", "mypy", "cyclonedx-bom"} & set(components)


#: a PEM private key with its body (libraries name the markers alone, cryptography among them)
PRIVATE_KEY = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{64,}-----END"
)


def test_the_private_key_pattern_finds_a_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert PRIVATE_KEY.search(b"padding\n" + key)
    assert not PRIVATE_KEY.search(b'_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n')


def _normal(name: str) -> str:
    """A project name as PEP 503 compares them (PyYAML, pyyaml; typing_extensions, -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_image_holds_no_private_key_no_compiler_and_only_certs_is_writable(
    image: tuple[Image, list[Path]],
) -> None:
    built, files = image
    assert {p.relative_to(built.root).parts[0] for p in files} == {"opt", "app"}
    certs = built.path("/app/certs")
    for path in files:
        info = path.lstat()
        if path == certs:
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (10001, 0o700)
            continue
        assert info.st_uid == 0, path
        if stat.S_ISLNK(info.st_mode):
            continue  # a link's own mode is always 0777; its target is checked where it lies
        # no file the gateway's user, or anyone but root, may change
        assert not stat.S_IMODE(info.st_mode) & (stat.S_IWGRP | stat.S_IWOTH), path
        if not stat.S_ISREG(info.st_mode):
            continue
        # .pem files are certificates here (grpc's roots.pem): the content check finds keys
        assert path.suffix != ".key", path
        assert path.name not in {"gcc", "cc", "g++", "clang", "ld", "as"}, path
        with path.open("rb") as handle:
            assert not PRIVATE_KEY.search(handle.read()), path
    assert certs in files
    assert not any(p.parent == certs for p in files)
    assert os.access(built.path("/opt/gateway/bin/gateway-entrypoint"), os.X_OK)
