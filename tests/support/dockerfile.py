"""The Dockerfile read as data, and its steps run outside Docker (no engine on our machines).

`parse` turns the file into instructions grouped by stage.  `ImageBuild` runs them under a
temporary root: each absolute path the image owns (/opt, /app, /src) is moved under that root,
RUN lines run with `/bin/sh -c` as Docker runs them, COPY copies from the build context (less
what .dockerignore leaves out) or from an earlier stage, ENV, WORKDIR and USER are followed.
Both stages share one root path, the first moved aside when the second starts, so the absolute
paths a step writes into files (a venv's script shebangs) mean the same thing in the final stage
as in the image.

What a base image does for itself is not run but checked: `apt-get install` must name packages
this machine has (so the build stage's compiler is here), and `useradd` gives the uid the final
stage runs as.  The base image's Python is Debian's /usr/bin/python3.11, readable by any user
(the interpreter this run of the tests uses may sit under root's home, closed to uid 10001).

A step that names an absolute path outside the image's own directories, or an instruction this
module does not know, fails the build: a change to the Dockerfile that the emulation cannot
follow faithfully must change this module too, never be skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: the image's own top-level directories, moved under the temporary root
IMAGE_DIRS = ("opt", "app", "src")
#: absolute paths a step may name that belong to the base system and mean the same here
SYSTEM_PATHS = ("/dev/null", "/bin/sh", "/usr/bin/env")
#: the interpreter standing in for the base image's /usr/local/bin/python
BASE_PYTHON = Path("/usr/bin/python3.11")
#: what passes from this machine's environment into a step: the network's plumbing, so pip
#: reaches the package index as it does here; nothing else (no pip config, no venv)
PASSED_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "PIP_CERT",
    "SSL_CERT_FILE",
    "PIP_DEFAULT_TIMEOUT",
)
_IMAGE_PATH = re.compile(rf"(?<![\w./-])/(?:{'|'.join(IMAGE_DIRS)})(?=[/\s\"':;,]|$)")
_ANY_ABSOLUTE = re.compile(r"(?<![\w./:-])/[A-Za-z][\w./-]*")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    #: the text after the flags: a shell-form command, or a JSON list for the exec form
    text: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        if not self.text.startswith("["):
            return None
        value = json.loads(self.text)
        assert isinstance(value, list), self.text
        assert all(isinstance(v, str) for v in value), self.text
        return value


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, instruction text): comments dropped, continuations joined as Docker
    joins them (the backslash and the newline removed)."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        yield start, "".join(pending).strip()
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"


def parse(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            base = _VARIABLE.sub(lambda m: args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
            continue
        assert stages, f"line {line}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, flags, rest, line))
    return Dockerfile(args=args, stages=stages)


def _dockerignore(context: Path) -> list[re.Pattern[str]]:
    patterns = []
    path = context / ".dockerignore"
    for raw in path.read_text().splitlines() if path.exists() else []:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # exceptions would need Docker's ordering rules; none are used, so none are emulated
        assert not line.startswith("!"), f".dockerignore exception not emulated: {line}"
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", line.strip("/")):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        patterns.append(re.compile(regex))
    return patterns


@dataclass
class Image:
    """What the build left: the root standing for `/`, and how the final stage starts."""

    root: Path
    env: dict[str, str]
    workdir: Path
    uid: int
    gid: int
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    healthcheck_flags: dict[str, str]
    stopsignal: str
    log: Path

    def path(self, image_path: str) -> Path:
        return Path(map_paths(image_path, self.root))

    def as_user(self) -> list[str]:
        """The prefix that runs a command as the image's USER, as Docker would."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ]


def map_paths(text: str, root: Path) -> str:
    return _IMAGE_PATH.sub(lambda m: f"{root}{m.group(0)}", text)


def _unknown_paths(text: str) -> list[str]:
    return [
        p
        for p in _ANY_ABSOLUTE.findall(text)
        if not _IMAGE_PATH.match(p) and not p.startswith(SYSTEM_PATHS)
    ]


class ImageBuild:
    """Runs a Dockerfile's stages under `work`/fs; step output goes to `work`/build.log."""

    def __init__(self, dockerfile: Path, context: Path, work: Path) -> None:
        self.file = parse(dockerfile.read_text())
        self.context = context
        self.work = work
        self.root = work / "fs"
        self.log = work / "build.log"
        self.base_bin = work / "base-python" / "bin"
        self.stage_roots: dict[str, Path] = {}
        #: uid -> home directory, from useradd: Docker sets HOME from the USER's passwd entry
        self.homes: dict[int, str] = {}
        self.ignore = _dockerignore(context)

    # -- the base image -------------------------------------------------------------------------

    def _base(self, stage: Stage) -> dict[str, str]:
        version = re.match(r"python:(\d+\.\d+)", stage.base)
        assert version, f"stage {stage.name}: base image {stage.base} is not python:X.Y"
        here = subprocess.run(
            [str(BASE_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert here == version.group(1), f"the image's Python is {version.group(1)}, here {here}"
        self.base_bin.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3", f"python{here}"):
            link = self.base_bin / name
            if not link.is_symlink():
                link.symlink_to(BASE_PYTHON)
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(
            PATH=f"{self.base_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            LANG="C.UTF-8",
            # the build runs as root, as Docker's does; pip's cache is the BuildKit cache mount
            # of the RUN lines, so it is this machine's and a second run downloads nothing
            HOME=os.environ.get("HOME", "/root"),
            # the python image has no pip configuration: this machine's is not read
            PIP_CONFIG_FILE=os.devnull,
        )
        return env

    # -- the steps -------------------------------------------------------------------------------

    def build(self) -> Image:
        self.work.mkdir(parents=True, exist_ok=True)
        # uid 10001 must reach the image's files, as it can in a container
        self.work.chmod(0o755)
        env: dict[str, str] = {}
        workdir = Path("/")
        user = (0, 0)
        users: dict[str, int] = {}
        final: Stage | None = None
        for index, stage in enumerate(self.file.stages):
            if index:
                previous = self.file.stages[index - 1]
                kept = self.work / f"stage-{previous.name}"
                self.root.rename(kept)
                self.stage_roots[previous.name] = kept
            self.root.mkdir()
            self.root.chmod(0o755)
            env = self._base(stage)
            workdir = Path("/")
            user = (0, 0)
            final = stage
            for step in stage.instructions:
                if step.keyword == "ENV":
                    env = self._env(step, env)
                elif step.keyword == "WORKDIR":
                    workdir = workdir / step.text
                    Path(map_paths(str(workdir), self.root)).mkdir(parents=True, exist_ok=True)
                elif step.keyword == "RUN":
                    self._run(step, env, workdir, users)
                elif step.keyword == "COPY":
                    self._copy(step, workdir)
                elif step.keyword == "USER":
                    name, _, group = step.text.partition(":")
                    uid = int(name) if name.isdigit() else users[name]
                    user = (uid, int(group) if group.isdigit() else uid)
                elif step.keyword in {"EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD"}:
                    pass  # read from the final stage below
                else:
                    raise AssertionError(f"line {step.line}: {step.keyword} is not emulated")
        assert final is not None
        health = final.last("HEALTHCHECK")
        entrypoint = final.last("ENTRYPOINT")
        cmd = final.last("CMD")
        stop = final.last("STOPSIGNAL")
        assert health is not None, "the final stage has no HEALTHCHECK"
        assert entrypoint is not None, "the final stage has no ENTRYPOINT"
        assert cmd is not None, "the final stage has no CMD"
        assert stop is not None, "the final stage has no STOPSIGNAL"
        health_cmd = health.text.removeprefix("CMD").strip()
        if not any(i.text.startswith("HOME") for i in final.all("ENV")):
            env["HOME"] = map_paths(self.homes.get(user[0], "/"), self.root)
        return Image(
            root=self.root,
            env=env,
            workdir=Path(map_paths(str(workdir), self.root)),
            uid=user[0],
            gid=user[1],
            entrypoint=_exec_list(entrypoint),
            cmd=_exec_list(cmd),
            healthcheck=[map_paths(a, self.root) for a in json.loads(health_cmd)],
            healthcheck_flags=health.flags,
            stopsignal=stop.text,
            log=self.log,
        )

    def _env(self, step: Instruction, env: Mapping[str, str]) -> dict[str, str]:
        result = dict(env)
        words = shlex.split(step.text)
        if "=" in words[0]:
            pairs = [w.partition("=") for w in words]
        else:  # the legacy `ENV KEY value with spaces`
            pairs = [(words[0], "=", step.text.partition(" ")[2].strip())]
        for key, _, value in pairs:
            # Docker substitutes from the environment as it was before this instruction
            value = _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)
            result[key] = map_paths(value, self.root) if key != "PATH" else self._path(value)
        return result

    def _path(self, value: str) -> str:
        return ":".join(map_paths(part, self.root) for part in value.split(":"))

    def _run(
        self, step: Instruction, env: Mapping[str, str], workdir: Path, users: dict[str, int]
    ) -> None:
        for flag in step.flags:
            # a cache mount keeps pip's downloads out of the layers; here it is HOME's cache
            assert flag == "mount", step
            assert step.flags[flag].startswith("type=cache"), step
        command = step.text
        words = shlex.split(command)
        if words[0] == "apt-get":
            self._apt_get(command)
            return
        if words[0] == "useradd":
            uid = int(words[words.index("--uid") + 1])
            users[words[-1]] = uid
            if "--home-dir" in words:
                self.homes[uid] = words[words.index("--home-dir") + 1]
            return
        unknown = _unknown_paths(command)
        assert not unknown, f"line {step.line}: paths not emulated: {unknown}"
        with self.log.open("a") as log:
            log.write(f"\n### line {step.line}: RUN {command}\n")
            log.flush()
            result = subprocess.run(
                ["/bin/sh", "-c", map_paths(command, self.root)],
                cwd=map_paths(str(workdir), self.root),
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=900,
                check=False,
            )
        if result.returncode:
            tail = "\n".join(self.log.read_text().splitlines()[-40:])
            raise AssertionError(f"line {step.line}: exit {result.returncode}\n{tail}")

    def _apt_get(self, command: str) -> None:
        """The build stage's system packages: this machine must have them installed."""
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["apt-get", "install"]:
                continue
            for package in (w for w in words[2:] if not w.startswith("-")):
                installed = subprocess.run(
                    ["dpkg-query", "-W", "-f=${Status}", package],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert "install ok installed" in installed.stdout, (
                    f"the Dockerfile installs {package}; this machine lacks it (make test-deps)"
                )

    def _copy(self, step: Instruction, workdir: Path) -> None:
        words = step.exec_form or shlex.split(step.text)
        sources, target = words[:-1], words[-1]
        for flag in step.flags:
            assert flag in {"from", "chown", "chmod"}, f"line {step.line}: COPY --{flag}"
        image_target = target if target.startswith("/") else f"{workdir}/{target}"
        assert not _unknown_paths(image_target), f"line {step.line}: {image_target}"
        destination = Path(map_paths(image_target, self.root))
        into_directory = target.endswith("/") or len(sources) > 1
        for source in sources:
            if "from" in step.flags:
                assert source.startswith("/"), source
                origin = Path(map_paths(source, self.stage_roots[step.flags["from"]]))
                assert origin.exists(), f"line {step.line}: {source} missing in the stage"
            else:
                origin = self.context / source
            into = into_directory and origin.is_file()
            where = destination / origin.name if into else destination
            self._copy_one(origin, where, from_context="from" not in step.flags)
            if "chown" in step.flags:
                owner, _, group = step.flags["chown"].partition(":")
                for path in [where, *where.rglob("*")] if where.is_dir() else [where]:
                    os.chown(path, int(owner), int(group or owner), follow_symlinks=False)
            if "chmod" in step.flags:
                where.chmod(int(step.flags["chmod"], 8))

    def _copy_one(self, origin: Path, where: Path, *, from_context: bool) -> None:
        where.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_file():
            shutil.copy2(origin, where)
            return
        for path in sorted(origin.rglob("*")):
            relative = path.relative_to(origin)
            if from_context and self._ignored(path.relative_to(self.context)):
                continue
            target = where / relative
            if path.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(os.readlink(path))
            elif path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        where.mkdir(parents=True, exist_ok=True)

    def _ignored(self, relative: Path) -> bool:
        candidates = [str(relative), *(str(p) for p in relative.parents if str(p) != ".")]
        return any(p.fullmatch(c) for p in self.ignore for c in candidates)


def _exec_list(step: Instruction) -> list[str]:
    value = step.exec_form
    assert value is not None, f"line {step.line}: {step.keyword} must be in exec form"
    return value
