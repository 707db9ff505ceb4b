"""The error the export package raises for problems a user can fix: an option value the exporter
cannot use, a graph that breaks the bundle's contract, a parity or task-metric gate that fails.

The message is one line. Problems with the RUN being exported come from the model package as
`model.errors.ModelError`; the `encoder` CLI prints either as one line and exits 2.
"""


class ExportError(Exception):
    """The export could not produce a bundle; nothing was written at the destination."""
