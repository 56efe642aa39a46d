#!/usr/bin/env bash
# Build the GPU training image on Cloud Build (cloudbuild.yaml) and push it to Artifact Registry
# as <region>-docker.pkg.dev/<project>/<repo>/<image>:{<short sha>,latest}.
#
# Usage: scripts/cloud-build.sh [--dry-run] [--project ID] [--region R] [--repo NAME]
#                               [--image NAME] [--allow-dirty]
#   --dry-run      print the gcloud command and the image tags; submit nothing (gcloud optional)
#   --project      GCP project (default: gcloud config get-value project)
#   --region       Artifact Registry region (default: us-east1)
#   --repo         Artifact Registry repository (default: classifier-training)
#   --image        image name (default: classifier-training)
#   --allow-dirty  build although the work tree has uncommitted changes (the tag then lies)
#
# The upload follows .gitignore (gcloud's default when there is no .gcloudignore), so .venv,
# data/ and runs/ stay local; the Docker context is trimmed further by .dockerignore.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() {
    echo "cloud-build.sh: $*" >&2
    exit 2
}

dry_run=0
allow_dirty=0
project=""
region="us-east1"
repo="classifier-training"
image="classifier-training"

while (($#)); do
    case "$1" in
    --dry-run) dry_run=1 ;;
    --allow-dirty) allow_dirty=1 ;;
    --project | --region | --repo | --image)
        [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
        case "$1" in
        --project) project="$2" ;;
        --region) region="$2" ;;
        --repo) repo="$2" ;;
        --image) image="$2" ;;
        esac
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
git rev-parse --verify -q HEAD >/dev/null || die "no commit yet: the image is tagged with the commit it was built from"
short_sha="$(git rev-parse --short HEAD)"
version="$(git describe --tags --always --dirty 2>/dev/null || echo "$short_sha")"

if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    if ((allow_dirty)); then
        echo "cloud-build.sh: warning: uncommitted changes go into an image tagged $short_sha" >&2
    elif ((!dry_run)); then
        die "uncommitted changes: commit them (the image is tagged $short_sha) or pass --allow-dirty"
    fi
fi

if [[ -z "$project" ]]; then
    if command -v gcloud >/dev/null 2>&1; then
        project="$(gcloud config get-value project 2>/dev/null || true)"
    fi
    if [[ -z "$project" ]]; then
        ((dry_run)) || die "no GCP project: pass --project or run 'gcloud config set project ID'"
        project="YOUR_PROJECT"
    fi
fi

# OCI source label: the origin URL as https, without credentials (never put a token in a label).
source_url="$(git remote get-url origin 2>/dev/null || true)"
source_url="$(sed -E -e 's#^git@([^:]+):#https://\1/#' -e 's#^(https?://)[^/@]+@#\1#' \
    -e 's#\.git$##' <<<"$source_url")"
[[ "$source_url" == https://* ]] || source_url=""

# Substitution values must not contain a comma (gcloud's list separator).
for value in "$region" "$repo" "$image" "$version" "$source_url"; do
    [[ "$value" != *,* ]] || die "substitution value '$value' contains a comma"
done

cmd=(gcloud builds submit
    --project="$project"
    --config=cloudbuild.yaml
    --substitutions="SHORT_SHA=$short_sha,_REGION=$region,_REPO_NAME=$repo,_IMAGE_NAME=$image,_VERSION=$version,_SOURCE_URL=$source_url"
    .)

image_ref="$region-docker.pkg.dev/$project/$repo/$image"
echo "image: $image_ref:$short_sha (also :latest)"
if ((dry_run)); then
    printf 'dry run, would run:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI"
"${cmd[@]}"
