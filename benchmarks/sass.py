"""Reading a kernel's SASS (``cuobjdump -sass`` of one function): what ``kernel_report`` and ``csrc_report`` report."""

import collections
import re

WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}  # bytes per lane, by opcode suffix


def bits(op: str) -> int:
    """The access width of a load or store opcode, from its suffixes (none: 32 bits)."""
    parts = op.split(".")
    return next((bits for suffix, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8))
                 if suffix in parts), 32)


def sass_stats(sass: str) -> dict:
    """One kernel's SASS, read: global accesses by width, the main loop (the first loop that loads from global
    memory, or the whole kernel), and what that loop holds."""
    lines, never = [], set()
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass):
        lines.append((int(m.group(1), 16), m.group(3), m.group(4)))
        if (m.group(2) or "").strip() == "@!PT":  # predicated off for good: scheduling filler
            never.add(lines[-1][0])
    mem = [(a, op) for a, op, _ in lines if op.startswith(("LDG", "STG"))]
    wide = sum(1 for _, op in mem if ".128" in op)
    loops = []
    for addr, op, rest in lines:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
    main = next(((lo, hi) for lo, hi in loops if any(lo <= a <= hi and op.startswith("LDG") for a, op in mem)), None)
    if main is None:  # straight-line kernel: everything up to the last EXIT
        exits = [a for a, op, _ in lines if op == "EXIT"]
        main = (lines[0][0], exits[-1] if exits else lines[-1][0])
        kind = "kernel"
    else:
        kind = "loop"
    body = [(a, op) for a, op, _ in lines if main[0] <= a <= main[1]]
    live = collections.Counter(op.split(".")[0] for a, op in body if a not in never)
    # Per iteration (a K step of a convolution): loads narrower than 128 bits (a scalar path), cp.async by width.
    narrow = collections.Counter(bits(op) for a, op in body
                                 if a not in never and op.split(".")[0] == "LDG" and bits(op) < 128)
    ldgsts = collections.Counter(bits(op) for a, op in body if a not in never and op.split(".")[0] == "LDGSTS")
    moved = 0
    for _, op in body:
        if op.startswith(("LDG", "STG")):
            width = next((v for k, v in WIDTH.items() if f".{k}" in op), 4)
            moved += 32 * width
    return {
        # Tensor-core instructions: HGMMA is Hopper's wgmma, HMMA the mma of earlier GPUs.
        "hgmma": sum(1 for _, op, _ in lines if op.startswith("HGMMA")),
        "hmma": sum(1 for _, op, _ in lines if op.startswith("HMMA")),
        "global_accesses": len(mem),
        "ldg128": sum(1 for _, op in mem if op.startswith("LDG") and ".128" in op),
        "stg128": sum(1 for _, op in mem if op.startswith("STG") and ".128" in op),
        "share_128bit": wide / len(mem) if mem else None,
        "main": kind,
        "main_instructions": len(body),
        "main_live_instructions": sum(live.values()),  # without the ones predicated off for good
        "bytes_per_warp_instruction": moved / len(body) if body else 0.0,
        "main_ldg_narrow": {str(b): n for b, n in sorted(narrow.items())},  # bits -> instructions
        "main_ldgsts": {str(b): n for b, n in sorted(ldgsts.items())},
        # Shared-memory loads to registers and stores back in the main loop: a tile staged by cp.async,
        # changed in registers (the BN-ReLU prologue) and stored again for the MMA.
        "main_lds": live["LDS"],
        "main_sts": live["STS"],
    }
