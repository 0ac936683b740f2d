"""Imported last by the stages' fork server (``forkserver.FREEZE``), after the libraries its workers need.

It moves every object made so far into the garbage collector's permanent generation
(``gc.freeze``), so that the workers' collections never write to those objects' pages and they stay
shared with the server instead of being copied into every worker.
"""

import gc

gc.freeze()
