"""Shared set-up of the client tests.

nnsight 0.8.1 changes object's slot wrappers when it is imported, after which a first import of
beartype 0.23 (which sae-bench imports) fails with "TypeError: unhashable type: 'instancemethod'";
beartype imported first is unaffected. Both clients run in this one test process, so beartype is
imported here, before any test module imports nnsight (docs/integrations.md says the same to users)."""

import importlib.util

if importlib.util.find_spec("beartype") is not None:
    import beartype  # noqa: F401 - imported for its side effect on import order, see above
