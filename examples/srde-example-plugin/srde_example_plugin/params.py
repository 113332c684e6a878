"""Argument schemas (free of torch, so `srde list-plugins` and `srde validate` stay cheap)."""

from pydantic import Field

from srde_core.params import Params


class FullParams(Params):
    scale: float = Field(1.0, gt=0, description="multiplies every expert's delta")
