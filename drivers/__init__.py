"""Modbus device drivers: profile-driven (generic) and SunSpec, behind small capability protocols.

Battery power is in W: > 0 discharges into the site, < 0 charges. Grid power > 0 imports.
"""
