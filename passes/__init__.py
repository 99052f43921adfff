"""fxopt.passes: the built-in passes. Each registers through the `fxopt.passes` entry-point group."""
