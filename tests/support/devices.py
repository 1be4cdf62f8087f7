"""Support for device-layer tests: sample register images, served profiles, pty pairs.

Everything here is real: a :class:`hil_sim.modbus_server.ModbusServer` on a loopback socket or a
pty, and a real :class:`drivers.modbus.ModbusEndpoint` talking to it.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from drivers.generic import GenericDriver
from drivers.layout import register_words
from drivers.modbus import Framing, ModbusEndpoint, TcpTarget
from drivers.profile import Profile, RegisterSpec
from drivers.profile_loader import shipped_profiles_dir
from drivers.registers import RegisterType
from essd.clock import Clock, RealClock
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage

__all__ = [
    "ServedDevice",
    "close_enough",
    "expected_fields",
    "pty_pair",
    "sample_image",
    "sample_value",
    "serve_profile",
    "shipped_profile_paths",
    "words_of",
]

_TYPE_RANGE = {
    RegisterType.U16: (0, 0xFFFF),
    RegisterType.S16: (-0x8000, 0x7FFF),
    RegisterType.U32: (0, 0xFFFF_FFFF),
    RegisterType.S32: (-0x8000_0000, 0x7FFF_FFFF),
    RegisterType.U64: (0, 2**63),
    RegisterType.S64: (-(2**62), 2**62),
    RegisterType.F32: (-1e6, 1e6),
}


def shipped_profile_paths() -> list[Path]:
    """Every profile file shipped in ``profiles/devices``."""
    return sorted((shipped_profiles_dir() / "devices").glob("*.yaml"))


def sample_value(spec: RegisterSpec, *, fraction: float = 0.37) -> float | str:
    """A valid physical value for ``spec`` (register unit), away from both ends of its range."""
    if spec.rtype is RegisterType.STRING:
        return "ESSD"[: 2 * (spec.count or 1)]
    lo_raw, hi_raw = _TYPE_RANGE[spec.rtype]
    step = abs(spec.scale)
    lo_phys = min(lo_raw * spec.scale, hi_raw * spec.scale) + spec.offset
    hi_phys = max(lo_raw * spec.scale, hi_raw * spec.scale) + spec.offset
    lo = spec.min if spec.min is not None else max(lo_phys, -1e5)
    hi = spec.max if spec.max is not None else min(hi_phys, 1e5)
    value = lo + (hi - lo) * fraction
    if spec.rtype is RegisterType.F32:
        return round(value, 1)
    raw = round((value - spec.offset) / spec.scale)
    return raw * spec.scale + spec.offset if step else value


def sample_image(profile: Profile) -> ProfileImage:
    """The profile laid out, with every register set to a valid sample value."""
    image = ProfileImage(profile)
    sf_names = {r.scale_factor for r in profile.registers if r.scale_factor}
    for spec in profile.registers:
        if spec.name in sf_names:
            image.set_raw(spec.name, 0)
    for spec in profile.registers:
        if spec.name not in sf_names:
            image.set_value(spec.name, sample_value(spec))
    return image


def expected_fields(image: ProfileImage) -> dict[str, float | str | None]:
    """Every field (and derived field) of the image in base units."""
    profile = image.profile
    out: dict[str, float | str | None] = {f: image.get_field(f) for f in profile.fields}
    for name, d in profile.derived.items():
        # An independent evaluation of the forms the shipped profiles use, from the image.
        terms = d.sum or {}
        values = [out[t] for t in terms]
        if d.sum is not None:
            out[name] = (
                sum(float(v) * k for v, k in zip(values, terms.values(), strict=True))  # type: ignore[arg-type]
                if all(isinstance(v, float) for v in values)
                else None
            )
        elif d.magnitude is not None and d.negative_when is not None:
            cond = d.negative_when
            raw = image.get_raw(profile.fields[cond.field])
            size = out[d.magnitude]
            assert isinstance(raw, int)
            assert isinstance(size, float)
            negative = (raw >> cond.bit) & 1 if cond.bit is not None else raw == cond.equals
            out[name] = -abs(size) if negative else abs(size)
        elif d.product is not None:
            factors = [out[t] for t in d.product]
            out[name] = (
                math.prod(float(v) for v in factors) * d.scale  # type: ignore[arg-type]
                if all(isinstance(v, float) for v in factors)
                else None
            )
        else:
            raise AssertionError(f"{profile.name}: derived.{name}: form not covered here")
    for key, attr in (("soc", "soc"), ("power_w", "power_w")):
        if profile.batteries and key not in out:
            parts = [(s.capacity_wh, out[getattr(s, attr)]) for s in profile.batteries]
            total = sum(c for c, _ in parts)
            if not all(isinstance(v, float) for _, v in parts):
                out[key] = None
            elif key == "soc":  # capacity-weighted mean
                out[key] = sum(c * float(v) for c, v in parts) / total  # type: ignore[arg-type]
            else:  # sum
                out[key] = sum(float(v) for _, v in parts)  # type: ignore[arg-type]
    return out


@dataclass
class ServedDevice:
    """A profile served over a real socket, and a driver reading it."""

    profile: Profile
    image: ProfileImage
    server: ModbusServer
    endpoint: ModbusEndpoint
    driver: GenericDriver


@contextlib.asynccontextmanager
async def serve_profile(
    profile: Profile,
    *,
    image: ProfileImage | None = None,
    clock: Clock | None = None,
    timeout_s: float = 0.5,
    device_id: str = "dut",
    framing: Framing | None = None,
) -> AsyncIterator[ServedDevice]:
    """Serve ``profile`` on a loopback port and connect a GenericDriver to it."""
    image = image if image is not None else sample_image(profile)
    if framing is None:
        framing = Framing.RTU if profile.transport.framing == "rtu" else Framing.SOCKET
    unit = profile.transport.unit
    clock = clock or RealClock()
    async with ModbusServer.tcp({unit: image}, framing=framing) as server:
        endpoint = ModbusEndpoint(
            TcpTarget("127.0.0.1", server.port, framing), clock=clock, timeout_s=timeout_s
        )
        driver = GenericDriver(device_id=device_id, profile=profile, endpoint=endpoint, clock=clock)
        try:
            yield ServedDevice(profile, image, server, endpoint, driver)
        finally:
            await endpoint.close()


_PTY = re.compile(rb"N PTY is (\S+)")


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[str, str]]:
    """Two connected pseudo-terminals made by socat: a real serial path for each end."""
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("socat is not installed (make sysdeps)")
    proc = subprocess.Popen(
        [socat, "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert proc.stderr is not None
        paths: list[str] = []
        while len(paths) < 2:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("socat exited before creating the pty pair")
            m = _PTY.search(line)
            if m:
                paths.append(m.group(1).decode())
        # socat prints "starting data transfer loop" once both ends are ready
        while b"starting data transfer loop" not in proc.stderr.readline():
            pass
        yield paths[0], paths[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def words_of(image: ProfileImage, name: str) -> list[int]:
    """The raw words of one register of an image."""
    spec = image.spec(name)
    assert spec.address is not None
    return image.get(spec.table, spec.address, register_words(spec))


def close_enough(a: float | str | None, b: float | str | None) -> bool:
    """Equal, or floats within a relative 1e-6."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b
