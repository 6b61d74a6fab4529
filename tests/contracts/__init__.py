"""Contract test suites: one class per axis of the library (storage kinds, cache locations,
dataset sources), parametrised over its registry, so that a new entry runs the whole suite.

Modelled on zarr-python's ``zarr.testing.store.StoreTests`` (one suite every store class runs,
with a way to reach the store that bypasses the methods under test); here the entries come from
the registries themselves instead of a subclass per entry.
"""
