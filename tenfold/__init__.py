"""tenfold: real inference serving in plain Python.

One Ray Serve replica runs several isolated CPython interpreters inside one process:

- ``tenfold.runtime``: the interpreter pool (a ``concurrent.futures.Executor``)
- ``tenfold.packaging``: model archives (torch.package with a manifest and digests)
- ``tenfold.integration``: Ray Serve deployments over both
"""

__version__ = "0.1.0"
