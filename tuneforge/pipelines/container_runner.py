"""`tuneforge run --runner container`: kfp.local's DockerRunner, each task in the image the pipeline names, as a
cluster's pod would run it: user 10001, a read-only root filesystem, writable only where the images declare
(/tmp, /cache, /workspace) and the pipeline root KFP mounts, the host's network (to reach SeaweedFS and
MLflow from `tuneforge services up`), credentials as environment variables from this process's environment.

It talks to any Docker-compatible API: Docker's socket, or podman's (`podman system service`)."""

from __future__ import annotations

import os
from pathlib import Path

from tuneforge import env, storage
from tuneforge.config import Config
from tuneforge.data import fingerprint
from tuneforge.errors import ConfigError

USER = "10001"  # the images' user, as the chart's pods run them
SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock")
# Passed into each container's environment when set here; never written into the pipeline or its outputs. The run
# id is what a cluster's pod reads from its label.
PASSED = (env.KFP_RUN_ID, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
               "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "HF_TOKEN")
START_PODMAN = ("podman system service --time=0 unix:///run/podman/podman.sock & "
                "export DOCKER_HOST=unix:///run/podman/podman.sock")


def engine_host() -> str:
    """The Docker API to use: $DOCKER_HOST, else the first socket that exists."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    for socket in SOCKETS:
        if Path(socket).exists():
            return f"unix://{socket}"
    raise ConfigError(f"--runner container needs a Docker-compatible API and none was found ($DOCKER_HOST is unset, "
                      f"no socket at {', '.join(SOCKETS)}); with podman: {START_PODMAN}")


def host_inputs(config: Config) -> list[str]:
    """Files and folders on this machine that the stages read: local data sources, eval tasks, lm-eval task files, a
    local base model."""
    paths = [*fingerprint.data_paths(config), config.base_model.source]
    return sorted({str(Path(p).resolve()) for p in paths if not storage.is_s3(p) and "://" not in p and Path(p).exists()})


def check_config(config: Config) -> None:
    """What a container cannot reach: a tracking store or published outputs inside this machine's work dir."""
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not uri.startswith(("http://", "https://")):
        where = uri or "unset (SQLite in the work dir)"
        raise ConfigError(f"--runner container logs to an MLflow server, and tracking.uri is {where}: run `tuneforge "
                          "services up` and `source` its env file, or set tracking.uri")
    if not config.storage.uri or not storage.is_s3(config.storage.uri):
        raise ConfigError("--runner container publishes to S3, and storage.uri is "
                          f"{config.storage.uri or 'unset'}: set storage.uri: s3://BUCKET/PREFIX (`tuneforge services up` "
                          "gives a SeaweedFS endpoint)")


def preflight(config: Config) -> None:
    """Everything a container run needs that can be checked before it starts: the config, the container API."""
    import docker

    check_config(config)
    host = engine_host()
    os.environ["DOCKER_HOST"] = host  # kfp's task handler connects with docker.from_env()
    client = None
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ConfigError(f"the container API at {host} does not answer ({exc}); with podman: {START_PODMAN}") from None
    finally:
        if client is not None:
            client.close()


def run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """The task's container, run to its end; its exit status. kfp.local's own runs it with auto_remove and reads a
    container already removed when it waits as exit 0, so a task that failed would pass: this one waits, then removes."""
    import docker

    if not client.images.list(name=image):
        raise ConfigError(f"image {image} is not in the container engine: build it (make images-local builds "
                          "localhost/tuneforge/*:dev) or compile with TUNEFORGE_REGISTRY and TUNEFORGE_IMAGE_TAG naming "
                          "images it has")
    container = client.containers.run(image=image, command=command, detach=True, volumes=volumes, **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return container.wait()["StatusCode"]
    finally:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


def docker_runner(config: Config, pipeline_root: Path):
    from docker.types import Mount
    from kfp import local
    from kfp.local import docker_task_handler

    preflight(config)
    docker_task_handler.run_docker_container = run_container
    # The tasks write their outputs under the pipeline root as the images' user; /cache (models built or downloaded
    # once for every task, as a cluster's model cache volume) and /workspace are folders beside them.
    writable = {"/cache": pipeline_root / ".cache", "/workspace": pipeline_root / ".workspace"}
    for folder in (pipeline_root, *writable.values()):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
    mounts = [Mount(target=path, source=path, type="bind", read_only=True) for path in host_inputs(config)]
    mounts += [Mount(target=target, source=str(source), type="bind") for target, source in writable.items()]
    return local.DockerRunner(
        user=USER, read_only=True, network_mode="host",
        tmpfs={"/tmp": ""},  # the engine's default for a tmpfs: mode 1777
        environment={key: os.environ[key] for key in PASSED if key in os.environ},
        mounts=mounts, **cpus_of_this_process(),
    )


def cpus_of_this_process() -> dict[str, str]:
    """A run narrowed to some of the machine's CPUs (`taskset`, a cpuset) keeps its containers on them, as its
    subprocess tasks are: torch sizes its thread pool by the CPUs it may use, and the thread count changes the
    order of float sums, so the same task on the same seed gives the same weights either way."""
    cpus = env.usable_cpus()
    return {"cpuset_cpus": ",".join(map(str, cpus))} if len(cpus) < (os.cpu_count() or 0) else {}
