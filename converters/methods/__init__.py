"""The compression methods, one file per paper (plus the ``svd`` baseline).

Each module defines a ``Method`` subclass (``converters/method.py``) and exports it as ``METHOD``; everything the
methods share — calibration statistics, whitening, quantization, ratio accounting, the streaming pipeline — lives
one level up in ``converters/``. The registry of CLI names is ``method.METHODS``.
"""
