"""tenfold.bench: the benchmarks behind `tenfold bench ...` (one module each, sharing `common`).

Benchmarks sit on top of the library: they import tenfold.runtime, .packaging and .integration, and
nothing in the library imports them.
"""
