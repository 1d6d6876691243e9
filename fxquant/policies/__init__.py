"""Precision policies: ``static``, ``cpt`` (cyclic precision training), ``adapt`` (AdaPT).

:func:`make_policy` builds one by name from CLI-style options; ``docs/policies.md`` documents
each policy's choices where the papers are ambiguous.
"""

from __future__ import annotations

from typing import Any

from fxquant.errors import UsageError
from fxquant.policies.base import Policy
from fxquant.policies.static import StaticPolicy

POLICIES: dict[str, str] = {
    "static": "fxquant.policies.static:StaticPolicy",
    "cpt": "fxquant.policies.cpt:CPTPolicy",
    "adapt": "fxquant.policies.adapt:AdaPTPolicy",
}


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise UsageError(f"unknown policy {name!r}", f"choose one of {', '.join(POLICIES)}")
    import importlib

    module, cls = POLICIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_policy(name: str, **options: Any) -> Policy:
    """``options`` are the policy's constructor keywords (None values are dropped)."""
    return policy_class(name)(**{k: v for k, v in options.items() if v is not None})


__all__ = ["Policy", "StaticPolicy", "make_policy", "policy_class", "POLICIES"]
