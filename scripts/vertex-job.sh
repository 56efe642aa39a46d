#!/usr/bin/env bash
# Launch the training image as a Vertex AI custom job on one NVIDIA T4, reading the dataset from
# Cloud Storage and writing the run folder back to it (Vertex AI mounts every bucket the job can
# read at /gcs/<bucket> with Cloud Storage FUSE).
#
# Usage: scripts/vertex-job.sh --data gs://BUCKET/path/to/dataset [options] [-- TRAIN_ARGS...]
#   --data URI        dataset root (split folders train/valid/test)                     (required)
#   --runs URI        where run folders go (default: gs://<data bucket>/runs)
#   --run NAME        run name (default: <recipe name>-<UTC time>); re-use it to resume
#   --recipe FILE     recipe inside the image (default: recipes/basketball_r18.yaml)
#   --project ID      GCP project (default: gcloud config get-value project)
#   --region R        Vertex AI and Artifact Registry region (default: us-east1)
#   --repo NAME       Artifact Registry repository (default: classifier-training)
#   --image NAME      image name (default: classifier-training)
#   --tag TAG         image tag (default: latest; a short sha pins the code)
#   --machine-type M  N1 machine for the T4 (default: n1-standard-8)
#   --spot            Spot capacity: cheaper, can be preempted (the job then resumes, see below)
#   --no-copy-data    read the dataset through the bucket's FUSE mount instead of copying it to
#                     the VM's local disk first (the default copy is parallel, once per job)
#   --wandb           log to Weights & Biases; needs WANDB_API_KEY in this shell's environment
#   --dry-run         print the job spec and the gcloud command; submit nothing (gcloud optional)
#   TRAIN_ARGS        more src/train.py overrides, e.g. -- --train.epochs 100
#
# Data: Cloud Storage FUSE opens each small file with a network round trip, and every run reads
# every image more than once (full-decode check, dataset statistics, the decoded-image cache), so
# the job first copies the dataset to the VM's local SSD with 32 parallel copies and trains from
# there (--no-copy-data keeps the FUSE path). The image sets train.require_gpu: a host whose
# driver cannot run the image's CUDA fails at once instead of training on the CPU.
#
# Resume: the job trains with --train.resume auto_or_new, which continues the newest checkpoint
# of the run folder when there is one and starts the run otherwise, so a preempted VM that
# Vertex AI restarts (restartJobOnWorkerRestart) continues from the last checkpoint, and so does
# a job submitted again with the same --run NAME after it failed or was cancelled. On the
# preemption notice (SIGTERM) the trainer writes a checkpoint before it exits.
set -euo pipefail

usage() { sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; }
die() {
    echo "vertex-job.sh: $*" >&2
    exit 2
}

data=""
runs=""
run=""
recipe="recipes/basketball_r18.yaml"
project=""
region="us-east1"
repo="classifier-training"
image="classifier-training"
tag="latest"
machine_type="n1-standard-8"
spot=0
copy_data=1
wandb=0
dry_run=0
train_args=()

while (($#)); do
    case "$1" in
    --data | --runs | --run | --recipe | --project | --region | --repo | --image | --tag | --machine-type)
        [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
        case "$1" in
        --data) data="$2" ;;
        --runs) runs="$2" ;;
        --run) run="$2" ;;
        --recipe) recipe="$2" ;;
        --project) project="$2" ;;
        --region) region="$2" ;;
        --repo) repo="$2" ;;
        --image) image="$2" ;;
        --tag) tag="$2" ;;
        --machine-type) machine_type="$2" ;;
        esac
        shift
        ;;
    --spot) spot=1 ;;
    --no-copy-data) copy_data=0 ;;
    --wandb) wandb=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        train_args=("$@")
        break
        ;;
    *) die "unknown argument '$1' (see --help; train.py overrides go after --)" ;;
    esac
    shift
done

# gs://bucket/path -> /gcs/bucket/path (the job's FUSE mount point).
gcs_path() {
    [[ "$1" =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$ ]] || die "$2 must be a gs://BUCKET/... URI, got '$1'"
    local path="/gcs/${1#gs://}"
    echo "${path%/}"
}

[[ -n "$data" ]] || die "--data gs://BUCKET/path/to/dataset is required"
data_dir="$(gcs_path "$data" --data)"
if [[ -z "$runs" ]]; then
    bucket="${data#gs://}"
    runs="gs://${bucket%%/*}/runs"
fi
runs_dir="$(gcs_path "$runs" --runs)"
recipe_name="$(basename "$recipe" .yaml)"
[[ -n "$run" ]] || run="$recipe_name-$(date -u +%Y%m%d-%H%M%S)"
[[ "$run" =~ ^[A-Za-z0-9][-_.A-Za-z0-9]*$ ]] || die "--run '$run': use letters, digits, '-', '_', '.'"
run_dir="$runs_dir/$run"

if [[ -z "$project" ]]; then
    if command -v gcloud >/dev/null 2>&1; then
        project="$(gcloud config get-value project 2>/dev/null || true)"
    fi
    if [[ -z "$project" ]]; then
        ((dry_run)) || die "no GCP project: pass --project or run 'gcloud config set project ID'"
        project="YOUR_PROJECT"
    fi
fi
image_uri="$region-docker.pkg.dev/$project/$repo/$image:$tag"

args=(--recipe "$recipe")
if ((wandb)); then
    [[ -n "${WANDB_API_KEY:-}" ]] || die "--wandb needs WANDB_API_KEY in the environment"
    args+=(--logging.wandb true --logging.run_name "$run")
fi
args+=("${train_args[@]}")

# A YAML double-quoted scalar.
yq() {
    local s="${1//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

# The job spec (CustomJobSpec). The container command replaces the image's ENTRYPOINT to copy the
# dataset to local disk; like the ENTRYPOINT, tini -g stays PID 1 (SIGTERM reaches the trainer's
# process group) and the launcher ignores TERM/INT, so the trainer checkpoints before it exits.
job_spec() {
    local key="$1"
    cat <<EOF
workerPoolSpecs:
  - replicaCount: 1
    machineSpec:
      machineType: $(yq "$machine_type")
      acceleratorType: NVIDIA_TESLA_T4
      acceleratorCount: 1
    diskSpec:
      bootDiskType: pd-ssd
      bootDiskSizeGb: 100
    containerSpec:
      imageUri: $(yq "$image_uri")
      command:
        - /usr/bin/tini
        - -g
        - --
        - bash
        - -c
        - |
          run_dir="\$1"; data_dir="\$2"; shift 2; copy_data=$copy_data
          if ! mkdir -p "\$run_dir" || ! touch "\$run_dir/.write-test"; then
            echo "cannot write to \$run_dir as uid \$(id -u): check the job's bucket access" >&2
            exit 1
          fi
          rm -f "\$run_dir/.write-test"
          if [ "\$copy_data" = 1 ]; then
            local_dir="\${LOCAL_DATA_DIR:-/tmp/dataset}"; start=\$(date +%s)
            mkdir -p "\$local_dir"
            if ! (cd "\$data_dir" && find . -type f -print0 |
                  xargs -0 -r -n 64 -P 32 cp --parents -t "\$local_dir"); then
              echo "could not copy \$data_dir to \$local_dir (disk full? use --no-copy-data)" >&2
              exit 1
            fi
            echo "copied \$data_dir to \$local_dir in \$((\$(date +%s) - start)) s"
            data_dir="\$local_dir"
          fi
          trap '' TERM INT
          exec accelerate launch src/train.py --train.output_dir "\$run_dir" \\
            --data.root "\$data_dir" --train.resume auto_or_new "\$@"
        - vertex-train
      args:
        - $(yq "$run_dir")
        - $(yq "$data_dir")
EOF
    local a
    for a in "${args[@]}"; do
        printf '        - %s\n' "$(yq "$a")"
    done
    if ((wandb)); then
        cat <<EOF
      env:
        - name: WANDB_API_KEY
          value: $(yq "$key")
EOF
    fi
    cat <<EOF
scheduling:
  restartJobOnWorkerRestart: true
EOF
    if ((spot)); then
        echo "  strategy: SPOT"
    fi
}

display_name="classifier-training-$run"
echo "run folder: ${runs%/}/$run (in the job: $run_dir)"
echo "image:      $image_uri"
if ((dry_run)); then
    echo "job spec:"
    job_spec "<WANDB_API_KEY from the environment>"
    printf 'dry run, would run:'
    printf ' %q' gcloud ai custom-jobs create --project="$project" --region="$region" \
        --display-name="$display_name" --config=JOB_SPEC.yaml
    printf '\n'
    exit 0
fi

command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI"
spec_dir="$(mktemp -d "${TMPDIR:-/tmp}/vertex-job.XXXXXX")" # mode 700: it may hold the W&B key
trap 'rm -rf "$spec_dir"' EXIT
spec_file="$spec_dir/job.yaml"
job_spec "${WANDB_API_KEY:-}" >"$spec_file"
gcloud ai custom-jobs create --project="$project" --region="$region" \
    --display-name="$display_name" --config="$spec_file"
