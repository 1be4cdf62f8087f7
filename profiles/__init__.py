"""Data shipped with essd: device profiles, example sites and HIL scenarios (YAML/TOML/CSV)."""
