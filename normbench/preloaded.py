"""The last module a data-parallel run's fork server imports (``distributed.WORKER_MODULES``):
importing it freezes the garbage collector over everything imported before it.

multiprocessing's fork server has no hook but its list of modules to import, so this is
one. Freezing moves the server's objects (torch's, by the million) out of the collector's
reach: the server's exit, which ran the interpreter's last collections over them, kept
the run's output open well after its last line (the output stays open until the server
ends; benchmarks/README.md, "The fork server's exit"). The workers forked from the
server inherit the frozen heap too: their collections skip those objects (a cycle among
them is never freed, as for any module's objects).
"""

import gc

gc.freeze()
