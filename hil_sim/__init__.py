"""hil_sim: simulated devices and sites served over real Modbus, for hardware-in-the-loop tests."""
