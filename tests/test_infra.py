"""Infrastructure files: each is linted by the tool that owns its format and holds the facts
the rest of the project relies on (image CUDA == torch wheel CUDA, release config, scripts).

No Docker engine, GitHub runner or GCP account is needed: the linters are the PyPI wheels of
requirements-dev.lock, and the scripts are exercised through their --dry-run paths. The full
repository-wide run (including pre-commit and semantic-release on this history) is
scripts/check-infra.sh.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
# Tools live next to the interpreter (the venv) even when the venv is not activated.
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def tool(name: str) -> str:
    """Absolute path of a CLI from requirements-dev.lock; fail (not skip) when it is missing."""
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        pytest.fail(f"{name} not found: pip install -r requirements-dev.lock into this venv")
    return found


def run(
    args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PATH": TOOL_PATH, "NO_COLOR": "1", **(env or {})}
    full_env.pop("GH_TOKEN", None)  # semantic-release must not need (or see) a token here
    return subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120, check=False
    )


def load_yaml(path: Path) -> Any:
    # GitHub's `on:` key is YAML 1.1's boolean True under PyYAML; map it back.
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and True in data:
        data["on"] = data.pop(True)
    return data


def git(repo: Path, *args: str) -> str:
    result = run(["git", *args], cwd=repo)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def init_repo(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "ci@example.com")
    git(repo, "config", "user.name", "ci")
    git(repo, "config", "commit.gpgsign", "false")


def commit(repo: Path, message: str) -> None:
    with (repo / "history.txt").open("a") as history:
        history.write(message + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


# ---------------------------------------------------------------------------------------------
# Linters on the real files, and proof that each linter does reject a broken file.


def test_hadolint_passes_on_dockerfile() -> None:
    result = run([tool("hadolint"), "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    result = run([tool("hadolint"), str(bad)])
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3003" in result.stdout  # cd instead of WORKDIR


def test_actionlint_passes_on_workflows() -> None:
    result = run([tool("actionlint"), f"-shellcheck={tool('shellcheck')}"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_bad_workflow(tmp_path: Path) -> None:
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(
        "on:\n  push:\n    branchs: [main]\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ steps.nope.outputs.x }}\n"
    )
    init_repo(tmp_path)
    result = run([tool("actionlint"), f"-shellcheck={tool('shellcheck')}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "branchs" in result.stdout
    assert "nope" in result.stdout


@pytest.mark.parametrize(
    ("schema", "files"),
    [
        ("vendor.github-workflows", sorted(WORKFLOWS.glob("*.yml"))),
        ("custom.github-workflows-require-timeout", sorted(WORKFLOWS.glob("*.yml"))),
        (
            "vendor.github-issue-forms",
            [
                ROOT / ".github/ISSUE_TEMPLATE/bug_report.yml",
                ROOT / ".github/ISSUE_TEMPLATE/feature_request.yml",
            ],
        ),
        ("vendor.github-issue-config", [ROOT / ".github/ISSUE_TEMPLATE/config.yml"]),
        ("vendor.cloudbuild", [ROOT / "cloudbuild.yaml"]),
    ],
)
def test_check_jsonschema_vendored_schemas(schema: str, files: list[Path]) -> None:
    assert files, f"no files for {schema}"
    result = run([tool("check-jsonschema"), "--builtin-schema", schema, *map(str, files)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloudbuild_schema_rejects_a_bad_option(tmp_path: Path) -> None:
    bad = tmp_path / "cloudbuild.yaml"
    text = (ROOT / "cloudbuild.yaml").read_text().replace("E2_HIGHCPU_8", "E2_HIGHCPU_99")
    bad.write_text(text.replace("timeout: 3600s", "timeout: 1 hour"))
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.cloudbuild", str(bad)])
    assert result.returncode != 0
    assert "E2_HIGHCPU_99" in result.stdout
    assert "1 hour" in result.stdout


def test_shellcheck_passes_on_scripts() -> None:
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh"))
    assert scripts
    result = run([tool("shellcheck"), *scripts])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_dockerfile_cuda_base_matches_the_torch_wheel() -> None:
    froms = [ln for ln in dockerfile_lines() if ln.startswith("FROM ")]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]+-ubuntu\d+\.\d+", froms[0])
    assert match, f"unexpected base image: {froms[0]}"
    import torch

    wheel_cuda = torch.version.cuda
    assert wheel_cuda is not None, "requirements.lock must pin a CUDA build of torch"
    assert f"{match[1]}.{match[2]}" == ".".join(wheel_cuda.split(".")[:2]), (
        f"Dockerfile base is CUDA {match[1]}.{match[2]} but torch {torch.__version__} is built "
        f"for CUDA {wheel_cuda}: change the FROM line (and the README's driver note)"
    )


def test_dockerfile_layers_user_entrypoint_and_secrets() -> None:
    lines = dockerfile_lines()

    def index(prefix: str) -> int:
        return next(i for i, ln in enumerate(lines) if ln.startswith(prefix))

    # The dependency layer comes before the source, so code changes reuse the cached wheels.
    assert index("COPY requirements.lock") < index("RUN pip install -r requirements.lock")
    assert index("RUN pip install -r requirements.lock") < index("COPY . .")
    assert any("python3.11" in ln for ln in lines if ln.startswith("RUN "))
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    entrypoint = json.loads(lines[-1].removeprefix("ENTRYPOINT "))
    assert entrypoint[:3] == ["/usr/bin/tini", "-g", "--"]  # signals reach the trainer
    assert "exec accelerate launch src/train.py" in entrypoint[-2]
    assert any("CLASSIFIER_TRAINING_REQUIRE_GPU=1" in ln for ln in lines)  # no CPU fallback
    for ln in lines:
        if ln.startswith(("ENV ", "ARG ")):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)", ln, re.I), ln
    labels = " ".join(ln for ln in lines if ln.startswith("LABEL "))
    for key in ("title", "source", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_data_runs_caches_and_git_out() -> None:
    patterns = {
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for needed in (".git", ".venv", "data", "runs", "wandb", "**/__pycache__", ".mypy_cache"):
        assert needed in patterns, needed
    assert not any(p.startswith("!") for p in patterns), "no re-includes expected"


# ---------------------------------------------------------------------------------------------
# Cloud Build and the GCP scripts


def test_cloudbuild_caches_tags_and_pushes() -> None:
    cb = load_yaml(ROOT / "cloudbuild.yaml")
    assert set(cb["substitutions"]) >= {"_REGION", "_REPO_NAME", "_IMAGE_NAME"}
    image = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPO_NAME}/${_IMAGE_NAME}"
    pull, build = cb["steps"]
    assert f'docker pull "{image}:latest"' in pull["args"][-1]
    assert "||" in pull["args"][-1], "the first build has no :latest to pull"
    assert build["args"][0] == "build"
    assert f"--cache-from={image}:latest" in build["args"]
    assert "--build-arg=BUILDKIT_INLINE_CACHE=1" in build["args"]
    assert f"--tag={image}:$SHORT_SHA" in build["args"]
    assert f"--tag={image}:latest" in build["args"]
    assert cb["images"] == [f"{image}:$SHORT_SHA", f"{image}:latest"]
    assert cb["options"]["machineType"]
    assert re.fullmatch(r"\d+s", cb["timeout"])


def copy_script(tmp_path: Path, name: str) -> Path:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    script = tmp_path / "scripts" / name
    shutil.copy(ROOT / "scripts" / name, script)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_cloud_build_script_dry_run_and_dirty_tree(tmp_path: Path) -> None:
    script = copy_script(tmp_path, "cloud-build.sh")
    shutil.copy(ROOT / "cloudbuild.yaml", tmp_path / "cloudbuild.yaml")
    init_repo(tmp_path)
    commit(tmp_path, "feat: first")
    git(tmp_path, "remote", "add", "origin", "https://user:secret@github.com/acme/ct.git")
    sha = git(tmp_path, "rev-parse", "--short", "HEAD")

    result = run(["bash", str(script), "--dry-run", "--project", "demo"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"us-east1-docker.pkg.dev/demo/classifier-training/classifier-training:{sha}" in out
    assert "gcloud builds submit --project=demo --config=cloudbuild.yaml" in out
    assert f"SHORT_SHA={sha}" in out
    assert "_SOURCE_URL=https://github.com/acme/ct" in out
    assert "secret" not in out, "credentials of the origin URL must not reach the image label"

    (tmp_path / "history.txt").write_text("uncommitted\n")
    result = run(["bash", str(script), "--project", "demo"], cwd=tmp_path)
    assert result.returncode == 2
    assert "uncommitted changes" in result.stderr


def vertex_spec(tmp_path: Path, *args: str, key: str = "") -> tuple[dict[str, Any], str]:
    script = copy_script(tmp_path, "vertex-job.sh")
    env = {"WANDB_API_KEY": key} if key else {}
    result = run(["bash", str(script), "--project", "demo", "--dry-run", *args], env=env)
    assert result.returncode == 0, result.stderr
    spec_text = result.stdout.split("job spec:\n", 1)[1].split("dry run, would run:", 1)[0]
    return yaml.safe_load(spec_text), result.stdout


def test_vertex_job_spec_runs_on_a_t4_and_hides_the_key(tmp_path: Path) -> None:
    spec, out = vertex_spec(
        tmp_path,
        "--data",
        "gs://my-bucket/datasets/jerseys/",
        "--run",
        "r18-a",
        "--spot",
        "--wandb",
        "--",
        "--train.epochs",
        "3",
        key="very-secret-key",
    )
    pool = spec["workerPoolSpecs"][0]
    assert pool["machineSpec"]["acceleratorType"] == "NVIDIA_TESLA_T4"
    assert pool["machineSpec"]["acceleratorCount"] == 1
    container = pool["containerSpec"]
    assert container["imageUri"] == (
        "us-east1-docker.pkg.dev/demo/classifier-training/classifier-training:latest"
    )
    assert container["args"][:2] == ["/gcs/my-bucket/runs/r18-a", "/gcs/my-bucket/datasets/jerseys"]
    assert container["args"][2:] == [
        "--recipe",
        "recipes/basketball_r18.yaml",
        "--logging.wandb",
        "true",
        "--logging.run_name",
        "r18-a",
        "--train.epochs",
        "3",
    ]
    assert spec["scheduling"] == {"restartJobOnWorkerRestart": True, "strategy": "SPOT"}
    assert "very-secret-key" not in out
    assert "gcloud ai custom-jobs create --project=demo --region=us-east1" in out


def test_vertex_job_command_copies_data_and_resumes_or_starts(tmp_path: Path) -> None:
    spec, _ = vertex_spec(tmp_path, "--data", "gs://my-bucket/d")
    command = spec["workerPoolSpecs"][0]["containerSpec"]["command"]
    # tini -g stays PID 1 so that SIGTERM reaches the trainer; here the script runs without it.
    assert command[:5] == ["/usr/bin/tini", "-g", "--", "bash", "-c"]
    command = command[3:]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "accelerate").write_text('#!/bin/sh\necho "accelerate $*"\n')
    (fake_bin / "accelerate").chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data_dir = tmp_path / "gcs" / "d"
    for rel in ("train/annotations.jsonl", "train/images/a b.jpg", "valid/annotations.jsonl"):
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / rel).write_text(rel)
    local = tmp_path / "local"
    env = {"PATH": f"{fake_bin}{os.pathsep}{TOOL_PATH}", "LOCAL_DATA_DIR": str(local)}

    fresh = run([*command, str(run_dir), str(data_dir), "--recipe", "r.yaml"], env=env)
    assert fresh.returncode == 0, fresh.stderr
    assert f"copied {data_dir} to {local} in " in fresh.stdout
    assert (local / "train" / "images" / "a b.jpg").read_text() == "train/images/a b.jpg"
    assert fresh.stdout.strip().splitlines()[-1] == (
        f"accelerate launch src/train.py --train.output_dir {run_dir} --data.root {local} "
        "--train.resume auto_or_new --recipe r.yaml"
    )  # no shell logic: the trainer's --train.resume auto_or_new resumes or starts

    spec, _ = vertex_spec(tmp_path, "--data", "gs://my-bucket/d", "--no-copy-data")
    command = spec["workerPoolSpecs"][0]["containerSpec"]["command"][3:]
    direct = run([*command, str(run_dir), str(data_dir)], env=env)
    assert "copied" not in direct.stdout
    assert f"--data.root {data_dir} --train.resume auto_or_new" in direct.stdout.splitlines()[-1]


def test_vertex_job_rejects_a_non_gcs_data_path(tmp_path: Path) -> None:
    script = copy_script(tmp_path, "vertex-job.sh")
    result = run(["bash", str(script), "--data", "/local/data", "--project", "p", "--dry-run"])
    assert result.returncode == 2
    assert "gs://BUCKET" in result.stderr


# ---------------------------------------------------------------------------------------------
# GitHub workflows and templates


def workflow(name: str) -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(WORKFLOWS / name)
    return data


def steps_text(wf: dict[str, Any]) -> str:
    return "\n".join(
        str(step.get("run", "")) for job in wf["jobs"].values() for step in job.get("steps", [])
    )


def test_workflows_pin_every_action_to_an_exact_version() -> None:
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for job in load_yaml(path)["jobs"].values():
            for step in job.get("steps", []):
                uses = step.get("uses")
                if uses:
                    assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+\.\d+\.\d+", uses), (
                        f"{path.name}: {uses} is not pinned to an exact version"
                    )
                    if uses.startswith("actions/setup-python@"):
                        assert step["with"]["cache"] == "pip"
                        assert step["with"]["python-version"] == "3.11"


def test_lint_and_test_workflows_run_the_readme_checks() -> None:
    lint = workflow("lint.yml")
    assert "ruff format --check ." in steps_text(lint)
    assert "ruff check" in steps_text(lint)
    assert re.search(r"^mypy$", steps_text(lint), re.M)

    test = workflow("test.yml")
    assert "pull_request" in test["on"]
    assert test["on"]["push"]["branches"] == ["main", "develop"]
    text = steps_text(test)
    for command in ("ruff format --check .", "ruff check .", "mypy", "pytest"):
        assert command in text
    assert "--cov=classifier_training" in text
    assert test["jobs"]["test"]["env"]["HF_HUB_OFFLINE"] == "1"
    for wf in (lint, test):
        assert "workflow_call" in wf["on"], "release.yml calls it"
        install = next(s["run"] for j in wf["jobs"].values() for s in j["steps"] if "run" in s)
        assert "-r requirements.lock -r requirements-dev.lock -e ." in install


def test_release_workflow_gates_on_lint_and_test() -> None:
    wf = workflow("release.yml")
    assert wf["on"]["push"]["branches"] == ["main", "develop"]
    jobs = wf["jobs"]
    assert jobs["lint"]["uses"] == "./.github/workflows/lint.yml"
    assert jobs["test"]["uses"] == "./.github/workflows/test.yml"
    release = jobs["release"]
    assert sorted(release["needs"]) == ["lint", "test"]
    assert release["permissions"] == {"contents": "write"}
    checkout = release["steps"][0]
    assert checkout["with"]["fetch-depth"] == 0
    psr = next(s for s in release["steps"] if "python-semantic-release" in s.get("uses", ""))
    action_version = psr["uses"].split("@v")[1]
    lock = (ROOT / "requirements-dev.lock").read_text()
    assert f"python-semantic-release=={action_version}" in lock, (
        "the release action and the locally pinned semantic-release must be the same version"
    )


def test_issue_templates_and_codeowners() -> None:
    bug = load_yaml(ROOT / ".github/ISSUE_TEMPLATE/bug_report.yml")
    assert "bug" in bug["labels"]
    feature = load_yaml(ROOT / ".github/ISSUE_TEMPLATE/feature_request.yml")
    assert "enhancement" in feature["labels"]
    assert load_yaml(ROOT / ".github/ISSUE_TEMPLATE/config.yml")["blank_issues_enabled"] is False
    owners = (ROOT / ".github/CODEOWNERS").read_text().splitlines()
    rules = [ln.split() for ln in owners if ln.strip() and not ln.startswith("#")]
    assert rules[0][0] == "*"
    assert all(len(r) >= 2 and all(o.startswith("@") for o in r[1:]) for r in rules)
    assert "conventional" in (ROOT / ".github/PULL_REQUEST_TEMPLATE.md").read_text().lower()


# ---------------------------------------------------------------------------------------------
# pre-commit: local hooks only, and they work offline


def test_pre_commit_hooks_are_local_and_installed() -> None:
    config = load_yaml(ROOT / ".pre-commit-config.yaml")
    assert all(repo["repo"] == "local" for repo in config["repos"]), "no hook repo to clone"
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    for needed in (
        "trailing-whitespace",
        "end-of-file-fixer",
        "check-yaml",
        "check-added-large-files",
        "detect-private-key",
        "ruff",
        "ruff-format",
    ):
        assert needed in hooks, needed
    for hook in hooks.values():
        tool(hook["entry"].split()[0])
    result = run([tool("pre-commit"), "validate-config", ".pre-commit-config.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_pre_commit_runs_offline_and_catches_problems(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    shutil.copy(ROOT / ".pre-commit-config.yaml", repo / ".pre-commit-config.yaml")
    (repo / "ok.py").write_text('"""Fine."""\n\nVALUE = 1\n')
    git(repo, "add", "-A")
    env = {"PRE_COMMIT_HOME": str(tmp_path / "home")}
    clean = run([tool("pre-commit"), "run", "--all-files"], cwd=repo, env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    (repo / "bad.py").write_text("import os\nx = 1   \n")  # unused import, trailing spaces
    key_header = "-----BEGIN " + "RSA PRIVATE KEY-----"  # split so this file is not flagged
    (repo / "id_rsa").write_text(key_header + "\nabc\n")
    (repo / "broken.yaml").write_text("a: [1, 2\n")
    git(repo, "add", "-A")
    dirty = run([tool("pre-commit"), "run", "--all-files"], cwd=repo, env=env)
    assert dirty.returncode != 0
    for hook_name in ("trim trailing whitespace", "detect private key", "check yaml", "ruff check"):
        assert re.search(rf"{hook_name}\.+Failed", dirty.stdout), hook_name


# ---------------------------------------------------------------------------------------------
# Versioning: semantic-release configuration, CHANGELOG, __version__


def semantic_release_config() -> dict[str, Any]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = pyproject.get("tool", {}).get("semantic_release")
    assert config, "pyproject.toml has no [tool.semantic_release] table"
    result: dict[str, Any] = config
    return result


def test_semantic_release_config_and_changelog() -> None:
    config = semantic_release_config()
    assert config["version_toml"] == ["pyproject.toml:project.version"]
    assert config["commit_parser"] == "conventional"
    branches = config["branches"]
    assert branches["main"]["match"] == "main"
    assert branches["main"].get("prerelease", False) is False
    assert branches["develop"]["match"] == "develop"
    assert branches["develop"]["prerelease"] is True
    changelog = config["changelog"]
    assert changelog["default_templates"]["changelog_file"] == "CHANGELOG.md"
    assert changelog["insertion_flag"] in (ROOT / "CHANGELOG.md").read_text()


# ---------------------------------------------------------------------------------------------
# Packaging: what each extra installs, what each lock pins, what the wheel puts on sys.path

DEV_TOOLS = {"pytest", "ruff", "mypy", "types-pyyaml"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def locked(name: str) -> set[str]:
    """Canonical names of the packages a lock file pins."""
    from packaging.utils import canonicalize_name

    lines = (ROOT / name).read_text().splitlines()
    pins = (ln.split("#")[0].strip() for ln in lines)
    return {canonicalize_name(p.split("==")[0]) for p in pins if p}


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of ``requirements`` and everything they require, read from the metadata
    of the installed distributions (markers evaluated for this interpreter)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        env = {**default_environment(), "extra": extra}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        todo += [(req_, x) for x in req.extras for req_ in map(Requirement, _requires(name))]
        if name in seen:
            continue
        seen.add(name)
        todo += [(Requirement(r), "") for r in _requires(name)]
    return seen


def _requires(name: str) -> list[str]:
    try:
        return importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is required but not installed: the locks are incomplete")


def test_runtime_lock_pins_exactly_what_the_trainer_needs() -> None:
    project = pyproject()["project"]
    needed = closure(project["dependencies"] + project["optional-dependencies"]["train"])
    runtime = locked("requirements.lock")
    assert needed - runtime == set(), "needed at run time but not pinned in requirements.lock"
    assert runtime - needed == set(), "pinned in requirements.lock but nothing requires it"
    assert not DEV_TOOLS & runtime, "test and lint tools belong in requirements-dev.lock"
    dev = locked("requirements-dev.lock")
    assert dev >= DEV_TOOLS
    assert not dev & runtime, "a package is pinned in both locks"


def test_infer_extra_installs_the_torch_free_predictor_without_torch() -> None:
    project = pyproject()["project"]
    infer = closure(project["dependencies"] + project["optional-dependencies"]["infer"])
    assert not {"torch", "torchvision", "timm", "accelerate"} & infer
    code = (  # the modules these imports load (not those the interpreter started with)
        "import sys; before = set(sys.modules); import classifier_training.deploy.onnx_classifier, "
        "classifier_training.deploy.predict, classifier_training.deploy.evaluate; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    from packaging.utils import canonicalize_name

    owners = importlib.metadata.packages_distributions()
    used = {canonicalize_name(d) for m in imported for d in owners.get(m, [])}
    assert used - {"classifier-training"} <= infer, "the predictor imports what [infer] lacks"


def test_console_scripts_point_into_the_package() -> None:
    import importlib

    config = pyproject()
    assert "py-modules" not in config["tool"]["setuptools"], "no top-level train/export modules"
    scripts = config["project"]["scripts"]
    assert set(scripts) == {"classifier-export", "classifier-predict", "classifier-evaluate"}
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert module.startswith("classifier_training.")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.slow
def test_the_wheel_installs_only_the_package(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("classifier_training-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("classifier_training-")} == {
        "classifier_training"
    }
    assert "classifier_training/py.typed" in names


def test_version_reads_the_installed_metadata() -> None:
    import classifier_training

    assert classifier_training.__version__ == importlib.metadata.version("classifier-training")


def psr_version(repo: Path) -> str:
    result = run([tool("semantic-release"), "--noop", "version", "--print"], cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def test_semantic_release_versions_from_conventional_commits(tmp_path: Path) -> None:
    """The project's configuration on a scratch history: bumps, 0.x rule, develop channel."""
    semantic_release_config()  # a clear failure when the table is missing
    repo = tmp_path / "repo"
    init_repo(repo)
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    shutil.copy(ROOT / "CHANGELOG.md", repo / "CHANGELOG.md")
    git(repo, "remote", "add", "origin", "https://github.com/example/classifier-training.git")

    commit(repo, "initial import, not a conventional message")
    assert re.fullmatch(r"\d+\.\d+\.\d+", psr_version(repo)), "must still print a version"
    git(repo, "tag", "-a", "v0.1.0", "-m", "v0.1.0")

    commit(repo, "fix(data): skip blank lines")
    assert psr_version(repo) == "0.1.1"
    commit(repo, "feat(export): add the preprocessing spec")
    assert psr_version(repo) == "0.2.0"
    commit(repo, "feat!: rename recipe fields\n\nBREAKING CHANGE: data.root is now data.path")
    assert psr_version(repo) == "0.2.0", "while 0.x a breaking change bumps the minor version"

    git(repo, "checkout", "-q", "-b", "develop")
    assert psr_version(repo) == "0.2.0-dev.1"
