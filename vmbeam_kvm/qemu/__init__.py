"""QEMU control: launching and re-attaching to QEMU processes and building their command lines."""

from .machine import GuestImage, MachineSpec, build_argv
from .process import ProcessRef, QemuProcess

__all__ = ["GuestImage", "MachineSpec", "ProcessRef", "QemuProcess", "build_argv"]
