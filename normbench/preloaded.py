"""The last module a data-parallel run's fork server imports (``distributed.WORKER_MODULES``):
importing it freezes the garbage collector over everything imported before it.

multiprocessing's fork server has no hook but its list of modules to import, so this is
one. Freezing moves the server's objects (torch's, by the million) out of the collector's
reach: the server's exit, which ran the interpreter's last collections over them, took
about a second after the run was over (the run's output stays open until the server
ends), and 0.1 s frozen (benchmarks/README.md). The workers forked from the server
inherit the frozen heap too, so their collections skip those objects, and never write
to the pages they share with the server.
"""

import gc

gc.freeze()
