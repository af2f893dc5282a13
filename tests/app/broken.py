"""A listener module that fails at import, for the supervisor tests."""

raise ImportError("this module is broken on purpose")
