"""Internals of ``python -m logitless verify``: class discovery, tiny configs, the stock-vs-installed comparison,
the worker pool and the report. Only ``logitless.verify`` is public."""
