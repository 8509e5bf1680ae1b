"""CPU kernels of the MoHD ops: torch ops over contiguous weight blocks of the active groups only.

`read.py` (read_cpu, read_multi_cpu), `write.py` (write_cpu, write_add_cpu), `backward.py` (the CPU
kernels of read_backward / write_backward), `layout.py` (reader weights stored column-major at
rewrite time), `plan.py` (which path a call takes), `crossover.py` (the measured many-token table), `masked.py`
(the modules' many-token path where the table says dense: plain ops, masks made once), `native.py`
with `native.c` / `grouped.c` / `routing.c` (the native kernels: decode, many-token groups, many-token
routing, `routing.py`: `mohdify::route_gates`). The ops' op.py
files register them for the CPU device; the reference (naive.py) stays the ground truth in tests.
This package imports nothing eagerly, so that the op modules can import its kernels without a cycle.
See codegen/README.md for the design and the measurements behind it.
"""
