"""deploy/ checked without a container daemon or a cluster: images, compose and Kubernetes.

Every `collafuse` command line in a Dockerfile, the compose file, the manifests, their scripts
and deploy/README.md must parse with the real parser; every config they mount must load with
the real config models; and ports, mount paths, volumes and Secret keys must agree with what
those configs name. `collafuse server health`, the probe they use, runs against a real server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from test_integration import tiny_server_config

from collafuse import __version__
from collafuse.cli import build_parser, main
from collafuse.common import pki
from collafuse.common.config import ClientConfig, ServerConfig, load_config
from collafuse.server.app import SERVICE_NAME, TRAINER_HEALTH, start_server

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The images the compose file and the manifests run, by name.
IMAGES = {
    "collafuse-server": DOCKER / "Dockerfile.server",
    "collafuse-client": DOCKER / "Dockerfile.client",
}


# ---------------------------------------------------------------------------------------------
# Reading the files


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The documents of a YAML file, each a mapping."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


@dataclass(frozen=True)
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined."""

    path: Path
    instructions: tuple[tuple[str, str], ...]

    def all(self, name: str) -> list[str]:
        return [arg for inst, arg in self.instructions if inst == name]

    def exec_form(self, name: str) -> list[str]:
        (text,) = self.all(name)[-1:]
        value = yaml.safe_load(text)  # JSON is YAML
        assert isinstance(value, list), f"{self.path}: {name} must be in exec (JSON) form"
        return [str(v) for v in value]

    def arg_default(self, name: str) -> str:
        for text in self.all("ARG"):
            key, _, value = text.partition("=")
            if key.strip() == name:
                return value.strip()
        raise AssertionError(f"{self.path} has no ARG {name}")

    def uid(self) -> int:
        match = re.search(r"useradd\b[^&]*--uid (\d+)", " ".join(self.all("RUN")))
        assert match, f"{self.path} makes no user with a fixed uid"
        return int(match.group(1))


def read_dockerfile(path: Path) -> Dockerfile:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        name, _, arg = pending.strip().partition(" ")
        instructions.append((name.upper(), arg.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a continued line"
    return Dockerfile(path, tuple(instructions))


_CONTROL = {";", "&&", "||", "|", "&", ";;"}
# Commands that run another command given after their own arguments.
_RUNNERS = {"docker", "kubectl", "exec"}
_COMMANDS = {
    name
    for action in build_parser()._actions
    if isinstance(action, argparse._SubParsersAction)
    for name in action.choices
}
_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}"}


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script (if/then/fi and control operators split away)."""
    commands: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in _CONTROL:
                if current:
                    commands.append(current)
                current = []
            elif current or token not in _KEYWORDS:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def collafuse_argvs(commands: list[list[str]]) -> list[list[str]]:
    """`collafuse ...` command lines, also where another command runs one (exec, run), or
    passes one inside a script to a shell (`docker compose run pki '...'`)."""
    out = []
    for cmd in commands:
        if cmd[0] == "collafuse":
            out.append(cmd)
            continue
        # The program, not a user, group or namespace of that name: a command follows it.
        starts = [i for i, t in enumerate(cmd[:-1]) if t == "collafuse" and cmd[i + 1] in _COMMANDS]
        if cmd[0] in _RUNNERS and starts:
            out.append(cmd[starts[0] :])
            continue
        for token in cmd:
            if re.search(r"(^|\s)collafuse\s", token):
                out += collafuse_argvs(shell_commands(token))
    return out


def parse_cli(argv: list[str]) -> argparse.Namespace | None:
    """The real parser's reading of a `collafuse` command line; None for --version/--help."""
    assert argv[0] == "collafuse", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        if exc.code == 0:
            return None
        pytest.fail(f"`{shlex.join(argv)}` does not parse with collafuse's parser")


def command_of(ns: argparse.Namespace) -> tuple[str, ...]:
    """('server',), ('server', 'health'), ('pki', 'issue'), ...: which command a line runs."""
    sub = getattr(ns, f"{ns.command}_command", None)
    return (ns.command,) if sub is None else (ns.command, sub)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def under(path: str, root: str) -> str | None:
    """path relative to root when it lies below root (or is root: ''), else None."""
    p, r = PurePosixPath(path), PurePosixPath(root)
    if p == r:
        return ""
    return str(p.relative_to(r)) if r in p.parents else None


# ---------------------------------------------------------------------------------------------
# What the pki commands write


@dataclass
class Identity:
    """What `collafuse pki ...` commands leave in one directory."""

    files: set[str] = field(default_factory=set)
    client_id: str | None = None
    server_hosts: list[str] = field(default_factory=list)
    ca: bool = False


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The file names each pki command really writes, made with the real code."""
    root = tmp_path_factory.mktemp("pki")
    ca = pki.init_ca(root / "ca")
    srv = pki.issue_server(root / "ca", ["collafuse-server"], root / "server")
    kit = pki.issue_client(root / "ca", "edge-0", root / "kit")
    return {
        "init": {ca.cert.name, ca.key.name, ca.revoked.name},
        "issue-server": {srv.cert.name, srv.key.name, srv.ca_cert.name},
        "issue": {p.name for p in (kit.ca_cert, kit.cert, kit.key, kit.config)},
    }


def run_pki_script(
    commands: list[list[str]], pki_files: dict[str, set[str]], cwd: str = "/"
) -> dict[str, Identity]:
    """Directory (absolute, or relative to cwd) -> what the script's pki commands and cp leave."""
    out: dict[str, Identity] = {}

    def at(path: str | PurePath) -> Identity:
        return out.setdefault(str(PurePosixPath(cwd) / str(path)), Identity())

    for cmd in commands:
        if cmd[0] == "cp":
            target = PurePosixPath(cwd) / cmd[-1]
            at(target.parent).files.add(target.name)
            continue
        if cmd[0] != "collafuse":
            continue
        ns = parse_cli(cmd)
        assert ns is not None
        if command_of(ns) == ("pki", "init"):
            at(ns.ca_dir).files |= pki_files["init"]
            at(ns.ca_dir).ca = True
        elif command_of(ns) == ("pki", "issue-server"):
            at(ns.out).files |= pki_files["issue-server"]
            at(ns.out).server_hosts = list(ns.hosts)
        elif command_of(ns) == ("pki", "issue"):
            at(ns.out).files |= pki_files["issue"]
            at(ns.out).client_id = ns.client_id
    return out


def test_shell_commands_split_like_a_shell() -> None:
    # The reader the checks below rely on: keywords and control operators split commands.
    script = (
        'if [ ! -f /x ]; then\n  collafuse pki init --ca-dir "/a b"  # why\nfi\n'
        "cp a b && chown -R 1:1 /c\n"
    )
    assert shell_commands(script) == [
        ["[", "!", "-f", "/x", "]"],
        ["collafuse", "pki", "init", "--ca-dir", "/a b"],
        ["cp", "a", "b"],
        ["chown", "-R", "1:1", "/c"],
    ]


# ---------------------------------------------------------------------------------------------
# Images


def _extras_with(package: str) -> set[str]:
    extras: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
    return {
        name for name, reqs in extras.items() if any(Requirement(r).name == package for r in reqs)
    }


def _torch_requirement() -> Requirement:
    requirements = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    (torch,) = [r for r in requirements if r.name == "torch"]
    return torch


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_installs_the_package_and_runs_collafuse(image: str) -> None:
    df = read_dockerfile(IMAGES[image])
    copied = {src for arg in df.all("COPY") for src in shlex.split(arg)[:-1]}
    for src in copied:
        assert (REPO / src).exists(), f"{df.path}: COPY {src}: no such file in the repository"
    # Everything `pip install .` reads: the project file, its readme, each package folder.
    setuptools = PYPROJECT["tool"]["setuptools"]
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    needed |= {Path(d).parts[0] for d in setuptools["package-dir"].values()}
    assert needed <= copied, f"{df.path} does not copy {sorted(needed - copied)}"
    text = (df.path.parent / f"{df.path.name}.dockerignore").read_text()
    ignore = [line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    assert ignore[0] == "*", "the build context starts empty and names what it lets in"
    for src in needed:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is kept out of the context"

    (install,) = [r for r in df.all("RUN") if "pip install --constraint" in r]
    # The constraint is torch's own installed version: pip keeps the build already there.
    assert "torch.__version__" in install
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for named in re.findall(r"\.\[(\w+)\]", install):
        assert named in extras, f"{df.path} installs an extra [{named}] pyproject does not declare"

    entrypoint = df.exec_form("ENTRYPOINT")
    assert entrypoint == ["collafuse"]
    ns = parse_cli(entrypoint + df.exec_form("CMD"))
    assert ns is not None
    expected = ("server",) if image == "collafuse-server" else ("client", "run")
    assert command_of(ns) == expected
    # The build runs the CLI once, so an image whose install is broken fails to build.
    smoke = collafuse_argvs([c for r in df.all("RUN") for c in shell_commands(r)])
    assert smoke and all(parse_cli(argv) is None for argv in smoke)
    # Runs as the unprivileged user it made, by number (Kubernetes' runAsNonRoot needs one).
    (user,) = df.all("USER")
    assert user == f"{df.uid()}:{df.uid()}" and df.uid() != 0


def test_server_image_keeps_a_cuda_12_torch_in_the_project_range() -> None:
    df = read_dockerfile(IMAGES["collafuse-server"])
    assert df.all("FROM") == ["${BASE_IMAGE}"]
    base = df.arg_default("BASE_IMAGE")
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.\d+-cudnn\d+-runtime", base)
    assert match, f"{base} is not a CUDA 12 runtime image of PyTorch"
    # The constraint refuses to replace the base torch, so the base must satisfy the range.
    assert _torch_requirement().specifier.contains(match.group(1)), (base, _torch_requirement())
    (install,) = [r for r in df.all("RUN") if "pip install --constraint" in r]
    assert "'.[server]'" in install


def test_client_image_is_slim_with_a_cpu_torch_in_the_project_range() -> None:
    df = read_dockerfile(IMAGES["collafuse-client"])
    assert df.all("FROM") == ["python:3.11-slim"]
    version = df.arg_default("TORCH_VERSION")
    assert _torch_requirement().specifier.contains(version)
    (torch,) = [r for r in df.all("RUN") if "download.pytorch.org/whl/cpu" in r]
    assert '"torch==${TORCH_VERSION}"' in torch
    (install,) = [r for r in df.all("RUN") if "pip install --constraint" in r]
    # The base install by default; EXTRAS (empty) adds optional dependencies on request.
    assert df.arg_default("EXTRAS") == ""
    assert '".${EXTRAS:+[$EXTRAS]}"' in install


# ---------------------------------------------------------------------------------------------
# Compose


@dataclass(frozen=True)
class Mount:
    """One thing mounted into a compose service."""

    target: str
    kind: str  # volume, bind or config
    source: str  # the volume's name, or the file on this machine
    read_only: bool


@dataclass
class Compose:
    """compose.yaml with what each service mounts and runs."""

    data: dict[str, Any]

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        services: dict[str, dict[str, Any]] = self.data["services"]
        return services

    def dockerfile(self, name: str) -> Dockerfile:
        svc = self.services[name]
        build = svc.get("build")
        if build is not None:
            path = (DOCKER / build["context"] / build["dockerfile"]).resolve()
            assert path == IMAGES[svc["image"].split(":")[0]], f"{name} builds {path}"
        return read_dockerfile(IMAGES[svc["image"].split(":")[0]])

    def argv(self, name: str) -> list[str]:
        svc, image = self.services[name], self.dockerfile(name)
        entrypoint = svc.get("entrypoint", image.exec_form("ENTRYPOINT"))
        command = svc.get("command", image.exec_form("CMD"))
        return list(entrypoint) + list(command)

    def mounts(self, name: str) -> list[Mount]:
        svc = self.services[name]
        out = []
        for spec in svc.get("volumes", []):
            parts = spec.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/")) else "volume"
            if kind == "volume":
                assert source in self.data["volumes"], f"{name} mounts an undeclared {source}"
            out.append(Mount(target, kind, source, parts[2:] == ["ro"]))
        for ref in svc.get("configs", []):
            file = DOCKER / self.data["configs"][ref["source"]]["file"]
            out.append(Mount(ref["target"], "config", str(file), True))
        return out

    def resolve(self, name: str, path: str) -> tuple[Mount, str]:
        """The mount a container path lies on, and the path below it."""
        best: tuple[Mount, str] | None = None
        for mount in self.mounts(name):
            rel = under(path, mount.target)
            if rel is not None and (best is None or len(mount.target) > len(best[0].target)):
                best = (mount, rel)
        assert best is not None, f"{name}: {path} lies on no mount, so it is not in the container"
        return best

    def config_file(self, name: str, path: str) -> Path:
        mount, rel = self.resolve(name, path)
        assert mount.kind in ("config", "bind") and rel == "", f"{name}: {path} is no file"
        return Path(mount.source)

    def pki_service(self) -> str:
        (name,) = [n for n in self.services if "collafuse pki init" in str(self.argv(n))]
        return name

    def identities(self, pki_files: dict[str, set[str]]) -> dict[str, Identity]:
        """Volume name -> what the pki service leaves in it."""
        name = self.pki_service()
        argv = self.argv(name)
        assert argv[:2] == ["/bin/sh", "-ec"], "the pki service runs a shell script"
        written = run_pki_script(shell_commands(argv[2]), pki_files)
        out: dict[str, Identity] = {}
        for directory, identity in written.items():
            mount, rel = self.resolve(name, directory)
            assert mount.kind == "volume" and rel == "", f"pki writes {directory} off a volume"
            out[mount.source] = identity
        return out

    def by_command(self, command: tuple[str, ...]) -> list[str]:
        names = []
        for name in self.services:
            argv = self.argv(name)
            if argv[0] == "collafuse":
                ns = parse_cli(argv)
                if ns is not None and command_of(ns) == command:
                    names.append(name)
        return names


@pytest.fixture(scope="module")
def compose() -> Compose:
    (data,) = yaml_docs(DOCKER / "compose.yaml")
    return Compose(data)


def test_compose_command_lines_parse(compose: Compose) -> None:
    seen: set[tuple[str, ...]] = set()
    for name, svc in compose.services.items():
        argv = compose.argv(name)
        lines = collafuse_argvs(shell_commands(argv[2])) if argv[0] == "/bin/sh" else [argv]
        test = svc.get("healthcheck", {}).get("test")
        if test is not None:
            assert test[0] == "CMD", f"{name}: the health check runs the CLI directly"
            lines.append(test[1:])
        for line in lines:
            ns = parse_cli(line)
            assert ns is not None
            seen.add(command_of(ns))
    want = {("server",), ("server", "health"), ("client", "run"), ("pki", "init")}
    assert want | {("pki", "issue-server"), ("pki", "issue")} <= seen


def test_compose_server_wiring(compose: Compose, pki_files: dict[str, set[str]]) -> None:
    (server,) = compose.by_command(("server",))
    svc = compose.services[server]
    ns = parse_cli(compose.argv(server))
    assert ns is not None
    config = load_config(ServerConfig, compose.config_file(server, str(ns.config)))
    image = compose.dockerfile(server)
    assert f"{port_of(config.listen)}" in image.all("EXPOSE")
    assert not config.insecure and config.tls_client_ca is not None, "mutual TLS"

    identities = compose.identities(pki_files)
    tls = {config.tls_cert, config.tls_key, config.tls_client_ca, config.tls_revoked}
    for path in tls:
        assert path is not None
        mount, rel = compose.resolve(server, str(path))
        assert mount.kind == "volume" and mount.read_only, f"{path} comes from a volume, read-only"
        assert rel in identities[mount.source].files, f"the pki service writes no {path}"
        assert identities[mount.source].server_hosts, f"{path} is not the server's identity"

    # The pool and checkpoints persist on a volume of the server's own, in a directory below
    # the volume's root (the server makes its data_dir 0700, which it can only do to its own).
    mount, rel = compose.resolve(server, str(config.data_dir))
    assert mount.kind == "volume" and not mount.read_only and rel
    users = [
        n for n in compose.services if any(m.source == mount.source for m in compose.mounts(n))
    ]
    assert users == [server]

    # The health check asks this server, with a kit of its CA (mutual TLS needs one).
    check = parse_cli(svc["healthcheck"]["test"][1:])
    assert check is not None and command_of(check) == ("server", "health")
    assert check.config == ns.config
    for path in (check.tls_cert, check.tls_key):
        mount, rel = compose.resolve(server, str(path))
        kit = identities[mount.source]
        assert kit.client_id is not None and rel in kit.files
    assert svc["depends_on"]["pki"]["condition"] == "service_completed_successfully"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)

    # Only the pki service ever mounts the CA's key.
    (ca_volume,) = [v for v, ident in identities.items() if ident.ca]
    holders = [n for n in compose.services if any(m.source == ca_volume for m in compose.mounts(n))]
    assert holders == [compose.pki_service()]


def test_compose_clients_wiring(compose: Compose, pki_files: dict[str, set[str]]) -> None:
    (server,) = compose.by_command(("server",))
    server_ns = parse_cli(compose.argv(server))
    assert server_ns is not None
    server_config = load_config(ServerConfig, compose.config_file(server, str(server_ns.config)))
    identities = compose.identities(pki_files)
    (server_hosts,) = [i.server_hosts for i in identities.values() if i.server_hosts]
    clients = compose.by_command(("client", "run"))
    assert len(clients) == 3
    indices = []
    for name in clients:
        ns = parse_cli(compose.argv(name))
        assert ns is not None
        config = load_config(ClientConfig, compose.config_file(name, str(ns.config)))
        # Its kit: the certificate names this client, and the files are the kit's.
        kit_volumes = set()
        for path in (config.tls_ca, config.tls_cert, config.tls_key):
            assert path is not None
            mount, rel = compose.resolve(name, str(path))
            kit = identities[mount.source]
            assert kit.client_id == config.client_id, f"{name} mounts the kit of {kit.client_id}"
            assert rel in kit.files and mount.read_only
            kit_volumes.add(mount.source)
        # It dials the server by a name on the server's certificate, on the port it serves.
        assert host_of(config.server) == server and host_of(config.server) in server_hosts
        assert port_of(config.server) == port_of(server_config.listen)
        assert config.image == server_config.image
        # Its state on a volume of its own; nothing else of anyone's.
        mount, rel = compose.resolve(name, str(config.state_dir))
        assert mount.kind == "volume" and not mount.read_only and rel
        volumes = {m.source for m in compose.mounts(name) if m.kind == "volume"}
        assert volumes == kit_volumes | {mount.source}
        others = [n for n in compose.services if n != name]
        assert all(mount.source not in {m.source for m in compose.mounts(n)} for n in others)
        indices.append(config.data.client_index)
        assert config.data.num_clients == len(clients)
        if config.data.source == "digits":
            # load_digits is scikit-learn's: the image must be built with an extra that has it.
            extras = compose.services[name]["build"]["args"]["EXTRAS"].split(",")
            assert set(extras) & _extras_with("scikit-learn"), f"{name} cannot load digits"
        assert compose.services[name]["depends_on"][server]["condition"] == "service_healthy"
    assert sorted(indices) == list(range(len(clients)))


def test_compose_pki_hands_files_to_the_images_user(compose: Compose) -> None:
    argv = compose.argv(compose.pki_service())
    (chown,) = [c for c in shell_commands(argv[2]) if c[0] == "chown"]
    uid = read_dockerfile(IMAGES["collafuse-server"]).uid()
    assert uid == read_dockerfile(IMAGES["collafuse-client"]).uid()
    assert chown[1:3] == ["-R", f"{uid}:{uid}"]
    pki_mounts = compose.mounts(compose.pki_service())
    # Every volume pki writes a server or client identity to is handed over.
    handed = chown[3:]
    for mount in pki_mounts:
        if mount.target != "/pki/ca":
            assert any(under(mount.target, h) is not None for h in handed), mount.target


# ---------------------------------------------------------------------------------------------
# Kubernetes


@dataclass
class Workload:
    """A StatefulSet or Deployment and the pod it runs."""

    doc: dict[str, Any]

    @property
    def name(self) -> str:
        name: str = self.doc["metadata"]["name"]
        return name

    @property
    def pod(self) -> dict[str, Any]:
        pod: dict[str, Any] = self.doc["spec"]["template"]["spec"]
        return pod

    def container(self, name: str | None = None) -> dict[str, Any]:
        containers = self.pod["containers"]
        if name is None:
            assert len(containers) == 1
            return dict(containers[0])
        (c,) = [c for c in containers + self.pod.get("initContainers", []) if c["name"] == name]
        return dict(c)

    def volume(self, name: str) -> dict[str, Any]:
        for v in self.pod.get("volumes", []):
            if v["name"] == name:
                return dict(v)
        for t in self.doc["spec"].get("volumeClaimTemplates", []):
            if t["metadata"]["name"] == name:
                return {"name": name, "claimTemplate": t}
        raise AssertionError(f"{self.name} mounts a volume {name} it does not declare")

    def resolve(self, container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        """The volume a container path lies on (with its mount), and the path below it."""
        best: tuple[dict[str, Any], str] | None = None
        for m in container.get("volumeMounts", []):
            assert "subPath" not in m, "mounts are whole, so that updates reach the pod"
            rel = under(path, m["mountPath"])
            if rel is not None and (best is None or len(m["mountPath"]) > len(best[0]["mount"])):
                best = ({**self.volume(m["name"]), "mount": m["mountPath"]}, rel)
        assert best is not None, f"{self.name}/{container['name']}: {path} lies on no mount"
        return best

    def argv(self, container: dict[str, Any]) -> list[str]:
        image = read_dockerfile(IMAGES[container["image"]])
        command = container.get("command", image.exec_form("ENTRYPOINT"))
        args = container.get("args", image.exec_form("CMD"))
        return list(command) + list(args)

    def copies(self) -> dict[tuple[str, str], tuple[dict[str, Any], str, str]]:
        """(volume, path below it) -> (init container, source path, mode) of each install."""
        out = {}
        for init in self.pod.get("initContainers", []):
            argv = self.argv(init)
            assert argv[:2] == ["/bin/sh", "-ec"]
            for cmd in shell_commands(argv[2]):
                assert cmd[:3] == ["install", "-D", "-m"], f"{self.name}: unexpected {cmd}"
                mode, source, dest = cmd[3:]
                volume, rel = self.resolve(init, dest)
                out[(volume["name"], rel)] = (init, source, mode)
        return out


@dataclass
class Kustomization:
    """deploy/k8s: the kustomization, its resources, generators and make-secrets.sh."""

    data: dict[str, Any]
    docs: list[dict[str, Any]]
    secrets_written: dict[str, Identity]

    def generated(self, kind: str, name: str) -> dict[str, str]:
        """Key -> file (relative to deploy/k8s) of a generated ConfigMap or Secret."""
        for gen in self.data[f"{kind}Generator"]:
            if gen["name"] == name:
                return {Path(f).name: f for f in gen["files"]}
        raise AssertionError(f"no {kind}Generator makes {name}")

    def workloads(self, kind: str) -> list[Workload]:
        return [Workload(d) for d in self.docs if d["kind"] == kind]

    def of(self, kind: str, name: str) -> dict[str, Any]:
        (doc,) = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return doc

    def origin(self, wl: Workload, container: dict[str, Any], path: str) -> tuple[str, str, str]:
        """(kind, name, key) of what a path in a container holds: a configMap or secret key
        (following the init containers' private copies), or a volume claim ('', rel)."""
        volume, rel = wl.resolve(container, path)
        if "emptyDir" in volume:
            init, source, mode = wl.copies()[(volume["name"], rel)]
            assert mode == "0600", f"{path} is a private copy, mode 0600"
            return self.origin(wl, init, source)
        for kind, ref in (("configMap", "name"), ("secret", "secretName")):
            if kind in volume:
                items = {i["path"]: i["key"] for i in volume[kind].get("items", [])}
                key = items.get(rel, rel) if items else rel
                return kind, volume[kind][ref], key
        if "persistentVolumeClaim" in volume:
            return "persistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], rel
        assert "claimTemplate" in volume, volume
        return "claimTemplate", volume["name"], rel

    def file(self, kind: str, name: str, key: str) -> str:
        """The file (relative to deploy/k8s) a generated key comes from."""
        files = self.generated(kind, name)
        assert key in files, f"{kind} {name} has no key {key} (it has {sorted(files)})"
        return files[key]

    def identity(self, secret: str, key: str) -> Identity:
        """What make-secrets.sh leaves where a Secret's key comes from."""
        file = PurePosixPath(self.file("secret", secret, key))
        written = self.secrets_written.get(str(PurePosixPath("/k8s") / file.parent))
        assert written is not None and file.name in written.files, f"nothing writes {file}"
        return written


@pytest.fixture(scope="module")
def k8s(pki_files: dict[str, set[str]]) -> Kustomization:
    (data,) = yaml_docs(K8S / "kustomization.yaml")
    docs = [d for res in data["resources"] for d in yaml_docs(K8S / res)]
    script = shell_commands((K8S / "make-secrets.sh").read_text())
    return Kustomization(data, docs, run_pki_script(script, pki_files, cwd="/k8s"))


def _k8s_argvs(k8s: Kustomization) -> Iterator[list[str]]:
    for kind in ("StatefulSet", "Deployment"):
        for wl in k8s.workloads(kind):
            for c in wl.pod["containers"]:
                yield wl.argv(c)
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if probe in c:
                        yield list(c[probe]["exec"]["command"])
    yield from collafuse_argvs(shell_commands((K8S / "make-secrets.sh").read_text()))


def test_k8s_files_parse_and_command_lines_parse(k8s: Kustomization) -> None:
    for path in K8S.glob("*.yaml"):
        yaml_docs(path)
    kinds = {d["kind"] for d in k8s.docs}
    assert {"Service", "StatefulSet", "Deployment", "PersistentVolumeClaim"} <= kinds
    seen = set()
    for argv in _k8s_argvs(k8s):
        ns = parse_cli(argv)
        assert ns is not None
        seen.add(command_of(ns))
    assert {("server",), ("server", "health"), ("client", "run"), ("pki", "issue")} <= seen
    for gen in k8s.data["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S / f).is_file() or f.startswith("secrets/"), f
    # Each image the manifests run has its Dockerfile and carries the release's tag.
    tags = {i["name"]: i["newTag"] for i in k8s.data["images"]}
    assert tags == dict.fromkeys(IMAGES, __version__)
    used = {
        c["image"]
        for kind in ("StatefulSet", "Deployment")
        for wl in k8s.workloads(kind)
        for c in wl.pod["containers"] + wl.pod.get("initContainers", [])
    }
    assert used == set(IMAGES)
    # The secrets make-secrets.sh writes are never committed.
    assert "secrets/" in (K8S / ".gitignore").read_text().split()


def _server(k8s: Kustomization) -> tuple[Workload, dict[str, Any], ServerConfig, str]:
    (wl,) = k8s.workloads("StatefulSet")
    container = wl.container()
    ns = parse_cli(wl.argv(container))
    assert ns is not None and command_of(ns) == ("server",)
    kind, name, key = k8s.origin(wl, container, str(ns.config))
    assert kind == "configMap"
    config = load_config(ServerConfig, K8S / k8s.file(kind, name, key))
    return wl, container, config, str(ns.config)


def test_k8s_server_wiring(k8s: Kustomization) -> None:
    wl, container, config, config_path = _server(k8s)
    assert wl.doc["spec"]["replicas"] == 1, "one pool, one trainer"
    assert not config.insecure and config.tls_client_ca is not None, "mutual TLS"
    for path in (config.tls_cert, config.tls_key, config.tls_client_ca):
        assert path is not None
        kind, secret, key = k8s.origin(wl, container, str(path))
        assert kind == "secret" and k8s.identity(secret, key).server_hosts
    # Keys are read from the private copy: Secret files turn group readable under fsGroup.
    volume, _ = wl.resolve(container, str(config.tls_key))
    assert volume["emptyDir"]["medium"] == "Memory"
    # The denylist: a live ConfigMap (no name hash, whole mount), refreshed from the CA's file.
    assert config.tls_revoked is not None
    kind, name, key = k8s.origin(wl, container, str(config.tls_revoked))
    assert kind == "configMap"
    (gen,) = [g for g in k8s.data["configMapGenerator"] if g["name"] == name]
    assert gen["options"]["disableNameSuffixHash"] is True
    source = PurePosixPath(k8s.file(kind, name, key))
    assert source.name in k8s.secrets_written[str(PurePosixPath("/k8s") / source.parent)].files
    # The pool and checkpoints: below the root of the claim template's volume.
    kind, _, rel = k8s.origin(wl, container, str(config.data_dir))
    assert kind == "claimTemplate" and rel

    # Ports: listen = container port = the Services' target; the Services select this pod.
    (port,) = container["ports"]
    assert port["containerPort"] == port_of(config.listen)
    labels = wl.doc["spec"]["template"]["metadata"]["labels"]
    services = [d for d in k8s.docs if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {wl.doc["spec"]["serviceName"]}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        (sp,) = svc["spec"]["ports"]
        assert sp["targetPort"] in (port["name"], port["containerPort"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    # Probes: this server's config, the probe's own kit, a health entry the server registers.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        ns = parse_cli(container[probe]["exec"]["command"])
        assert ns is not None and command_of(ns) == ("server", "health"), probe
        assert str(ns.config) == config_path
        assert ns.service in ("", SERVICE_NAME, TRAINER_HEALTH)
        kits = set()
        for path in (ns.tls_cert, ns.tls_key):
            kind, secret, key = k8s.origin(wl, container, str(path))
            identity = k8s.identity(secret, key)
            assert identity.client_id is not None, f"{probe} needs a client certificate"
            kits.add(identity.client_id)
        assert len(kits) == 1
        assert container[probe]["timeoutSeconds"] >= 10, "each probe loads the CLI"
    assert container["readinessProbe"]["exec"]["command"][-1] == SERVICE_NAME


def test_k8s_clients_wiring(k8s: Kustomization) -> None:
    _, _, server_config, _ = _server(k8s)
    (service,) = [
        d for d in k8s.docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
    ]
    (server_port,) = service["spec"]["ports"]
    hosts = k8s.identity("collafuse-server-tls", "server.crt").server_hosts
    namespace = k8s.data["namespace"]
    assert f"{service['metadata']['name']}.{namespace}.svc" in hosts
    claims = {d["metadata"]["name"] for d in k8s.docs if d["kind"] == "PersistentVolumeClaim"}
    clients = k8s.workloads("Deployment")
    assert len(clients) == 3
    indices, used_claims = [], []
    for wl in clients:
        assert wl.doc["spec"]["replicas"] == 1
        assert wl.doc["spec"]["strategy"]["type"] == "Recreate", "never two on one state"
        container = wl.container()
        ns = parse_cli(wl.argv(container))
        assert ns is not None and command_of(ns) == ("client", "run")
        kind, name, key = k8s.origin(wl, container, str(ns.config))
        assert kind == "configMap"
        config = load_config(ClientConfig, K8S / k8s.file(kind, name, key))
        secrets = set()
        for path in (config.tls_ca, config.tls_cert, config.tls_key):
            assert path is not None
            kind, secret, key = k8s.origin(wl, container, str(path))
            assert kind == "secret"
            assert k8s.identity(secret, key).client_id == config.client_id
            secrets.add(secret)
        mounted = {v["secret"]["secretName"] for v in wl.pod["volumes"] if "secret" in v}
        assert mounted == secrets, f"{wl.name} mounts only its own kit"
        assert host_of(config.server) == service["metadata"]["name"] and config.server
        assert host_of(config.server) in hosts
        assert port_of(config.server) == server_port["port"] == port_of(server_config.listen)
        assert config.image == server_config.image
        kind, claim, rel = k8s.origin(wl, container, str(config.state_dir))
        assert kind == "persistentVolumeClaim" and claim in claims and rel
        used_claims.append(claim)
        indices.append(config.data.client_index)
        assert config.data.num_clients == len(clients)
    assert sorted(indices) == list(range(len(clients)))
    assert len(set(used_claims)) == len(clients), "each client its own state"


def test_k8s_pods_run_as_the_images_user(k8s: Kustomization) -> None:
    for kind in ("StatefulSet", "Deployment"):
        for wl in k8s.workloads(kind):
            ctx = wl.pod["securityContext"]
            uid = read_dockerfile(IMAGES[wl.container()["image"]]).uid()
            assert ctx["runAsNonRoot"] and ctx["runAsUser"] == ctx["fsGroup"] == uid
            for v in wl.pod["volumes"]:
                if "secret" in v:
                    assert v["secret"]["defaultMode"] == 0o400


def _pki_only_collafuse(bin_dir: Path) -> None:
    """A `collafuse` on PATH that runs the real pki commands without loading torch."""
    script = (
        "import argparse, sys\n"
        "from collafuse.common import pki_cli\n"
        "p = argparse.ArgumentParser(prog='collafuse')\n"
        "pki_cli.add_commands(p.add_subparsers(dest='command', required=True))\n"
        "a = p.parse_args()\n"
        "sys.exit(a.func(a))\n"
    )
    shim = bin_dir / "collafuse"
    shim.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(script)} "$@"\n'
    )
    shim.chmod(0o755)


@pytest.fixture(scope="module")
def k8s_with_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s after make-secrets.sh ran in it against a new CA."""
    root = tmp_path_factory.mktemp("k8s")
    work = root / "k8s"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("secrets"))
    pki.init_ca(root / "ca")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    _pki_only_collafuse(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        ["sh", str(work / "make-secrets.sh"), str(root / "ca")],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return work


def test_make_secrets_writes_every_file_kustomize_reads(k8s_with_secrets: Path) -> None:
    (data,) = yaml_docs(k8s_with_secrets / "kustomization.yaml")
    for gen in data["secretGenerator"] + data["configMapGenerator"]:
        for f in gen["files"]:
            assert (k8s_with_secrets / f).is_file(), f"make-secrets.sh does not write {f}"
    key = k8s_with_secrets / "secrets" / "edge-0" / "client.key"
    assert key.stat().st_mode & 0o077 == 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its kustomize)")
def test_kustomize_renders_and_every_mounted_name_exists(k8s_with_secrets: Path) -> None:
    (data,) = yaml_docs(k8s_with_secrets / "kustomization.yaml")
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(k8s_with_secrets)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert len(workloads) == 4
    for d in workloads:
        pod = d["spec"]["template"]["spec"]
        # Generated names carry a hash; kustomize must have rewritten every reference to them.
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in names
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["image"].endswith(f":{__version__}")
        assert d["metadata"]["namespace"] == data["namespace"]


# ---------------------------------------------------------------------------------------------
# deploy/README.md


def test_readme_command_lines_parse() -> None:
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    lines = collafuse_argvs([c for b in blocks for c in shell_commands(b)])
    assert len(lines) >= 5
    for argv in lines:
        parse_cli(argv)


# ---------------------------------------------------------------------------------------------
# `collafuse server health`


def _write_toml(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_server_health_probe_over_mutual_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = pki.init_ca(tmp_path / "ca")
    # The certificate names the public host only: the probe dials loopback all the same.
    srv = pki.issue_server(tmp_path / "ca", ["collafuse-server"], tmp_path / "srv")
    probe = pki.issue_client(tmp_path / "ca", "probe", tmp_path / "probe")
    base = tiny_server_config(tmp_path / "data").model_dump(mode="json")
    tls = {
        "tls_cert": str(srv.cert),
        "tls_key": str(srv.key),
        "tls_client_ca": str(ca.cert),
        "tls_revoked": str(ca.revoked),
    }
    kit = ["--tls-cert", str(probe.cert), "--tls-key", str(probe.key)]
    running = start_server(ServerConfig.model_validate({**base, "insecure": False, **tls}))
    try:
        fixed = _write_toml(
            tmp_path / "fixed.toml",
            {"listen": f"0.0.0.0:{running.port}", "data_dir": str(tmp_path / "data"), **tls},
        )
        # Port 0: the port is read from the address file the server wrote.
        zero = _write_toml(
            tmp_path / "zero.toml",
            {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"), **tls},
        )
        capsys.readouterr()
        assert main(["server", "health", "--config", str(fixed), *kit]) == 0
        assert capsys.readouterr().out.strip().endswith("SERVING")
        assert main(["server", "health", "--config", str(zero), *kit]) == 0
        for service in (SERVICE_NAME, TRAINER_HEALTH):
            assert (
                main(["server", "health", "--config", str(fixed), *kit, "--service", service]) == 0
            )
        assert main(["server", "health", "--config", str(fixed), *kit, "--service", "nope"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().out
        # Mutual TLS refuses a probe without a certificate: a usage error that says so.
        assert main(["server", "health", "--config", str(fixed)]) == 2
        assert "--tls-cert" in capsys.readouterr().err
        # A certificate of another CA fails the handshake: not serving, as far as it can tell.
        pki.init_ca(tmp_path / "other")
        stranger = pki.issue_client(tmp_path / "other", "probe", tmp_path / "stranger")
        other = ["--tls-cert", str(stranger.cert), "--tls-key", str(stranger.key)]
        assert main(["server", "health", "--config", str(fixed), *other, "--timeout", "3"]) == 1
    finally:
        running.stop()
    assert main(["server", "health", "--config", str(fixed), *kit, "--timeout", "3"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_server_command_still_starts_a_server_without_a_subcommand() -> None:
    from collafuse.server.cli import run_health, run_server

    ns = build_parser().parse_args(["server", "--config", "server.toml", "--set", "a=1"])
    assert ns.func is run_server and str(ns.config) == "server.toml"
    ns = build_parser().parse_args(["server", "health", "--config", "server.toml"])
    assert ns.func is run_health and ns.service == "" and ns.timeout == 5.0
