"""The ``mola`` command line."""
