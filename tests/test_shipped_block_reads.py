"""The shipped profiles read their fields in the blocks their devices answer.

A device that answers a range across registers the profile leaves out (``read_gap_max``) is
read in fewer requests: the Eastron SDM630 and the Victron GX in one, the Huawei hybrid in three.
Each profile says where the range comes from (OpenEMS, Victron, ioBroker.sun2000).
"""

from __future__ import annotations

import pytest

from drivers.generic import plan_reads
from drivers.profile_loader import resolve_profile
from drivers.registers import Table

HOLD, INP = Table.HOLDING, Table.INPUT


@pytest.mark.parametrize(
    ("name", "blocks", "without_gaps"),
    [
        ("eastron-sdm630", [(INP, 0x000C, 64)], 3),
        ("site-meter", [(INP, 0x000C, 64)], 3),
        ("victron-gx-ess", [(HOLD, 12, 26)], 5),
        ("household-ess-setpoint", [(HOLD, 12, 26)], 4),
        ("household-hybrid-forcible", [(HOLD, 32008, 1), (HOLD, 37758, 9), (HOLD, 47075, 8)], 6),
        ("huawei-sun2000-luna2000", None, 11),
    ],
)
def test_a_profile_reads_across_the_registers_its_device_answers(
    name: str, blocks: list[tuple[Table, int, int]] | None, without_gaps: int
) -> None:
    profile = resolve_profile(name)
    specs = [profile.register(r) for r in profile.fields.values()]
    t = profile.transport

    def plan(gap_max: int) -> list[tuple[Table, int, int]]:
        found = plan_reads(
            specs,
            max_registers=t.max_registers_per_read,
            gap_max=gap_max,
            declared=profile.registers,
        )
        # Every field is read, and no block is longer than the device takes.
        assert {s.name for b in found for s in b.registers} == {s.name for s in specs}
        assert all(b.count <= t.max_registers_per_read for b in found)
        return [(b.table, b.address, b.count) for b in found]

    assert len(plan(0)) == without_gaps
    got = plan(t.read_gap_max)
    if blocks is not None:
        assert got == blocks
    else:  # the real Huawei: the battery's two blocks as ioBroker.sun2000 reads them
        assert (HOLD, 37758, 9) in got
        assert (HOLD, 47075, 8) in got
        assert len(got) == 7
