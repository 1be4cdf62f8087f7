"""What a device's state and alarm registers say, sorted by severity.

A register with ``enum`` or ``bits`` (profile schema 2) is classified value by value: meanings
of severity ``fault`` are the device's alarms (essd stops commanding it), ``warning`` ones are
reported and nothing else, ``info`` ones are normal states. A field named ``alarm*``/``fault*``
whose register has neither map keeps schema 1's rule: non-zero is an alarm.

Every driver calls :func:`sort_states` with the raw values it decoded, keyed by field name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drivers.layout import classify_states, register_words
from drivers.profile_parts import Severity

if TYPE_CHECKING:
    from drivers.profile import Profile


_LEGACY_PREFIXES = ("alarm", "fault")


@dataclass(frozen=True, slots=True)
class DeviceStates:
    """The device's faults (``alarms``) and ``warnings``, each ``field=meaning (0x..)``."""

    alarms: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def sort_states(
    profile: Profile, raws: Mapping[str, int | float | str], *, sunspec: bool = False
) -> DeviceStates:
    """Classify the raw values of the profile's fields (valid ones only) by severity.

    ``sunspec``: raw values of SunSpec points (bitfields up to 32 bits, read as 2 words).
    """
    alarms: list[str] = []
    warnings: list[str] = []
    for field, raw in raws.items():
        reg = profile.fields.get(field)
        if reg is None or not isinstance(raw, int):
            continue
        spec = profile.register(reg)
        words = 2 if spec.point is not None else register_words(spec)
        if spec.enum is None and spec.bits is None:
            if field.startswith(_LEGACY_PREFIXES) and raw and not sunspec:
                alarms.append(f"{field}=0x{raw % (1 << (16 * words)):X}")
            continue
        for finding in classify_states(spec, raw, words):
            text = f"{field}={finding.name} (0x{finding.raw:X})"
            if finding.severity is Severity.FAULT:
                alarms.append(text)
            elif finding.severity is Severity.WARNING:
                warnings.append(text)
    return DeviceStates(tuple(alarms), tuple(warnings))
