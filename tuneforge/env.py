"""The environment variables tuneforge reads and sets, in one place."""

import os

# Set by the pipeline for its tasks.
PARENT_RUN_ID = "TUNEFORGE_PARENT_RUN_ID"  # the pipeline's MLflow run, parent of every stage's run
RUN_ID = "TUNEFORGE_RUN_ID"  # names the run's folder under storage.uri
CHECKPOINT_URI = "TUNEFORGE_CHECKPOINT_URI"  # where sft/dpo mirror their checkpoints (an S3 prefix)
DATA_FINGERPRINT = "TUNEFORGE_DATA_FINGERPRINT"  # the data as the run's first task found it; data-prep checks it
BASE_MODEL_FINGERPRINT = "TUNEFORGE_BASE_MODEL_FINGERPRINT"  # the base model as that task found it; in the lineage
PUBLISH_URI = "TUNEFORGE_PUBLISH_URI"  # where the stage's output will be published; recorded in its lineage
# The KFP run a task belongs to: the pod's `pipeline/runid` label on a cluster, set by `tuneforge run` locally. Not a task
# input, so that it stays out of the tasks' cache keys.
KFP_RUN_ID = "KFP_RUN_ID"

# Set by the user or the cluster.
CACHE = "TUNEFORGE_CACHE"  # base models, converted GGUF weights and downloaded data
REGISTRY = "TUNEFORGE_REGISTRY"  # the image registry the compiled pipeline names (and images/build.sh pushes to)
IMAGE_TAG = "TUNEFORGE_IMAGE_TAG"

# Set by the images: the image's version and the code revision it was built from (no git inside an image).
IMAGE_VERSION = "TUNEFORGE_IMAGE_VERSION"
CODE_REVISION = "TUNEFORGE_CODE_REVISION"

# Read by MLflow's client: the identity on a tracking server with authentication.
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def mlflow_credentials_refused(uri: str | None = None) -> str:
    """The tracking server's 401, said without the secret: whose credentials, and where they come from."""
    user = os.environ.get(MLFLOW_CREDENTIALS[0])
    server = f"the MLflow server at {uri}" if uri else "the MLflow server"
    who = f"the credentials of user {user!r}" if user else "a request without credentials"
    return (f"{server} refused {who} (401 Unauthorized): set {' and '.join(MLFLOW_CREDENTIALS)} (on a cluster: in "
            "the Secret cluster.mlflow_secret names; after `tuneforge services up`: source its env file, or "
            "approver.env to promote)")


# Written by `tuneforge services up` into its env file, beside AWS_* and MLFLOW_TRACKING_URI.
S3_BUCKET = "TUNEFORGE_S3_BUCKET"

# Handed to the nodes of a Kubeflow Trainer job.
CONFIG_JSON = "TUNEFORGE_CONFIG_JSON"
INPUTS = "TUNEFORGE_INPUTS"
JOB_DIR = "TUNEFORGE_JOB_DIR"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on. A cpuset or `taskset` narrows them, which os.cpu_count does not see; llama.cpp
    takes one thread per CPU from here, since its threads busy-wait for each other and two on one CPU stall."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS
        return list(range(os.cpu_count() or 1))
