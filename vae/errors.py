"""Errors a user can fix: the command-line scripts print their message on one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (data, arguments, files); the message names it and the fix."""


class TrainingDiverged(Exception):
    """The loss or the parameters became NaN or infinite; the run stops before saving them."""


class EveryProcessError(UserError):
    """A UserError raised on every process at the same step (under torchrun): after printing it, the processes wait
    for each other, so that each says it before the launcher stops the rest."""


class Stopped(Exception):
    """A long step (fitting the diffusion prior at the end of a run) saw a stop request (SIGINT/SIGTERM) and ended
    early; the caller saves what it has and exits as the signal asks."""


class MissingSampler(UserError):
    """A command needs a sampler the checkpoint does not hold; the scripts add how to fit it."""

    def __init__(self, message, name, path):
        super().__init__(message)
        self.name, self.path = name, path


class MissingData(UserError):
    """The data set is not on disk and could not be downloaded; the inference script adds what works without it."""


class ResumableError(UserError):
    """The run stopped with its last good checkpoint kept at `checkpoint` (None: nothing was saved yet); the
    training script adds the command that resumes it."""

    def __init__(self, message, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint
