"""Errors a user can fix. The CLI prints them as one line (exit status 2) instead of a traceback."""


class UserError(ValueError):
  """Base class: bad input from a user (config, dataset, arguments), with a message that says what to do."""


class ConfigError(UserError):
  """A config that does not validate; the message names the key and what is valid."""


class DatasetError(UserError):
  """A dataset that is unknown, not prepared, or misconfigured."""
