"""The error the model package raises for problems a user can fix: a missing or malformed input file,
a RUN directory that is incomplete or corrupt, an option value the model cannot use.

The message is one line naming the file (and row) or the value at fault. The package never decides how
a failure is shown: the `encoder` CLI prints it as one line and exits 2.
"""


class ModelError(Exception):
    """A problem with the inputs of a model step (data, tokenizer, RUN directory, option values)."""
