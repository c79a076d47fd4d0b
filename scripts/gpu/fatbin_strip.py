#!/usr/bin/env python3
"""fatbin_strip.py IN OUT [--keep 90[,..]] [--list]
Zeroes the payload of every CUDA fatbin entry (cubin/PTX) in IN's .nv_fatbin section whose SM arch is not kept,
leaving all headers and sizes as they are, so the file layout is unchanged and the CUDA driver still finds the
kept architecture's cubins. The zeroed bytes then compress to almost nothing (libonnxruntime_providers_cuda.so
from onnxruntime-gpu 1.31.1 carries sm_75/80/86/89/90/120 cubins; an H100/H200 only needs sm_90).
With --list, only prints the per-architecture table."""
import collections, struct, sys

def section(data, name):
    # minimal ELF64 section lookup
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    def sh(i):
        return struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize)
    stroff = sh(shstrndx)[4]
    for i in range(shnum):
        s = sh(i)
        n = data[stroff + s[0]:data.index(b'\0', stroff + s[0])].decode()
        if n == name:
            return s[4], s[5]
    raise SystemExit(f'no {name} section')

def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    keep = {90}
    if '--keep' in sys.argv:
        keep = {int(k) for k in sys.argv[sys.argv.index('--keep') + 1].split(',')}
        args = [a for a in args if a != sys.argv[sys.argv.index('--keep') + 1]]
    listing = '--list' in sys.argv
    data = bytearray(open(args[0], 'rb').read())
    off, size = section(data, '.nv_fatbin')
    pos, end = off, off + size
    kept = collections.Counter(); zeroed = collections.Counter()
    while pos < end:
        magic, ver, hsz, fsz = struct.unpack_from('<IHHQ', data, pos)
        if magic != 0xBA55ED50:
            pos += 8
            continue
        e, fend = pos + hsz, pos + hsz + fsz
        while e < fend:
            kind, _, ehsz, psize = struct.unpack_from('<HHIQ', data, e)
            arch, = struct.unpack_from('<I', data, e + 28)
            key = ('ptx' if kind == 1 else 'cubin' if kind == 2 else f'kind{kind}', arch)
            if arch in keep:
                kept[key] += psize
            else:
                zeroed[key] += psize
                if not listing:
                    data[e + ehsz:e + ehsz + psize] = bytes(psize)
            e += ehsz + psize
        pos = fend
    for k in sorted(set(kept) | set(zeroed)):
        print(f'{k[0]:6} sm_{k[1]:<4} {"kept  " if k in kept else "zeroed"} {kept[k] + zeroed[k]:>11} bytes')
    if not listing:
        open(args[1], 'wb').write(data)
        print(f'kept {sum(kept.values())} bytes, zeroed {sum(zeroed.values())} bytes -> {args[1]}')

main()
