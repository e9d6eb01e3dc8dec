"""The errors fedtune raises for bad input; each carries one line that names the culprit."""


class FedtuneError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""


class ConfigError(FedtuneError):
    """A config key is unknown, has the wrong type, or holds an invalid value."""


class DataError(FedtuneError):
    """A data file is missing, unreadable, malformed, or a partition is empty."""


class ModelError(FedtuneError):
    """A model path or id cannot be loaded, or does not fit the requested settings."""


class IncompatibleComponentsError(ConfigError):
    """Settings that are valid alone but cannot be combined."""


class UpdateRejected(FedtuneError):
    """A client's reply failed validation (wrong keys, shapes, dtypes, non-finite, too large)."""


class PrivacyBudgetExceeded(FedtuneError):
    """The next release would push epsilon past ``privacy.target-epsilon``."""


class CommunicationBudgetExceeded(FedtuneError):
    """The next round's traffic would push the run past ``communication.budget-mb``."""
