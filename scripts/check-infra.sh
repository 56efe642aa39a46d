#!/usr/bin/env bash
# Lint every infrastructure file with the tool that owns its format, offline:
#   hadolint          Dockerfile
#   actionlint        .github/workflows/*.yml (+ ShellCheck on their run: steps)
#   ShellCheck        scripts/*.sh
#   check-jsonschema  workflows, issue forms and config, cloudbuild.yaml (vendored schemas)
#   semantic-release  `--noop version --print` must compute a version from this history
#   pre-commit        `run --all-files` must leave every tracked file unchanged
# The tools come from PATH (activate the venv that has requirements-dev.lock installed). Every
# check runs; the script exits 1 if any failed and names them at the end.
# Usage: bash scripts/check-infra.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export NO_COLOR=1

tmp="$(mktemp -d "${TMPDIR:-/tmp}/check-infra.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

failed=()
section() { printf '\n== %s\n' "$*"; }
fail() {
    echo "FAILED: $1" >&2
    failed+=("$1")
}

missing=()
for tool in git hadolint actionlint shellcheck check-jsonschema semantic-release pre-commit; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "check-infra: not on PATH: ${missing[*]}" >&2
    echo "check-infra: pip install -r requirements-dev.lock, then activate that venv" >&2
    exit 1
fi
git rev-parse --verify --quiet HEAD >/dev/null 2>&1 || {
    echo "check-infra: $root is not a git repository with a commit; pre-commit checks the" >&2
    echo "check-infra: tracked files and semantic-release reads the history" >&2
    exit 1
}

section "hadolint $(hadolint --version | awk '{print $NF}')"
if hadolint Dockerfile; then echo "Dockerfile: ok"; else fail "hadolint Dockerfile"; fi

section "actionlint $(actionlint -version | head -n 1)"
# ShellCheck is on PATH (checked above), so actionlint also lints the run: scripts.
if actionlint -shellcheck="$(command -v shellcheck)"; then
    echo ".github/workflows: ok"
else
    fail "actionlint"
fi

section "shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
if shellcheck scripts/*.sh; then echo "scripts/*.sh: ok"; else fail "shellcheck scripts/*.sh"; fi

section "check-jsonschema $(check-jsonschema --version | awk '{print $NF}')"
workflows=(.github/workflows/*.yml)
schema_check() { # SCHEMA FILE... ; a failure names the schema
    local schema="$1"
    shift
    printf '%s: ' "$schema"
    check-jsonschema --builtin-schema "$schema" "$@" || fail "check-jsonschema $schema"
}
schema_check vendor.github-workflows "${workflows[@]}"
schema_check custom.github-workflows-require-timeout "${workflows[@]}"
schema_check vendor.github-issue-forms .github/ISSUE_TEMPLATE/bug_report.yml \
    .github/ISSUE_TEMPLATE/feature_request.yml
schema_check vendor.github-issue-config .github/ISSUE_TEMPLATE/config.yml
schema_check vendor.cloudbuild cloudbuild.yaml

section "semantic-release $(semantic-release --version | awk '{print $NF}') --noop version --print"
# Evaluated in a throw-away clone of HEAD (the committed state), so the check neither depends on
# this checkout's remotes nor touches it. The release groups are the branches main and develop:
# on any other branch or a detached HEAD, ask what main would release from this commit.
branch="$(git symbolic-ref --quiet --short HEAD || true)"
[[ "$branch" == "main" || "$branch" == "develop" ]] || branch="main"
psr_dir="$tmp/repo"
git clone --quiet --shared --no-checkout "$root" "$psr_dir"
git -C "$psr_dir" checkout --quiet -B "$branch" "$(git rev-parse HEAD)"
echo "as branch '$branch' at $(git rev-parse --short HEAD) (committed state)"
if version="$(cd "$psr_dir" && semantic-release --noop version --print 2>"$tmp/psr.log")"; then
    version="$(tail -n 1 <<<"$version")"
    if [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$ ]]; then
        echo "next version: $version"
    else
        cat "$tmp/psr.log" >&2
        fail "semantic-release printed '$version', not a version"
    fi
else
    cat "$tmp/psr.log" >&2
    fail "semantic-release --noop version --print"
fi

section "pre-commit $(pre-commit --version | awk '{print $NF}') run --all-files"
# Its own cache in a temp dir: all hooks are local, nothing is cloned or downloaded.
if PRE_COMMIT_HOME="$tmp/pre-commit" pre-commit run --all-files --show-diff-on-failure; then
    echo "pre-commit: ok"
else
    fail "pre-commit run --all-files (the fixers may have rewritten files: see the diff above)"
fi

echo
if ((${#failed[@]})); then
    echo "check-infra: ${#failed[@]} check(s) failed:" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "check-infra: all checks passed"
