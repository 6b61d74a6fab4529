"""Experiments on the two stages: sweeps, specialists, paper tables, the bench and demo.

- ``sweep``: a grid of students from one cache, as dask tasks.
- ``specialists``: specialist ensembles on a generalist's cache (paper section 5); a package:
  ``clustering``, ``specialist``, ``combine``, ``steps``.
- ``reproduce``: the paper's experiments, computed as data and rendered to Markdown; a package:
  ``recipes``, ``artefacts``, ``sections``, ``report``.
- ``bench``: the performance figures of the two-stage design, as ratios measured in one run.
- ``demo``: the main job on the shipped Fashion-MNIST.
- ``plots``: the charts the reports use.
"""
