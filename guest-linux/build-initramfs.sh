#!/usr/bin/env bash
# Builds an initramfs (newc cpio, gzip) for booting a stock Linux kernel (Debian's
# /boot/vmlinuz-*) as an rmc guest, from what is installed here: nothing is downloaded.
#
#   guest-linux/build-initramfs.sh [--service NAME | --run 'COMMAND'] [--modules LIST]
#                                  [--kernel-version V] [--busybox PATH] -o OUT.cpio.gz
#
#   --service NAME        what runs after boot (default seq):
#                           seq    prints "seq N" (N = 1, 2, ...) every 50 ms on the console; the
#                                  count lives in guest memory, so it carries on across a
#                                  checkpoint and restore of the whole VM
#                           shell  nothing: straight to the interactive shell
#   --run 'COMMAND'       run COMMAND (a busybox sh command line) as the service instead
#   --modules LIST        kernel modules to copy and load at boot (comma- or space-separated
#                         names as modinfo knows them, '-' or '_'); their dependencies are
#                         resolved from modules.dep and copied too; built-in ones are skipped
#   --kernel-version V    whose modules (/lib/modules/V; default: the newest there)
#   --busybox PATH        a statically linked busybox (default /bin/busybox, from busybox-static)
#   -o OUT.cpio.gz        the image to write
#
# The image holds /bin/busybox and its applet links, /init (guest-linux/init), /etc/rmc/service
# (the service script), /etc/rmc/modules and /lib/modules/V/{modules.dep,modules.builtin,...}.
# /init prints "rmc-guest: init up", runs the service, then a shell on the console (prompt
# "rmc-guest# "), then powers off. Boot with the kernel command line: console=ttyS0
# Needs (Debian): busybox-static cpio gzip (and xz-utils/zstd only for compressed modules).
# Mtimes are fixed (SOURCE_DATE_EPOCH, default 0), so the same inputs give the same bytes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "build-initramfs.sh: $*" >&2; exit 1; }

service=seq
run_cmd=""
have_run=0
modules_arg=""
kver=""
busybox=/bin/busybox
out=""
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --service) [ $# -ge 2 ] || die "--service needs a NAME"; service=$2; shift 2 ;;
    --run) [ $# -ge 2 ] || die "--run needs a COMMAND"; run_cmd=$2; have_run=1; shift 2 ;;
    --modules) [ $# -ge 2 ] || die "--modules needs a LIST"; modules_arg="$modules_arg $2"; shift 2 ;;
    --kernel-version) [ $# -ge 2 ] || die "--kernel-version needs a version"; kver=$2; shift 2 ;;
    --busybox) [ $# -ge 2 ] || die "--busybox needs a PATH"; busybox=$2; shift 2 ;;
    -o | --output) [ $# -ge 2 ] || die "-o needs a file name"; out=$2; shift 2 ;;
    *) echo "build-initramfs.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "build-initramfs.sh: -o OUT.cpio.gz is required" >&2; usage >&2; exit 2; }
if [ "$have_run" = 1 ]; then
    [ -n "$run_cmd" ] || die "--run needs a non-empty COMMAND"
    service=run
else
    case "$service" in
    seq | shell) ;;
    *) die "unknown service '$service' (seq, shell; or --run 'COMMAND')" ;;
    esac
fi
for tool in cpio gzip; do
    command -v "$tool" >/dev/null || die "'$tool' is missing: apt-get install $tool"
done

# busybox: must be the static one (the image has no C library).
[ -x "$busybox" ] || die "$busybox not found: apt-get install busybox-static"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked: apt-get install busybox-static (it replaces package busybox)"
fi
applets=$("$busybox" --list-full) || die "$busybox --list-full failed"

# Modules: names -> the closure over modules.dep, in load order.
read -r -a modules <<<"${modules_arg//,/ }"
if [ ${#modules[@]} -gt 0 ] || [ -n "$kver" ]; then
    if [ -z "$kver" ]; then
        kver=$(ls -1 /lib/modules 2>/dev/null | sort -V | tail -n 1)
        [ -n "$kver" ] || die "no kernel modules in /lib/modules: apt-get install linux-image-amd64 (or give --kernel-version)"
    fi
    moddir=/lib/modules/$kver
    [ -f "$moddir/modules.dep" ] ||
        die "$moddir/modules.dep not found: the modules of kernel $kver are not installed (apt-get install linux-image-$kver)"
fi
declare -A path_of=() deps_of=() builtin=() wanted=()
order=()   # module paths (relative to $moddir) in load order
if [ ${#modules[@]} -gt 0 ]; then
    keyof() { k=${1##*/}; k=${k%%.ko*}; k=${k//-/_}; } # sets k (no subshell: modules.dep is long)
    while IFS= read -r line; do
        m=${line%%:*}
        keyof "$m"
        path_of[$k]=$m
        deps_of[$m]=${line#*:}
    done <"$moddir/modules.dep"
    if [ -f "$moddir/modules.builtin" ]; then
        while IFS= read -r m; do keyof "$m"; builtin[$k]=1; done <"$moddir/modules.builtin"
    fi
    declare -A seen=()
    visit() { # $1: module path; dependencies first
        local m=$1 d
        [ -z "${seen[$m]:-}" ] || return 0
        seen[$m]=1
        for d in ${deps_of[$m]:-}; do
            [ -n "${deps_of[$d]+x}" ] || die "modules.dep: $m needs $d, which has no entry"
            visit "$d"
        done
        order+=("$m")
    }
    load=()
    for name in "${modules[@]}"; do
        keyof "$name"
        if [ -n "${path_of[$k]:-}" ]; then
            visit "${path_of[$k]}"
            load+=("$k")
        elif [ -n "${builtin[$k]:-}" ]; then
            echo "build-initramfs.sh: $name is built into kernel $kver: nothing to copy" >&2
        else
            die "module '$name' not found in $moddir/modules.dep (nor built in)"
        fi
    done
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/rmc-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc/rmc,lib/modules}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"

cp "$busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
while IFS= read -r a; do
    case "$a" in
    */busybox | linuxrc | "") continue ;;
    esac
    [ -e "$root/$a" ] || ln -s /bin/busybox "$root/$a"
done <<<"$applets"

install -m 755 "$here/init" "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf '%s\n' "$service" >"$root/etc/rmc/service-name"
case "$service" in
seq)
    cat >"$root/etc/rmc/service" <<'SEQ'
# seq: prints "seq N" (N = 1, 2, ...) on the console every 50 ms. The count is a shell variable
# in guest memory, so it continues across a checkpoint and restore of the whole VM. The pause is
# busybox sh's builtin `read -t 0.05` on a FIFO that nobody writes (no fork per line); `usleep`
# would fork a child per line.
n=0
mkfifo /tmp/.rmc-tick 2>/dev/null
if [ -p /tmp/.rmc-tick ]; then
    exec 3<>/tmp/.rmc-tick
    pause() { read -t 0.05 _ <&3; }
else
    pause() { usleep 50000; }
fi
while :; do
    n=$((n + 1))
    echo "seq $n"
    pause
done
SEQ
    ;;
shell) : >"$root/etc/rmc/service" ;;
run) printf '%s\n' "$run_cmd" >"$root/etc/rmc/service" ;;
esac

: >"$root/etc/rmc/modules"
if [ ${#order[@]} -gt 0 ]; then
    dst=$root/lib/modules/$kver
    mkdir -p "$dst"
    declare -A newpath=()
    for m in "${order[@]}"; do
        src=$moddir/$m
        rel=${m%%.ko*}.ko
        mkdir -p "$dst/$(dirname "$rel")"
        # Compressed modules are stored uncompressed: busybox modprobe and the kernel
        # (CONFIG_MODULE_DECOMPRESS is off in Debian 6.1) then need no decompressor.
        case "$m" in
        *.ko) cp "$src" "$dst/$rel" ;;
        *.ko.xz) command -v xz >/dev/null || die "$m is xz-compressed: apt-get install xz-utils"
            xz -dc "$src" >"$dst/$rel" ;;
        *.ko.zst) command -v zstd >/dev/null || die "$m is zstd-compressed: apt-get install zstd"
            zstd -qdc "$src" >"$dst/$rel" ;;
        *.ko.gz) gzip -dc "$src" >"$dst/$rel" ;;
        *) die "$m: unknown module file type" ;;
        esac
        newpath[$m]=$rel
    done
    # modules.dep for the copied modules only (same order as the original), with the new names.
    while IFS= read -r line; do
        m=${line%%:*}
        [ -n "${newpath[$m]:-}" ] || continue
        deps=""
        for d in ${deps_of[$m]}; do deps="$deps ${newpath[$d]}"; done
        printf '%s:%s\n' "${newpath[$m]}" "$deps"
    done <"$moddir/modules.dep" >"$dst/modules.dep"
    for f in modules.builtin modules.builtin.modinfo; do
        [ -f "$moddir/$f" ] && cp "$moddir/$f" "$dst/$f"
    done
    printf '%s\n' "${load[@]}" >"$root/etc/rmc/modules"
fi

# /dev/console, so the kernel can give /init its stdio before devtmpfs is mounted (needs root;
# without it /init reopens /dev/console from devtmpfs).
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
else
    echo "build-initramfs.sh: not root: no /dev/console node in the image (/init copes)" >&2
fi

epoch=${SOURCE_DATE_EPOCH:-0}
find "$root" -exec touch -h -d "@$epoch" {} +
mkdir -p "$(dirname "$out")"
(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$out.tmp.$$"
mv "$out.tmp.$$" "$out"

summary="service $service"
[ ${#order[@]} -gt 0 ] && summary="$summary, ${#order[@]} module file(s) of $kver (load: ${load[*]})"
echo "build-initramfs.sh: wrote $out ($(stat -c %s "$out") bytes; $summary)" >&2
