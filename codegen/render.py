"""Render Jinja templates from codegen/templates into Python/Triton source.

Templates are strict: an undefined variable is an error, never an empty string.
"""
from __future__ import annotations

from functools import lru_cache

import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("codegen", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **params) -> str:
    """Render `codegen/templates/<template>` with `params`."""
    return environment().get_template(template).render(**params)
