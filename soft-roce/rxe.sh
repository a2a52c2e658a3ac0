#!/usr/bin/env bash
# Soft-RoCE (rdma_rxe) on a host whose kernel has it.
#   rxe.sh up NETDEV [NAME]   load rdma_rxe, add RDMA device NAME (default rxe0) on NETDEV
#   rxe.sh down [NAME]        remove it
#   rxe.sh status             list RDMA links
# Needs root, iproute2's `rdma` tool, and a kernel with CONFIG_RDMA_RXE (Debian's has it; the
# build machines' host kernel has no RDMA stack at all: use run-in-vm.sh there).
set -euo pipefail

die() { echo "rxe.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root"
command -v rdma >/dev/null || die "the 'rdma' tool is missing: apt-get install iproute2"

case "${1:-}" in
up)
    dev=${2:?usage: rxe.sh up NETDEV [NAME]}
    name=${3:-rxe0}
    ip link show "$dev" >/dev/null 2>&1 || die "no network device '$dev'"
    modprobe rdma_rxe 2>/dev/null || die "cannot load rdma_rxe: this kernel has no Soft-RoCE (CONFIG_RDMA_RXE) or no module loading"
    ip link set "$dev" up
    if ! ip -o addr show dev "$dev" | grep -q ' inet '; then
        echo "rxe.sh: warning: $dev has no IPv4 address; rdma_cm needs one (ip addr add A.B.C.D/N dev $dev)" >&2
    fi
    if rdma link show "$name/1" >/dev/null 2>&1; then
        echo "rxe.sh: $name exists already"
    else
        rdma link add "$name" type rxe netdev "$dev"
    fi
    for _ in $(seq 50); do
        state=$(cat "/sys/class/infiniband/$name/ports/1/state" 2>/dev/null || true)
        case "$state" in *ACTIVE*) break ;; esac
        sleep 0.1
    done
    case "${state:-}" in *ACTIVE*) ;; *) die "$name port 1 is '${state:-missing}', not ACTIVE (is $dev up?)" ;; esac
    rdma link show "$name/1"
    ;;
down)
    name=${2:-rxe0}
    rdma link delete "$name" 2>/dev/null || die "no RDMA link '$name'"
    echo "rxe.sh: $name removed"
    ;;
status)
    rdma link show || true
    ;;
*)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
