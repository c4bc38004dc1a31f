"""Applications built on pykd, kept out of the library core.

``pykd.apps.demo`` (``pykd demo``), ``pykd.apps.bench`` (``pykd bench``), the real-corpus readers
of ``pykd.apps.datasets`` and the helpers that they and ``examples/`` share
(``pykd.apps.common``). They need the ``demo`` extra (transformers, matplotlib, ...), which the
core does not: ``import pykd`` imports none of these modules, and this package imports none of
them either, so each is loaded only by whoever uses it.
"""
