"""cluster.yaml: Ray's own launcher validation, offline, plus this repo's invariants.

Fast: no cloud, no AWS credentials, no boto3, no network (sockets are blocked) and no Ray started.
`prepare_config` merges the file with the AWS provider's defaults.yaml shipped inside Ray (a local
file read) and fills per-node-type worker bounds; `validate_config` checks the result against the
launcher's JSON schema (`ray/autoscaler/ray-schema.json`). What `ray up` does afterwards (the AWS
provider's bootstrap: IAM role, security group, key pair, subnet, AMI and instance-type lookups)
needs boto3 and an AWS account, and is not run here.
"""
from __future__ import annotations

import copy
import json
import re
import socket
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
REPO_MOUNT = "/home/ray/leuk-ray"
DATA_DIR = "/home/ray/data/cnmc"
DRIVER_RESOURCE = "TRAIN_DRIVER"
DRIVER_SHARE = 0.01  # what leuk_ray.search asks of the driver resource per trial


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):  # (the other fixtures are function-scoped: after this)
    """Any network access during these tests is a failure (they must work offline)."""
    def refuse(*a, **k):
        raise AssertionError("cluster.yaml tests must not use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture
def raw(text: str) -> dict:
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict)
    return cfg


def _prepare(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config
    return prepare_config(copy.deepcopy(cfg))


@pytest.fixture
def prepared(raw: dict) -> dict:
    return _prepare(raw)


def _head(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _workers(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _code_lines(text: str) -> list[str]:
    """The file's lines with full-line and trailing `# ...` comments removed."""
    out = []
    for line in text.splitlines():
        stripped = re.sub(r"(^|\s)#.*$", "", line)
        if stripped.strip():
            out.append(stripped)
    return out


# --- Ray's own launcher validation ---------------------------------------------------------------

def test_passes_rays_launcher_validation_offline(raw: dict, prepared: dict):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError when invalid
    # prepare_config merged the provider defaults and the common setup commands into both roles
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_setup_commands"][:len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["worker_setup_commands"][:len(raw["setup_commands"])] == raw["setup_commands"]
    assert _head(prepared)["max_workers"] == 0


def test_validator_rejects_an_unknown_top_level_key(raw: dict):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(raw)
    bad["max_wokers"] = 3  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(_prepare(bad))


def test_validator_rejects_a_fractional_custom_resource(raw: dict):
    """The launcher takes integer resources only: why TRAIN_DRIVER is 1, not 0.16."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(raw)
    _head(bad)["resources"][DRIVER_RESOURCE] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(_prepare(bad))


# --- security --------------------------------------------------------------------------------------

def test_dashboard_is_never_public(text: str, prepared: dict):
    assert "0.0.0.0" not in json.dumps(prepared)
    assert not [ln for ln in _code_lines(text) if "0.0.0.0" in ln]
    starts = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1 and "--head" in starts[0]
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert len(re.findall(r"--dashboard-host", starts[0])) == 1
    for cmd in prepared["worker_start_ray_commands"]:
        assert "--dashboard-host" not in cmd or "--dashboard-host=127.0.0.1" in cmd
        assert "--head" not in cmd


def test_token_auth_on_every_node(raw: dict):
    opts = raw["docker"]["run_options"]  # shared by head and workers
    assert "-e RAY_AUTH_MODE=token" in opts
    paths = [o.split("=", 1)[1] for o in opts if o.startswith("-e RAY_AUTH_TOKEN_PATH=")]
    assert len(paths) == 1 and paths[0] in raw["file_mounts"], \
        "the token path must be a file mount (copied from the user's machine)"


CREDENTIAL_PATTERNS = [
    r"aws_access_key_id", r"aws_secret_access_key", r"aws_session_token",
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"RAY_AUTH_TOKEN=", r"(?i)password\s*[:=]", r"(?i)secret\s*[:=]",
]


@pytest.mark.parametrize("pattern", CREDENTIAL_PATTERNS)
def test_no_credentials_in_the_file(text: str, pattern: str):
    assert not re.search(pattern, text), f"cluster.yaml looks like it holds a credential ({pattern})"


# --- image and package -------------------------------------------------------------------------

def _pinned_ray() -> tuple[str, str]:
    """(the Ray specifier from pyproject.toml, requires-python)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rays = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    assert len(rays) == 1
    return str(rays[0].specifier), project["requires-python"]


def _images(cfg: dict) -> list[str]:
    d = cfg["docker"]
    images = [d[k] for k in ("image", "head_image", "worker_image") if d.get(k)]
    images += [t["docker"]["worker_image"] for t in cfg["available_node_types"].values()
               if t.get("docker", {}).get("worker_image")]
    return images


IMAGE_RE = re.compile(r"^rayproject/ray(?:-ml)?:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)"
                      r"-(?P<platform>gpu|cu\d+)$")


def test_image_matches_the_pinned_ray_and_python(raw: dict):
    import ray
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec, requires_python = _pinned_ray()
    images = _images(raw)
    assert images, "cluster.yaml must name a docker image"
    for image in images:
        m = IMAGE_RE.match(image)
        assert m, f"{image}: expected rayproject/ray:<ray version>-py3XX-gpu (a pinned, GPU tag)"
        assert Version(m["ray"]) in SpecifierSet(spec), f"{image}: Ray {m['ray']} outside {spec}"
        assert m["ray"] == ray.__version__, f"{image}: Ray {m['ray']} != installed {ray.__version__}"
        py = f"{m['py']}.{m['pyminor']}"
        assert Version(py) in SpecifierSet(requires_python), f"{image}: Python {py}"
        assert py == requires_python.lstrip(">=~= "), \
            f"{image}: Python {py}, expected the project's {requires_python}"
    assert raw["docker"]["container_name"]


def test_shared_memory_set_for_every_node(raw: dict):
    d = raw["docker"]
    common = d.get("run_options", [])
    head = common + d.get("head_run_options", [])
    assert any(o.startswith("--shm-size=") for o in head)
    for name, t in _workers(raw).items():
        opts = common + t.get("docker", {}).get("worker_run_options", d.get("worker_run_options", []))
        assert any(o.startswith("--shm-size=") for o in opts), name


def test_setup_installs_the_mounted_package(raw: dict, prepared: dict):
    assert raw["file_mounts"].get(REPO_MOUNT) == ".", "the repository is mounted on every node"
    install = re.compile(rf"\bpip install\b.*(-e|--editable)\s+{re.escape(REPO_MOUNT)}/?(\s|$)")
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(c) for c in prepared[role]), role
    # the virtual environment and git history are never uploaded
    assert ".gitignore" in raw.get("rsync_filter", [])


def test_data_synced_to_the_same_local_path_on_every_node(prepared: dict):
    for role in ("head_setup_commands", "worker_setup_commands"):
        syncs = [c for c in prepared[role] if "aws s3 sync" in c]
        assert len(syncs) == 1 and syncs[0].rstrip().endswith(DATA_DIR), role


# --- node types ------------------------------------------------------------------------------------

def test_head_runs_the_trial_drivers_and_no_gpu_folds(raw: dict):
    from leuk_ray.config import Config, set_value

    head = _head(raw)
    res = head["resources"]
    assert res.get(DRIVER_RESOURCE, 0) >= DRIVER_SHARE, "room for at least one trial driver"
    assert res.get("CPU", 0) > 0, "trial drivers ask for ray.driver_cpus > 0 CPU"
    assert res.get("GPU", 0) == 0, "the head must take no GPU fold workers"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be spot"
    # the resource name is one the search accepts for `--set ray.driver_resource=...`
    set_value(Config(), "ray.driver_resource", DRIVER_RESOURCE)
    for name, t in _workers(raw).items():
        assert DRIVER_RESOURCE not in t["resources"], f"{name}: drivers belong on the head"


def test_gpu_worker_types(raw: dict):
    workers = _workers(raw)
    spot_1gpu = [n for n, t in workers.items() if t["resources"].get("GPU") == 1
                 and t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    multi = [n for n, t in workers.items() if t["resources"].get("GPU", 0) > 1]
    assert spot_1gpu, "a single-GPU spot worker type"
    assert multi, "a multi-GPU worker type"
    total_min = 0
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= raw["max_workers"], name
        total_min += t.get("min_workers", 0)
        assert t["resources"].get("CPU", 0) >= t["resources"].get("GPU", 0), name
        assert "IamInstanceProfile" in t["node_config"], f"{name}: S3 access by instance profile"
    assert total_min <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0


# --- every knob a user must change is marked ------------------------------------------------------

KNOBS = [r"^cluster_name:", r"^\s*region:", r"^\s*availability_zone:", r"^\s*image:",
         r"^\s*InstanceType:", r"^\s*ImageId:", r"^\s*Arn:", r"^\s*max_workers:",
         r"^\s*#\s*KeyName:", r"^\s*#\s*ssh_private_key:"]


def test_every_knob_is_marked_change_me(text: str, prepared: dict):
    lines = text.splitlines()
    unmarked = [f"{i + 1}: {line.strip()}" for i, line in enumerate(lines)
                if any(re.search(k, line) for k in KNOBS)
                and "CHANGE ME" not in line and not (i and "CHANGE ME" in lines[i - 1])]
    assert not unmarked, "values to adapt without a `# CHANGE ME`:\n" + "\n".join(unmarked)
    # the bucket: a visible placeholder, explained by a CHANGE ME comment
    buckets = {b for c in prepared["setup_commands"] for b in re.findall(r"s3://([^/\s]+)", c)}
    assert buckets == {"BUCKET"}
    assert any("CHANGE ME" in ln and "s3://BUCKET" in ln for ln in lines if ln.lstrip().startswith("#"))
