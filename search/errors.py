"""Errors a user can cause. Each message says what went wrong and what to do; the CLI prints it
on one line and exits non-zero, without a traceback."""


class SearchError(Exception):
    """Base class of every user-facing error of the service."""

    exit_code = 2


class DataError(SearchError):
    """The data set is missing, malformed, or holds nothing usable."""


class StorageError(SearchError):
    """The study storage cannot be reached, or the study is not there."""


class ConfigError(SearchError):
    """A setting, search-space file or backbone name is wrong."""


class WeightsError(SearchError):
    """Pretrained weights are asked for but cannot be found offline."""


class RegistryError(SearchError):
    """Promotion, rollback or loading of the champion failed."""


class PromotionInProgress(RegistryError):
    """Another promote-best run holds the registry lock."""

    exit_code = 3
