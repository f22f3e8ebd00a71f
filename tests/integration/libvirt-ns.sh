#!/bin/bash
# libvirt-ns.sh STATE: run a private libvirtd for the libvirt tests. Run it under
# `unshare --mount --propagation private`: it binds private directories (under STATE) over
# libvirt's own, writes a qemu.conf that needs no systemd, cgroups, virtlogd or security
# driver, starts libvirtd, touches STATE/ready once `virsh version` answers, and lives as long
# as libvirtd (the test stops it by the PID in STATE/libvirtd.pid; the namespace then goes,
# taking every mount made in it). Errors go to STATE/error.
set -euo pipefail
S=$1
fail() {
    printf '%s\n' "$*" >"$S/error"
    exit 1
}
command -v libvirtd >/dev/null || [ -x /usr/sbin/libvirtd ] || fail "libvirtd is not installed"
command -v virsh >/dev/null || fail "virsh is not installed"
PATH=$PATH:/usr/sbin
for d in etc lib run log cache; do
    mkdir -p "$S/$d"
done
[ -d /etc/libvirt ] && cp -a /etc/libvirt/. "$S/etc/"
for pair in etc:/etc/libvirt lib:/var/lib/libvirt run:/run/libvirt log:/var/log/libvirt \
    cache:/var/cache/libvirt; do
    mkdir -p "${pair#*:}"
    mount --bind "$S/${pair%%:*}" "${pair#*:}" || fail "cannot bind $S/${pair%%:*} on ${pair#*:}"
done
cat >/etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
EOF
libvirtd -p "$S/libvirtd.pid" </dev/null >"$S/libvirtd.log" 2>&1 &
pid=$!
for ((i = 0; i < 300; i++)); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        touch "$S/ready"
        wait "$pid" || true
        exit 0
    fi
    kill -0 "$pid" 2>/dev/null || fail "libvirtd exited: $(tail -n 3 "$S/libvirtd.log" | tr '\n' ' ')"
    sleep 0.1
done
kill "$pid"
fail "libvirtd did not answer within 30 s: $(tail -n 3 "$S/libvirtd.log" | tr '\n' ' ')"
