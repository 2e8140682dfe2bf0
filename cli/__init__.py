"""The `surgery` command line: a thin click layer over the `surgery` library."""
