"""Tests for tfreward.errors: the shared int check and the error hierarchy."""

import pytest

from tfreward import errors


@pytest.mark.parametrize("value, minimum, maximum, message", [
    (0, 1, None, "n must be a positive int, got 0."),
    (-1, 0, None, "n must be a non-negative int, got -1."),
    (1, 2, None, "n must be an int >= 2, got 1."),
    (5, 0, 4, r"n must be an int in \[0, 4\], got 5."),
    (True, 1, None, "n must be a positive int, got True."),
    (2.0, 1, None, "n must be a positive int, got 2.0."),
    ("3", 1, None, "n must be a positive int, got '3'."),
])
def test_check_int_rejects_with_a_message_naming_the_bounds(value, minimum, maximum, message):
  with pytest.raises(ValueError, match=message):
    errors.check_int("n", value, minimum, maximum)


def test_check_int_accepts_ints_in_range():
  for value, minimum, maximum in ((1, 1, None), (0, 0, 4), (4, 0, 4), (10**12, 1, None)):
    errors.check_int("n", value, minimum, maximum)
  assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.DatasetError, errors.UserError)
