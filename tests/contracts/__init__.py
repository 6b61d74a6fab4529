"""Contract test suites: one class per axis of the library (storage kinds, cache locations,
dataset sources), parametrised over its registry, so that a new entry runs the whole suite."""
