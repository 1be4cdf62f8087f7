"""Test support code, one module per area."""
