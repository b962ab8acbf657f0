"""Errors a user can fix. The CLI prints them as one line (exit status 2) instead of a traceback."""


class UserError(ValueError):
  """Base class: bad input from a user (config, dataset, arguments), with a message that says what to do."""


class ConfigError(UserError):
  """A config that does not validate; the message names the key and what is valid."""


class DatasetError(UserError):
  """A dataset that is unknown, not prepared, or misconfigured."""


def check_int(name, value, minimum=1, maximum=None):
  """Raises ValueError unless `value` is a Python int (not a bool) in [minimum, maximum] (no upper bound if None);
  the message names `name`, the bounds and the value."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None
                                                                                   and value > maximum):
    if maximum is not None:
      what = f"an int in [{minimum}, {maximum}]"
    else:
      what = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
    raise ValueError(f"{name} must be {what}, got {value!r}.")
