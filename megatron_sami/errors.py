"""One exception base class for errors a user can fix, with typed subclasses.

Every message is a sentence that names the fix. Command-line entry points catch
:class:`SamiError` and print only the message (no traceback wall); anything else is a bug
and keeps its traceback.
"""


class SamiError(Exception):
    """An error caused by input or configuration that the user can fix."""


class ConfigError(SamiError):
    """A configuration value is invalid or inconsistent with another one."""


class LayoutError(ConfigError):
    """The parallel layout does not fit the world size or the model."""


class EnvironmentSetupError(SamiError):
    """The process environment (launcher variables, devices, packages) is unusable."""


class Preempted(Exception):
    """The job was asked to stop (SIGUSR1/SIGTERM from the scheduler) and saved a checkpoint.

    Commands exit with :data:`EXIT_PREEMPTED` so a batch script can requeue itself.
    """


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
