"""SunSpec: model definitions, point codec, discovery and a profile-driven driver.

- :mod:`drivers.sunspec.models`: model and point definitions from pysunspec2's JSON files;
- :mod:`drivers.sunspec.codec`: point values, "not implemented" markers, scale factors;
- :mod:`drivers.sunspec.discovery`: the "SunS" marker and the chain of models;
- :mod:`drivers.sunspec.driver`: :class:`SunSpecDriver`.

The simulator's image of a SunSpec device is :mod:`hil_sim.sunspec_image`, laid out from the same
definitions. Battery power is in W: > 0 discharges into the site, < 0 charges.
"""

from drivers.sunspec.codec import decode_point, encode_point
from drivers.sunspec.discovery import SUNS_MARKER, DiscoveredModel, SunSpecMap
from drivers.sunspec.driver import SunSpecDriver
from drivers.sunspec.models import (
    ModelDef,
    PointDef,
    SunSpecDiscoveryError,
    SunSpecError,
    load_model,
)

__all__ = [
    "SUNS_MARKER",
    "DiscoveredModel",
    "ModelDef",
    "PointDef",
    "SunSpecDiscoveryError",
    "SunSpecDriver",
    "SunSpecError",
    "SunSpecMap",
    "decode_point",
    "encode_point",
    "load_model",
]
