"""The application built on the library: the ``knnfast`` command (``cli``), the kNN-MT demo
(``demo``), the gettext corpus readers it trains on (``corpus``) and plots (``plots``).

The library (everything outside ``knnfast.app``) never imports this package; the
application imports only the library's public names.
"""
