#!/bin/bash
# Generate seed corpora for the ckptfs fuzz targets from small QEMU-made images.
# Usage: contrib/fuzz/seed.sh   (needs qemu-img and qemu-io; writes contrib/fuzz/corpus/)
# Seeds are generated, not committed (.gitignore lists contrib/fuzz/corpus).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
corpus="$here/corpus"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

q() { qemu-img "$@" >/dev/null; }
io() { qemu-io "$@" >/dev/null; }

# Images: keep them small (a few hundred KiB at most) so the fuzzer can mutate them.
q create -f qcow2 -o cluster_size=4k plain.qcow2 1M
io -c 'write -P 0x11 0 8k' -c 'write -z 64k 4k' -c 'write -P 0x12 300k 4k' plain.qcow2

head -c 64k /dev/zero | tr '\0' 'x' > pattern.raw
q convert -c -O qcow2 -o cluster_size=4k pattern.raw zlib.qcow2
q convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd pattern.raw zstd.qcow2

q create -f qcow2 -o extended_l2=on,cluster_size=16k extl2.qcow2 1M
io -c 'write -P 0x44 4k 8k' -c 'write -z 32k 4k' extl2.qcow2

q create -f qcow2 -o cluster_size=4k bitmaps.qcow2 1M
q bitmap --add bitmaps.qcow2 c1
io -c 'write -P 1 0 4k' bitmaps.qcow2
q bitmap --add -g 8k bitmaps.qcow2 'c2^c1'
io -c 'write -P 2 512k 4k' bitmaps.qcow2
q bitmap --disable bitmaps.qcow2 c1

q create -f qcow2 -o cluster_size=4k snapshot.qcow2 1M
io -c 'write -P 3 0 8k' snapshot.qcow2
q snapshot -c s1 snapshot.qcow2
io -c 'write -P 4 4k 8k' snapshot.qcow2

q create -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 1M
io -c 'write -P 0x55 0 4k' v2.qcow2

q create -f qcow2 -o cluster_size=512 tiny.qcow2 64k
io -c 'write -P 6 1k 1k' tiny.qcow2

mkdir -p "$corpus"/image "$corpus"/tree "$corpus"/refcount "$corpus"/mount "$corpus"/header "$corpus"/bitmap_directory \
    "$corpus"/bitmap_table_entry "$corpus"/snapshot_table "$corpus"/l2_entry \
    "$corpus"/compressed "$corpus"/libvirt_xml

# Helpers to cut structures out of an image: big-endian integers at byte offsets.
be() { # be FILE OFFSET BYTES -> decimal
    h=$(od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n')
    echo $(( 0x${h:-0} ))
}
cut() { # cut FILE OFFSET LEN > out
    dd if="$1" bs=1 skip="$2" count="$3" status=none
}
u8() { printf "\\$(printf '%03o' "$1")"; }
u32() { for s in 24 16 8 0; do u8 $(( ($1 >> s) & 255 )); done; }

for f in *.qcow2; do
    for t in image tree refcount mount; do cp "$f" "$corpus/$t/$f"; done
    cut "$f" 0 4096 > "$corpus/header/$f"
    cb=$(be "$f" 20 4)
    # L1 -> first L2 table -> a few entries (as l2_entry inputs: bits, flags, entry, [bitmap], off)
    l1=$(be "$f" 40 8)
    l2=$(( $(be "$f" "$l1" 8) & 0x00fffffffffffe00 ))
    if [ "$l2" -ne 0 ]; then
        ext=0
        [ "$f" = extl2.qcow2 ] && ext=1
        for i in 0 1 2 3; do
            es=$(( 8 + 8 * ext ))
            { u8 $((cb - 9)); u8 $ext; cut "$f" $((l2 + i * es)) $es; u32 0; u32 100; } \
                > "$corpus/l2_entry/$f.$i"
        done
    fi
    # Snapshot table
    nbs=$(be "$f" 60 4)
    if [ "$nbs" -ne 0 ]; then
        so=$(be "$f" 64 8)
        { u32 "$nbs"; cut "$f" "$so" 512; } > "$corpus/snapshot_table/$f"
    fi
done

# Bitmap directory and table entries: walk the header extensions of bitmaps.qcow2.
f=bitmaps.qcow2
off=$(be "$f" 100 4)
while :; do
    t=$(be "$f" "$off" 4); len=$(be "$f" $((off + 4)) 4)
    [ "$t" -eq 0 ] && break
    if [ "$t" -eq $((0x23852875)) ]; then
        nb=$(be "$f" $((off + 8)) 4)
        dsize=$(be "$f" $((off + 16)) 8)
        doff=$(be "$f" $((off + 24)) 8)
        { u32 "$nb"; u8 3; u32 0; u32 1048576; cut "$f" "$doff" "$dsize"; } \
            > "$corpus/bitmap_directory/$f"
        # First entry's table, first few entries.
        toff=$(be "$f" "$doff" 8)
        for i in 0 1 2; do
            { cut "$f" $((toff + 8 * i)) 8; u8 3; } > "$corpus/bitmap_table_entry/$f.$i"
        done
    fi
    off=$(( off + 8 + (len + 7) / 8 * 8 ))
done
printf '\000\000\000\000\000\000\000\001\003' > "$corpus/bitmap_table_entry/ones"

# Compressed clusters: the first compressed L2 entry's span (type byte, cluster bits, bytes).
for f in zlib.qcow2 zstd.qcow2; do
    l1=$(be "$f" 40 8)
    l2=$(( $(be "$f" "$l1" 8) & 0x00fffffffffffe00 ))
    e=$(be "$f" "$l2" 8)
    shift=$(( 62 - (12 - 8) ))
    host=$(( e & ((1 << shift) - 1) ))
    nsect=$(( ((e >> shift) & 15) + 1 ))
    ty=0; [ "$f" = zstd.qcow2 ] && ty=1
    { u8 $ty; u8 3; cut "$f" "$host" $((nsect * 512 - (host & 511))); } > "$corpus/compressed/$f"
done

cat > "$corpus/libvirt_xml/c2.xml" <<'XML'
<domaincheckpoint>
  <name>c2</name>
  <parent><name>c1</name></parent>
  <creationTime>1763000000</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c2'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
  <domain type='kvm'><name>vm1</name></domain>
</domaincheckpoint>
XML

for d in "$corpus"/*; do
    printf '%s: %s seeds\n' "$(basename "$d")" "$(ls "$d" | wc -l)"
done
