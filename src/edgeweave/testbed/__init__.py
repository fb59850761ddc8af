"""Emulated edge cluster on one Linux host: namespaces, shaped links, CPU and memory caps."""

from edgeweave.testbed.spec import DeviceSpec, TestbedSpec, load_spec, parse_rate, parse_size, spec_from_dict
from edgeweave.testbed.testbed import Testbed, down, emulation_support, leftovers

__all__ = [
    "DeviceSpec",
    "Testbed",
    "TestbedSpec",
    "down",
    "emulation_support",
    "leftovers",
    "load_spec",
    "parse_rate",
    "parse_size",
    "spec_from_dict",
]
