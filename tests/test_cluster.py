"""cluster/: the container image and every manifest agree with each other and with the repository.

No cluster and no Docker here: the manifests are parsed (yaml.safe_load_all) and checked for what
KubeRay, Ray Serve and the `ray up` launcher need, and for what must stay consistent:

* one image: every manifest names the image cluster/Dockerfile builds (its CPU tag, or the -gpu tag
  of the same Dockerfile on GPU pods), tagged with pyproject's version;
* the Dockerfile's base image and pins satisfy pyproject.toml (ray, python, torch, transformers);
* every `python jobs/X.py --config jobs/configs/Y.yaml` named in cluster/ or docs/cluster.md exists;
* the RayService's serveConfigV2 is cluster/serve.yaml, and its paths are on the shared volume.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
SIZING_DOC = ROOT / "docs" / "cluster.md"
KUBERAY_KINDS = {"RayCluster", "RayService", "RayJob"}
#: The RayJobs the issue asks for, each with the job entry point it must run.
RAYJOB_ENTRYPOINTS = {
    "rayjob-index.yaml": "python jobs/build_index.py --config jobs/configs/index_wikipedia_dpr.yaml",
    "rayjob-train.yaml": "python jobs/train.py --config jobs/configs/train_nq_gpu_cluster.yaml",
    "rayjob-eval.yaml": "python jobs/evaluate.py --config jobs/configs/eval_nq_gpu_cluster.yaml",
}
SHARED_MOUNT = "/mnt/shared"
JOB_COMMAND = re.compile(r"python3?\s+(jobs/[\w./-]+\.py)\s+--config\s+(jobs/configs/[\w./-]+\.ya?ml)")


# ----------------------------------------------------------------------------- the repository's facts

def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_args() -> dict[str, str]:
    """Default values of the ARGs declared before FROM (the ones FROM can use)."""
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def base_image(**build_args: str) -> str:
    (from_,) = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    return substitute(from_.split()[0], {**dockerfile_args(), **build_args})


def labels() -> dict[str, str]:
    out = {}
    for word, rest in dockerfile_instructions():
        if word == "LABEL":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def image_names() -> tuple[str, str]:
    """(CPU image, GPU image): the name the Dockerfile's label gives, tagged with pyproject's version."""
    image = f"{labels()['rag_ray.image']}:{pyproject()['project']['version']}"
    return image, image + "-gpu"


def workdir() -> str:
    (wd,) = [rest for word, rest in dockerfile_instructions() if word == "WORKDIR"]
    return wd


def pip_install_command() -> str:
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN" and "pip install" in rest]
    assert len(runs) == 1, f"expected one RUN that pip-installs (package and pins together), found {len(runs)}"
    return runs[0]


def pip_requirements() -> dict[str, Requirement]:
    """The quoted requirement strings of the pip command, with the Dockerfile's ARG defaults filled in."""
    command = substitute(pip_install_command(), dockerfile_args())
    reqs = [Requirement(q) for q in re.findall(r'"([A-Za-z][\w.-]*(?:\[[\w,]+\])?\s*[<>=!~][^"]*)"', command)]
    return {r.name.lower(): r for r in reqs}


# ----------------------------------------------------------------------------- the manifests

def yaml_files() -> list[Path]:
    return sorted(CLUSTER.glob("*.yaml"))


def documents() -> list[tuple[Path, dict]]:
    out = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def kuberay_documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in documents() if d.get("kind") in KUBERAY_KINDS]


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec")}[doc["kind"]]


def groups(doc: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group name, pod spec, container) for every container of every group."""
    return [(name, g["template"]["spec"], c) for name, g in groups(doc) for c in g["template"]["spec"]["containers"]]


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())


def named_job_commands() -> list[tuple[str, str]]:
    """Every (jobs/X.py, jobs/configs/Y.yaml) named in cluster/ or docs/cluster.md, and the three the issue asks for."""
    pairs = {tuple(JOB_COMMAND.search(c).groups()) for c in RAYJOB_ENTRYPOINTS.values()}
    for path in [*CLUSTER.iterdir(), SIZING_DOC]:
        if path.is_file():
            pairs |= set(JOB_COMMAND.findall(path.read_text()))
    return sorted(pairs)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_every_yaml_file_parses_into_mappings(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path.name


def test_the_issue_s_manifests_are_all_there():
    kinds = {(p.name, d["kind"]) for p, d in documents() if "kind" in d}
    assert {("raycluster.yaml", "RayCluster"), ("rayservice.yaml", "RayService"),
            ("storage.yaml", "PersistentVolumeClaim")} <= kinds
    assert {(name, "RayJob") for name in RAYJOB_ENTRYPOINTS} <= kinds
    assert (CLUSTER / "ray-up-aws.yaml").is_file() and DOCKERFILE.is_file() and SIZING_DOC.is_file()


@pytest.mark.parametrize("path,doc", kuberay_documents(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_manifest_has_what_kuberay_needs(path, doc):
    assert doc["apiVersion"] == "ray.io/v1", path.name
    assert doc["metadata"]["name"]
    spec = cluster_spec(doc)
    assert spec is not None, f"{path.name}: {doc['kind']} without its cluster spec"
    ray_version = base_image().split(":")[1].split("-")[0]
    assert spec["rayVersion"] == ray_version, f"{path.name}: rayVersion differs from the image's Ray {ray_version}"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{path.name}: Ray token auth is off"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{path.name}: the head must not run shards or training"
    assert spec["workerGroupSpecs"], f"{path.name}: no worker groups"
    for name, group in groups(doc):
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{path.name} {name}: rayStartParams must be strings"
        assert group["template"]["spec"]["containers"], f"{path.name} {name}: no containers"
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{path.name} {name}"


def test_every_image_is_the_one_the_dockerfile_builds():
    cpu_image, gpu_image = image_names()
    seen = set()
    for path, doc in kuberay_documents():
        for group, _pod, c in containers(doc):
            wants_gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            expected = gpu_image if wants_gpu else cpu_image
            assert c["image"] == expected, f"{path.name} {group}: {c['image']}, expected {expected}"
            seen.add(c["image"])
    assert seen == {cpu_image, gpu_image}
    for path in yaml_files():  # nothing else may name a base image or a different build
        text = path.read_text()
        assert "rayproject/ray" not in text, f"{path.name} names the base image; use {cpu_image}"
        for image in re.findall(r"\b[\w.-]+/[\w.-]+/rag-ray:[\w.-]+", text):
            assert image in (cpu_image, gpu_image), f"{path.name}: {image}"


def test_image_version_and_label_are_pyproject_s():
    assert labels()["org.opencontainers.image.version"] == pyproject()["project"]["version"]


def test_every_container_runs_in_the_repository_copy_with_the_shared_volume():
    claims = {d["metadata"]["name"]: d for _, d in documents() if d.get("kind") == "PersistentVolumeClaim"}
    for path, doc in kuberay_documents():
        for group, pod, c in containers(doc):
            where = f"{path.name} {group}"
            assert c.get("workingDir") == workdir(), f"{where}: jobs/ paths are relative to {workdir()}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert SHARED_MOUNT in mounts, f"{where}: {SHARED_MOUNT} not mounted"
            claim = volumes[mounts[SHARED_MOUNT]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{where}: claim {claim} is not defined in cluster/storage.yaml"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{claim} must be RWX"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for name in ("RAG_RAY_DATA", "RAG_RAY_CACHE", "HF_HOME"):
                assert str(env.get(name)).startswith(SHARED_MOUNT + "/"), f"{where}: ${name} not on the shared volume"


def test_rayservice_serves_cluster_serve_yaml():
    (path, doc), = [(p, d) for p, d in kuberay_documents() if d["kind"] == "RayService"]
    embedded = doc["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "serveConfigV2 must be a YAML block string"
    serve = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    config = yaml.safe_load(embedded)
    assert config["applications"] == serve["applications"]
    assert config["http_options"] == serve["http_options"]
    assert config == serve, "serveConfigV2 differs from cluster/serve.yaml"
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"]), "no room to autoscale"


def test_rayservice_paths_are_on_a_volume_every_pod_mounts():
    (path, doc), = [(p, d) for p, d in kuberay_documents() if d["kind"] == "RayService"]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    paths = []
    for app in config["applications"]:
        args = app["args"]
        paths += [args["model"], args["index"], *args.get("index_roots", [])]
        paths += [d["user_config"]["index"] for d in app.get("deployments", []) if "index" in d.get("user_config", {})]
    for group, _pod, c in containers(doc):
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        for p in paths:
            assert any(p == m or p.startswith(m.rstrip("/") + "/") for m in mounts), f"{group}: {p} is on no volume"


@pytest.mark.parametrize("name", sorted(RAYJOB_ENTRYPOINTS))
def test_rayjob_runs_its_job_entry_point_from_the_image(name):
    (doc,) = [d for p, d in kuberay_documents() if p.name == name]
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert RAYJOB_ENTRYPOINTS[name] in " ".join(spec["entrypoint"].split())
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert not {"pip", "conda", "uv", "working_dir", "py_modules"} & set(runtime_env), \
        f"{name}: the image holds the code and its dependencies; runtime_env must not install or upload"


@pytest.mark.parametrize("script,config", named_job_commands(), ids=lambda s: s.split("/")[-1])
def test_every_job_and_config_named_exists(script, config):
    assert (ROOT / script).is_file(), f"{script} is named in cluster/ or docs/cluster.md but does not exist"
    assert (ROOT / config).is_file(), f"{config} is named in cluster/ or docs/cluster.md but does not exist"


def test_no_manifest_installs_or_uploads_code_at_start():
    for path in yaml_files():
        text = path.read_text()
        for bad in ("pip install", "git+", "working_dir", "--working-dir"):
            assert bad not in text, f"{path.name} contains {bad!r}: the image holds the code"


def test_base_image_is_ray_2_60_py311_and_satisfies_pyproject():
    assert base_image() == "rayproject/ray:2.60.0-py311"
    assert base_image(VARIANT="-gpu") == "rayproject/ray:2.60.0-py311-gpu"
    tag = base_image().split(":")[1]
    ray_version, python_tag = tag.split("-")[:2]
    assert Version(ray_version) in pyproject_requirements()["ray"].specifier
    python = Version(f"{python_tag[2]}.{python_tag[3:]}")
    assert python in SpecifierSet(pyproject()["project"]["requires-python"])


def test_pip_command_pins_torch_with_the_package_and_agrees_with_pyproject():
    command = pip_install_command()
    assert re.search(r"(?:^|\s)(?:-e\s+)?\.(?:\s|$)", command), "the package itself is not in the pip command"
    pins = pip_requirements()
    project = pyproject_requirements()
    assert str(pins["torch"].specifier) == "==2.13.0", "torch must be pinned in the same pip command as the package"
    for name, pin in pins.items():
        for spec in pin.specifier:
            if spec.operator == "==" and name in project:
                version = Version(spec.version)
                assert version in project[name].specifier, f"{name}=={version} contradicts pyproject's {project[name]}"
        if name in project:
            assert pin.extras >= project[name].extras, f"{name}: pyproject's extras {project[name].extras} missing"
    ray_pin = next(iter(pins["ray"].specifier)).version
    assert ray_pin == base_image().split(":")[1].split("-")[0], "pip must keep the base image's Ray"
    assert "download.pytorch.org/whl/cpu" in command and "download.pytorch.org/whl/${TORCH_CUDA}" in command


def test_transformers_requirement_is_not_contradicted_anywhere():
    wanted = pyproject_requirements()["transformers"].specifier
    found = re.compile(r"transformers\s*((?:[<>=!~]=?|===)\s*[\w.*]+(?:\s*,\s*(?:[<>=!~]=?)\s*[\w.*]+)*)")
    for path in [*CLUSTER.iterdir(), SIZING_DOC]:
        if not path.is_file():
            continue
        for spec_text in found.findall(path.read_text()):
            spec = SpecifierSet(spec_text.replace(" ", ""))
            pins = [Version(s.version) for s in spec if s.operator == "=="]
            if pins:
                assert all(v in wanted for v in pins), f"{path.name}: transformers{spec} contradicts pyproject's {wanted}"
            else:
                assert spec == wanted, f"{path.name}: transformers{spec} differs from pyproject's {wanted}"


def test_dockerfile_copies_the_repository_explicitly():
    copies = []
    for word, rest in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            assert word == "COPY", "use COPY, not ADD"
            parts = shlex.split(rest)
            assert any(p.startswith("--chown=") for p in parts), f"COPY {rest}: files must belong to the ray user"
            sources = [p for p in parts if not p.startswith("--")][:-1]
            for s in sources:
                assert s not in (".", "./", "*"), "COPY names each path: there is no .dockerignore to filter the context"
                assert (ROOT / s).exists(), f"COPY {s}: no such path in the repository"
            copies += [s.rstrip("/") for s in sources]
    readme = pyproject()["project"]["readme"]
    assert {"pyproject.toml", readme, "rag_ray", "jobs", "cluster/serve.yaml"} <= set(copies)
    assert workdir().startswith("/home/ray/")


def test_launcher_uses_one_image_on_every_node_type():
    cpu_image, gpu_image = image_names()
    cfg = launcher()
    assert cfg["provider"]["type"] == "aws"
    docker = cfg["docker"]
    assert docker["image"] == cpu_image
    assert "head_image" not in docker and "worker_image" not in docker
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types and len(types) >= 3
    assert types[head]["resources"].get("CPU") == 0
    assert "docker" not in types[head], "the head runs the top-level image"
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    for name, node in types.items():
        image = node.get("docker", {}).get("worker_image", docker["image"])
        gpu = node["node_config"]["InstanceType"].startswith(("g", "p"))  # EC2's GPU families: g4dn, g5, g6e, p4d, p5...
        assert image == (gpu_image if gpu else cpu_image), f"{name}: {image}"
        if name != head:
            assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], name
    assert any(n != head and types[n].get("docker") for n in types), "no GPU node type"


def test_launcher_mounts_shared_storage_and_turns_on_token_auth():
    cfg = launcher()
    options = " ".join(cfg["docker"]["run_options"])
    assert f":{SHARED_MOUNT}" in options and "RAY_AUTH_MODE=token" in options
    assert any("nfs4" in c and "efs" in c for c in cfg["initialization_commands"]), "no EFS mount"
    assert not any("pip" in c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                   for c in cfg.get(key, []))
