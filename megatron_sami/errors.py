"""Every error type of the package, in one place: one base class for errors a user can fix,
with typed subclasses.

Every :class:`SamiError` message is a sentence that names the fix. Command-line entry points
catch :class:`SamiError` and print only the message (no traceback wall) and exit with code 2;
anything else is a bug and keeps its traceback. The modules that raise these errors also
import them, so imports from where they were defined before still work (e.g.
``from megatron_sami.alignment.data import DataError``).

    SamiError
    ├── ConfigError ── LayoutError
    ├── EnvironmentSetupError
    ├── CheckpointError
    ├── ConversionError
    ├── DataError ── OverlengthError
    ├── QueryDataError
    ├── PrincipleWriterError
    ├── JudgeError
    └── PhaseError
    Preempted            (not an error: a requested stop; exit code 75)
    RequestError         (an HTTP client's bad request to ``sami-serve``)
    DistributedJobError  (a failed rank in a multi-process test)
"""


class SamiError(Exception):
    """An error caused by input or configuration that the user can fix."""


class ConfigError(SamiError):
    """Raised when a configuration value is invalid or inconsistent with another one."""


class LayoutError(ConfigError):
    """Raised when the parallel layout does not fit the world size or the model."""


class EnvironmentSetupError(SamiError):
    """Raised when the process environment (launcher variables, devices, packages) is unusable."""


class CheckpointError(SamiError):
    """Raised when a checkpoint is missing, incomplete, or does not match the model."""


class ConversionError(SamiError):
    """Raised when the input or output of an HF <-> Megatron conversion is unusable; nothing was written."""


class DataError(SamiError):
    """Raised when a records file or record is unusable; the message names the line."""


class OverlengthError(DataError):
    """Raised when a tokenized record does not fit ``data.seq_length`` (callers may skip the record)."""


class QueryDataError(SamiError):
    """Raised when a query source is missing, unreachable or malformed."""


class PrincipleWriterError(SamiError):
    """Raised when the principle writer model yields too few valid principles."""


class JudgeError(SamiError):
    """Raised when the judge endpoint cannot be used (unreachable, refusing the key, failing after retries)."""


class PhaseError(SamiError):
    """Raised when a phase's subprocess of ``sami-iterate`` fails; its own output says why."""


class Preempted(Exception):
    """Raised when the job was asked to stop (SIGUSR1/SIGTERM from the scheduler) and saved a checkpoint.

    Commands exit with :data:`EXIT_PREEMPTED` so a batch script can requeue itself.
    """


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later


class RequestError(Exception):
    """Raised inside ``sami-serve`` when a client's request is invalid; answered with HTTP ``status``.

    Not a :class:`SamiError`: the server reports it to the client and keeps serving.
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class DistributedJobError(AssertionError):
    """Raised by the multi-process test harness when ranks failed or hung; the message holds each
    rank's report. An ``AssertionError``, so pytest reports it as a test failure."""


class OutputOverlapError(SamiError):
    """Raised when a command's output path is, contains, or lies inside one of its inputs (writing
    there would delete or replace the input); nothing was written."""


class StorageError(SamiError):
    """Raised when the file system refuses a write or read (disk full, read-only, no permission);
    the message names the path and the errno's text."""


class BrokenDependencyError(EnvironmentSetupError, ImportError):
    """Raised when an installed package fails to import in a way its importers do not handle
    (e.g. Transformer Engine's torch extension built for another torch); the message names the
    import that failed and the fix. Also an ``ImportError``, so code that treats an unimportable
    module as absent (multiprocessing's fork-server preload) still does."""


class RunInUse(SamiError):
    """Another process holds the run directory's lock (:mod:`megatron_sami.runlock`)."""


class DeviceBudgetError(SamiError):
    """Raised when a process would materialise more model parameters than the per-process device
    budget (``SAMI_DEVICE_BUDGET_PARAMS``, :mod:`megatron_sami.device_budget`) allows; the message
    names the process's parameter count, the budget and the layout change that fits."""
