"""deploy/kubernetes/: the manifests read as an operator reads them, without a cluster.

No API server or schema is reachable here (kubeconform needs JSON schemas fetched at run time),
so the checks are structural, on the parsed YAML: every manifest parses and is listed by a
kustomization, selectors and labels agree, probes reach the status listener the config binds,
the volumes are mounted where the config's files are, the pod is non-root with a read-only
root, the grace period outlasts the drain, and no secret is committed. Then the ConfigMap's
gateway config is run for real: `gateway check` in the directory layout the kubelet gives a
ConfigMap and a Secret volume, and `gateway run` with the Deployment's own arguments and
environment in that layout, where a Secret and a ConfigMap update (the kubelet's `..data`
symlink swap) are applied live and SIGTERM drains as the grace period expects.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.units import parse_duration
from gateway.dev_certificates import init_dev_certificates
from gateway.watch import watched_names
from tests.support.config import load_config
from tests.support.process import free_port, http_get, wait_until

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
README = REPO / "README.md"
#: the minimal Redis, applied on its own (the gateway's kustomization expects an existing one)
REDIS_DIR = K8S / "redis"
#: the Secrets' shapes, for reference only: never listed by a kustomization
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
#: the key of the ConfigMap that holds the gateway's config
CONFIG_KEY = "gateway.yaml"

Obj = dict[str, Any]


# -- reading the manifests ---------------------------------------------------------------------


def documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(directory: Path) -> Obj:
    data: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def kustomized(directory: Path) -> list[Obj]:
    """Every object the kustomization in `directory` lists, as `kubectl apply -k` would."""
    return [o for r in kustomization(directory)["resources"] for o in documents(directory / r)]


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


BASE = kustomized(K8S)
REDIS = kustomized(REDIS_DIR)
DEPLOYMENT = one(BASE, "Deployment", "gateway")
POD = DEPLOYMENT["spec"]["template"]["spec"]
[CONTAINER] = [c for c in POD["containers"] if c["name"] == "gateway"]
CONFIGMAP = one(BASE, "ConfigMap")
CONFIG_TEXT: str = CONFIGMAP["data"][CONFIG_KEY]
CONFIG: Obj = yaml.safe_load(CONFIG_TEXT)


def env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def config_path() -> str:
    """Where the container reads its config: GATEWAY_CONFIG, as the image's CLI does."""
    path: str = env(CONTAINER)["GATEWAY_CONFIG"]["value"]
    return path


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in container["ports"]}
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"{port} names no port of the container"
    return int(named[port])


def bind_port(bind: str) -> int:
    return int(bind.rpartition(":")[2])


def mount_of(volume: str) -> Obj:
    mounts = [m for m in CONTAINER["volumeMounts"] if m["name"] == volume]
    assert len(mounts) == 1, f"volume {volume} is mounted {len(mounts)} times"
    return mounts[0]


def volume(name: str) -> Obj:
    volumes = [v for v in POD["volumes"] if v["name"] == name]
    assert len(volumes) == 1, f"{len(volumes)} volumes are named {name}"
    return volumes[0]


def files_named_by(config: Obj) -> list[str]:
    """The certificate, key, CA and JWKS paths the config names, resolved the way the loader
    resolves them: against the config file's directory, lexically (symlinks are not followed,
    so a path stays inside the mount and never points into a `..data` generation)."""
    base = posixpath.dirname(config_path())
    found: list[str] = []
    tls_file_keys = {"cert", "key", "client_ca", "ca"}

    def walk(node: object, in_tls: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                is_file = key == "jwks_file" or (in_tls and key in tls_file_keys)
                if is_file and isinstance(value, str):
                    found.append(posixpath.normpath(posixpath.join(base, value)))
                else:
                    walk(value, in_tls or key == "tls")
        elif isinstance(node, list):
            for item in node:
                walk(item, in_tls)

    walk(config, False)
    return found


def workers() -> int:
    args = CONTAINER["args"]
    return int(args[args.index("--workers") + 1])


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pre_stop_seconds() -> float:
    """What a preStop hook adds before SIGTERM (0 without one)."""
    hook = CONTAINER.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = " ".join(hook.get("exec", {}).get("command", []))
    match = re.search(r"sleep (\d+)", command)
    assert match, f"a preStop hook whose length cannot be read: {hook}"
    return float(match.group(1))


def readme_kubernetes_section() -> str:
    text = README.read_text()
    assert "\n## Deploying\n" in text, "README has no `## Deploying` section"
    deploying = text.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    assert "\n### Kubernetes\n" in deploying, "`## Deploying` has no `### Kubernetes`"
    return deploying.split("\n### Kubernetes\n", 1)[1].split("\n### ", 1)[0]


# -- structure ---------------------------------------------------------------------------------


def test_every_manifest_parses_and_is_listed_by_a_kustomization() -> None:
    listed = {
        (directory / r).resolve()
        for directory in (K8S, REDIS_DIR)
        for r in kustomization(directory)["resources"]
    }
    for path in sorted(K8S.rglob("*.yaml")):
        objects = documents(path)
        assert objects, f"{path} is empty"
        if path.name == "kustomization.yaml":
            assert objects[0]["kind"] == "Kustomization"
            continue
        assert path.resolve() in listed or path == SECRETS_EXAMPLE, f"{path} is listed nowhere"
        for o in objects:
            assert {"apiVersion", "kind", "metadata"} <= set(o), f"{path}: {o.get('kind')}"
            assert o["metadata"]["name"]
            # namespace-agnostic: `kubectl apply -n` or a kustomization chooses it
            assert "namespace" not in o["metadata"], f"{path} names a namespace"
    kinds = {o["kind"] for o in BASE}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    assert {o["kind"] for o in REDIS} == {"Deployment", "Service", "NetworkPolicy"}
    # no manifest applied by `kubectl apply -k` is a Secret: those are created from real files
    assert not [o for o in BASE + REDIS if o["kind"] == "Secret"]


def test_deployment_service_and_budget_select_the_same_pods() -> None:
    selector = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    service = one(BASE, "Service", "gateway")
    assert service["spec"]["selector"] == selector
    budget = one(BASE, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["selector"]["matchLabels"] == selector
    # one pod at a time, and never the last one of the replicas
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable") == 1
    assert DEPLOYMENT["spec"]["replicas"] >= 2
    rolling = DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    for constraint in POD["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == selector
    # the Service's ports reach the listeners the config binds, and not the status port
    listener_ports = {bind_port(x["bind"]) for x in CONFIG["listeners"]}
    targets = {container_port(CONTAINER, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == listener_ports
    assert bind_port(CONFIG["status"]["bind"]) not in targets


def test_probes_reach_the_status_listener_the_config_binds() -> None:
    status = CONFIG["status"]["bind"]
    host, _, port = status.rpartition(":")
    assert host == "0.0.0.0", "the kubelet probes the pod IP: status must not be on loopback"
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = CONTAINER[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(CONTAINER, get["port"]) == int(port), probe
        assert get.get("scheme", "HTTP") == "HTTP"
    # the admin API stays on loopback, and no container port advertises it
    admin_host, _, admin_port = CONFIG["admin"]["bind"].rpartition(":")
    assert admin_host == "127.0.0.1"
    assert int(admin_port) not in {p["containerPort"] for p in CONTAINER["ports"]}
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_config_and_certificates_are_directory_mounts_where_the_config_looks() -> None:
    # the ConfigMap, as a directory holding the file GATEWAY_CONFIG names
    config_volume = volume("config")
    assert config_volume["configMap"]["name"] == CONFIGMAP["metadata"]["name"]
    config_mount = mount_of("config")
    assert posixpath.join(config_mount["mountPath"], CONFIG_KEY) == config_path()
    # the Secret, as a directory holding every file the config names
    certs_volume = volume("certs")
    secret = certs_volume["secret"]["secretName"]
    certs_mount = mount_of("certs")["mountPath"]
    named = files_named_by(CONFIG)
    assert named, "the config names no certificate"
    for path in named:
        assert posixpath.dirname(path) == certs_mount, f"{path} is outside the Secret's mount"
    # no subPath anywhere: the kubelet never updates a subPath mount, so nothing would reload
    for mount in CONTAINER["volumeMounts"]:
        assert "subPath" not in mount, mount["name"]
        assert "subPathExpr" not in mount, mount["name"]
    assert mount_of("config").get("readOnly") is True
    assert mount_of("certs").get("readOnly") is True
    # the Secret's keys are the file names, and the README's kubectl command writes each one
    assert "items" not in certs_volume["secret"], "items would pin keys; mount the whole Secret"
    section = readme_kubernetes_section()
    command = re.search(rf"kubectl create secret generic {secret}\b(?:[^\n]*\\\n)*[^\n]*", section)
    assert command, f"the README does not create the {secret} Secret"
    for path in named:
        assert f"--from-file={posixpath.basename(path)}=" in command.group(0)
    # mode 0440 with the runtime group: the key is readable by the gateway and nobody else
    assert certs_volume["secret"]["defaultMode"] == 0o440
    assert POD["securityContext"]["fsGroup"] == POD["securityContext"]["runAsGroup"]


def test_the_only_writable_place_is_an_empty_dir_at_tmp() -> None:
    # `--workers` publishes metrics into tempfile.mkdtemp() (gateway/supervisor.py): $TMPDIR or
    # /tmp, which the read-only root filesystem would refuse
    assert "TMPDIR" not in env(CONTAINER)
    tmp = mount_of("tmp")
    assert tmp["mountPath"] == "/tmp"
    assert "emptyDir" in volume("tmp")
    assert not tmp.get("readOnly", False)
    writable = [m for m in CONTAINER["volumeMounts"] if not m.get("readOnly", False)]
    assert [m["name"] for m in writable] == ["tmp"]


def test_pod_runs_unprivileged_on_a_read_only_root() -> None:
    pod = POD["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001, "the image's user (Dockerfile: useradd --uid 10001)"
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    for objects in (BASE, REDIS):
        for deployment in (o for o in objects if o["kind"] == "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["automountServiceAccountToken"] is False
            for flag in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(flag, False), flag
            assert not [v for v in spec.get("volumes", []) if "hostPath" in v]
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True
                assert context.get("privileged", False) is False
                assert context["capabilities"]["drop"] == ["ALL"]
                assert "add" not in context["capabilities"]
                assert not [p for p in container["ports"] if "hostPort" in p]


def test_resources_follow_the_workers() -> None:
    resources = CONTAINER["resources"]
    assert workers() >= 2
    # one worker per CPU requested: fewer CPUs would starve a worker, more would sit idle
    assert cpus(resources["requests"]["cpu"]) == workers()
    assert cpus(resources["limits"]["cpu"]) >= cpus(resources["requests"]["cpu"])
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    # the image's entrypoint is `gateway`: these are `gateway run --workers N`
    assert CONTAINER["args"][0] == "run"
    assert "command" not in CONTAINER


def test_grace_period_outlasts_the_gateways_own_drain() -> None:
    shutdown = CONFIG["shutdown"]
    drain = parse_duration(shutdown["drain_delay"], "shutdown.drain_delay")
    timeout = parse_duration(shutdown["timeout"], "shutdown.timeout")
    # long enough for load balancers to notice (a second is not), and still bounded
    assert 5 <= drain <= 30
    grace = POD["terminationGracePeriodSeconds"]
    # a preStop hook would run before SIGTERM and eat into the same grace period
    assert grace > pre_stop_seconds() + drain + timeout
    # and not far beyond it: a grace period also delays every rollout and node drain
    assert grace <= pre_stop_seconds() + drain + timeout + 30


def test_the_image_is_a_placeholder_set_in_one_place() -> None:
    image = CONTAINER["image"]
    [entry] = [i for i in kustomization(K8S)["images"] if i["name"] == image]
    assert "example" in entry["newName"], "the registry is a placeholder the README explains"
    assert entry["newName"] in readme_kubernetes_section()


def test_no_secret_is_committed() -> None:
    for path in sorted(K8S.rglob("*")):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY-----" not in text, path
    # the reference file has placeholders only, in stringData (never base64 `data` that would
    # hide what it holds), for every Secret the pods read
    examples = {o["metadata"]["name"]: o for o in documents(SECRETS_EXAMPLE)}
    for o in examples.values():
        assert o["kind"] == "Secret"
        assert "data" not in o
        for key, value in o["stringData"].items():
            assert "REPLACE-ME" in value, f"{o['metadata']['name']}.{key} is not a placeholder"
    read = {volume("certs")["secret"]["secretName"]} | {
        e["valueFrom"]["secretKeyRef"]["name"]
        for objects in (BASE, REDIS)
        for d in objects
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert read == set(examples)
    tls = examples[volume("certs")["secret"]["secretName"]]
    assert set(tls["stringData"]) == {posixpath.basename(p) for p in files_named_by(CONFIG)}
    # and the README says how to create each one
    section = readme_kubernetes_section()
    for name in read:
        assert f"kubectl create secret generic {name}" in section, name


def test_redis_is_referenced_through_a_service_and_a_secret() -> None:
    stores = CONFIG["stores"]
    [(name, store)] = [(n, s) for n, s in stores.items() if s.get("type", "redis") == "redis"]
    url = store["url"]
    match = re.fullmatch(r"redis://:\$\{([A-Z_]+)\}@([a-z0-9-]+):(\d+)/\d+", url)
    assert match, f"the store's url {url} should take its password from ${{ENV}}"
    variable, host, port = match.group(1), match.group(2), int(match.group(3))
    # the variable comes from a Secret, never a literal value
    ref = env(CONTAINER)[variable]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional", False) is False
    # the minimal Redis: a Service of that name and port, the same Secret for its password
    service = one(REDIS, "Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    redis = one(REDIS, "Deployment")
    assert redis["spec"]["replicas"] == 1
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    [redis_container] = redis["spec"]["template"]["spec"]["containers"]
    target = service["spec"]["ports"][0]["targetPort"]
    assert container_port(redis_container, target) == port
    password = env(redis_container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == ref
    assert "$(REDIS_PASSWORD)" in redis_container["args"]
    args = redis_container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    # only the gateway's pods may reach it
    policy = one(REDIS, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    assert source["podSelector"]["matchLabels"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    # and the routes use the store
    assert f"store: {name}" in CONFIG_TEXT


# -- the config, run for real --------------------------------------------------------------------


def project(mount: Path, files: Mapping[str, bytes]) -> None:
    """Write `files` into `mount` as the kubelet updates a ConfigMap or Secret volume: a new
    `..<timestamp>` directory, a `..data` symlink swapped to it in one rename, each name a
    symlink through `..data`, and the previous generation removed."""
    mount.mkdir(parents=True, exist_ok=True)
    previous = (mount / "..data").resolve() if (mount / "..data").is_symlink() else None
    generation = mount / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    generation.mkdir()
    for name, data in files.items():
        (generation / name).write_bytes(data)
    (mount / "..data_tmp").symlink_to(generation.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    if previous is not None:
        shutil.rmtree(previous)


def in_pod(root: Path, path: str) -> Path:
    """A path inside the pod, under `root` on this machine."""
    return root / path.lstrip("/")


def certificate_files(directory: Path) -> dict[str, bytes]:
    """The gateway-tls Secret's files, as the README makes them from `gateway certs init`."""
    init_dev_certificates(directory, ["localhost", "127.0.0.1"])
    return {
        "tls.crt": (directory / "server.crt").read_bytes(),
        "tls.key": (directory / "server.key").read_bytes(),
        "ca.crt": (directory / "ca.crt").read_bytes(),
    }


def lay_out_pod(root: Path, config_text: str) -> None:
    """The pod's two volumes under `root`: the config and a first set of certificates."""
    project(in_pod(root, mount_of("config")["mountPath"]), {CONFIG_KEY: config_text.encode()})
    certs = certificate_files(root / "source-1")
    project(in_pod(root, mount_of("certs")["mountPath"]), certs)


def pod_environment(root: Path) -> dict[str, str]:
    """The container's environment: its env, with values the Secrets would give."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "REDIS_", "PYTEST_"))
    }
    for name, entry in env(CONTAINER).items():
        if "value" in entry:
            value = entry["value"]
            environment[name] = str(in_pod(root, value)) if name == "GATEWAY_CONFIG" else value
        elif not entry["valueFrom"]["secretKeyRef"].get("optional", False):
            environment[name] = "0123456789abcdef"  # a URL-safe dummy, as the README asks
    return environment


def test_the_configmap_config_passes_gateway_check_in_the_pods_layout(tmp_path: Path) -> None:
    lay_out_pod(tmp_path, CONFIG_TEXT)
    environment = pod_environment(tmp_path)
    # `gateway check` as `kubectl exec deploy/gateway -- gateway check` runs it: GATEWAY_CONFIG
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"ok [0-9a-f]{12}\n", result.stdout)
    config = load_config(environment["GATEWAY_CONFIG"], env=environment)
    assert config.status is not None
    assert config.status.port == container_port(CONTAINER, "status")
    certs_mount = in_pod(tmp_path, mount_of("certs")["mountPath"])
    config_mount = in_pod(tmp_path, mount_of("config")["mountPath"])
    # the files the loader resolved are the mount's own names, not a `..data` generation...
    assert sorted(config.files) == sorted(str(in_pod(tmp_path, f)) for f in files_named_by(CONFIG))
    # ...so the watcher watches the two mount directories, where the kubelet swaps `..data`
    directories, _ = watched_names([environment["GATEWAY_CONFIG"], *config.files])
    assert directories == {config_mount, certs_mount}


def served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def fingerprint_of(pem: bytes) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def request(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers)


def probe(url: str) -> int | None:
    """What the kubelet's httpGet sees: a status, or None when nothing answers yet."""
    try:
        return http_get(url, timeout=1)[0]
    except OSError:
        return None


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[Path, dict[str, int], subprocess.Popen[bytes]]]:
    """`gateway run` with the Deployment's args and env, in the pod's layout, on free loopback
    ports (the only change to the ConfigMap's config besides the store's and upstream's
    addresses, which are cluster names here)."""
    config = yaml.safe_load(CONFIG_TEXT)
    ports = {x["name"]: free_port() for x in config["listeners"]}
    ports["status"], ports["admin"] = free_port(), free_port()
    for x in config["listeners"]:
        x["bind"] = f"127.0.0.1:{ports[x['name']]}"
    config["status"]["bind"] = f"127.0.0.1:{ports['status']}"
    config["admin"]["bind"] = f"127.0.0.1:{ports['admin']}"
    for store in config["stores"].values():
        # nothing listens there: a store that does not answer never stops readiness
        store["url"] = re.sub(r"@[^/]+/", f"@127.0.0.1:{free_port()}/", store["url"])
    for upstream in config["upstreams"].values():
        for endpoint in upstream["endpoints"]:
            endpoint["url"] = f"http://127.0.0.1:{free_port()}"
    lay_out_pod(tmp_path, yaml.safe_dump(config, sort_keys=False))
    environment = pod_environment(tmp_path)
    # the emptyDir at /tmp: the only place the pod may write
    environment["TMPDIR"] = str(in_pod(tmp_path, mount_of("tmp")["mountPath"]))
    Path(environment["TMPDIR"]).mkdir(parents=True)
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *CONTAINER["args"]],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        yield tmp_path, ports, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        if proc.returncode not in (0, -signal.SIGKILL):
            print((tmp_path / "gateway.log").read_text()[-5000:])


def test_the_pod_serves_probes_reloads_volume_updates_and_drains_in_its_grace_period(
    pod: tuple[Path, dict[str, int], subprocess.Popen[bytes]],
) -> None:
    root, ports, proc = pod
    status = f"http://127.0.0.1:{ports['status']}"

    def ready() -> bool:
        # a config it refuses: say why now, not after 30 s (the supervisor restarts the workers
        # that exit on it, so the process itself does not end)
        log = (root / "gateway.log").read_text()
        if proc.poll() is not None or "configuration rejected" in log:
            raise AssertionError(f"gateway run refused its config:\n{log[-3000:]}")
        return probe(f"{status}/readyz") == 200

    wait_until(ready, 30, "/readyz 200")
    assert http_get(f"{status}/healthz")[0] == 200
    assert b"gateway_config_info" in http_get(f"{status}/metrics")[1]
    assert http_get(f"{status}/admin/config")[0] == 404  # never the admin API
    assert request(f"http://127.0.0.1:{ports['http']}/echo/x")[0] == 200
    # the workers publish their metrics in the emptyDir at /tmp
    tmp = in_pod(root, mount_of("tmp")["mountPath"])
    assert [p.name for p in tmp.iterdir() if p.name.startswith("gateway-metrics-")]

    # the Secret is updated (say, a renewed certificate): the kubelet swaps `..data`
    certs_mount = in_pod(root, mount_of("certs")["mountPath"])
    first = fingerprint_of((certs_mount / "tls.crt").read_bytes())
    assert hashlib.sha256(served_certificate(ports["https"])).hexdigest() == first
    renewed = certificate_files(root / "source-2")
    project(certs_mount, renewed)
    second = fingerprint_of(renewed["tls.crt"])

    def serves(fingerprint: str) -> bool:
        # several handshakes: each worker reloads on its own, and any may take a connection
        return all(
            hashlib.sha256(served_certificate(ports["https"])).hexdigest() == fingerprint
            for _ in range(8)
        )

    wait_until(lambda: serves(second), 15, "the renewed certificate served")

    # the ConfigMap is updated: a response header added to the echo route
    config_mount = in_pod(root, mount_of("config")["mountPath"])
    config = yaml.safe_load((config_mount / CONFIG_KEY).read_text())
    [echo] = [r for r in config["routes"] if r["name"] == "echo"]
    echo["pipeline"] = [{"headers": {"response": {"set": {"X-Config": "updated"}}}}]
    project(config_mount, {CONFIG_KEY: yaml.safe_dump(config, sort_keys=False).encode()})
    echo_url = f"http://127.0.0.1:{ports['http']}/echo/x"
    wait_until(
        lambda: all(request(echo_url)[1].get("X-Config") == "updated" for _ in range(8)),
        15,
        "the updated config served",
    )

    # deletion: SIGTERM (no preStop hook runs first); not ready at once, still serving while
    # endpoints are updated, and gone with exit 0 inside terminationGracePeriodSeconds
    grace = POD["terminationGracePeriodSeconds"]
    drain = parse_duration(CONFIG["shutdown"]["drain_delay"], "shutdown.drain_delay")
    assert pre_stop_seconds() == 0
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    wait_until(lambda: probe(f"{status}/readyz") == 503, 3, "/readyz 503")
    assert request(echo_url)[0] == 200
    assert time.monotonic() - started < drain
    assert proc.wait(grace) == 0
    assert time.monotonic() - started >= drain
