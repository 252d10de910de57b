"""The one error type of the converter."""


class ConversionError(ValueError):
  """A source the converter cannot turn into a checkpoint; the message is one line naming the culprit."""
