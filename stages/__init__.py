"""The steps behind the ``kd-pipeline`` commands: one ``run(config)`` each, wiring library calls
together.

Imports go one way: ``stages`` uses ``pipeline``; ``pipeline`` never imports ``stages``.
"""
