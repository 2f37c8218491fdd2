"""The errors a user can act on. Every one says what was wrong and what to change; the CLI prints it as one
`error:` line and exits 2, and a pipeline task that fails with one is not retried (it would fail the same way).

Anything else that escapes a stage is a bug or a transient failure (a network drop, a killed process) and keeps
its traceback. A few user-facing errors are transient too (`retryable`): a server that could not be reached.
"""


class TuneforgeError(Exception):
    """Bad input, config or setup: the message names the file, line or key and what would fix it."""

    retryable = False  # whether the same task may succeed if simply run again


class ConfigError(TuneforgeError):
    """A config that cannot be used; the message names the file, the key and what was expected."""


class DataError(TuneforgeError):
    """Bad input data; the message names the file, the line and the reason."""


class TemplateError(DataError):
    """A chat template that cannot render the data as training needs it."""


class ModelError(TuneforgeError):
    """A model that cannot be loaded, merged or exported as asked."""


class ExportError(ModelError):
    """A model that cannot be written as GGUF, or whose GGUF file fails verification."""


class ServeCheckError(ModelError):
    """A GGUF file that, served by llama.cpp, answers the eval tasks worse than or unlike the merged model."""


class MergeCheckError(ModelError):
    """The merged model does not reproduce the adapter model."""


class StorageError(TuneforgeError):
    """S3 or a stage output failed in a way a user can act on; never names a credential."""


class IncompleteOutputError(StorageError):
    """A stage output without its manifest (cut off, or of another stage)."""


class StorageUnreachableError(StorageError):
    """S3 did not answer within the retry budget."""

    retryable = True


class TrackingError(TuneforgeError):
    """MLflow could not be reached when a stage started; nothing was done."""

    retryable = True


class RegistryError(TuneforgeError):
    """The model registry refused or cannot do what was asked."""


class SetupError(TuneforgeError):
    """A setting that cannot work on this machine or cluster; raised before any work starts."""


class LaunchError(SetupError):
    """A process of a distributed stage failed; its own error is in the log above (an OOM kill, say)."""

    retryable = True


class ManifestError(SetupError):
    """A Kubernetes job manifest the Kubeflow API types do not accept as it is."""


class ServiceError(SetupError):
    """A local service (SeaweedFS, MLflow) could not be started or reached."""
