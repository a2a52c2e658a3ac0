#!/usr/bin/env python3
"""QEMU instead of rmc as the VMM: does a 2-vCPU Linux guest survive dirty logging here?

Run inside the Soft-RoCE VM (nested KVM), from the repository:

    soft-roce/run-in-vm.sh --cpus 2 -- python3 soft-roce/qemu-dirty-log-check.py SECONDS none|migrate [VCPUS]

QEMU boots the newest /boot kernel with target/guest-linux/seq.cpio.gz (guest-linux/README.md),
VCPUS vCPUs (default 2), 256 MiB. `none`: it only runs. `migrate`: QEMU live-migrates it to /dev/null over and
over (`cont` after each), so KVM's dirty log is enabled and read again and again, as rmc's
checkpoints read it. With -no-reboot a guest reset (triple fault) ends QEMU. Prints how long
the guest lived and how many `seq` lines its console has. Shows whether a failure of rmc's
Linux guest in this VM is rmc's or the platform's (docs/DEVELOPING.md, Known limits).
"""
import glob
import os
import socket
import subprocess
import sys
import time

if len(sys.argv) not in (3, 4) or sys.argv[2] not in ('none', 'migrate'):
    sys.exit(__doc__)
k = sorted(glob.glob('/boot/vmlinuz-*'))[-1]
con = 'target/qemu-dirty-log-console'
if os.path.exists(con): os.remove(con)
q = subprocess.Popen(['qemu-system-x86_64', '-enable-kvm', '-cpu', 'host', '-smp', sys.argv[3] if len(sys.argv) == 4 else '2', '-m', '256',
    '-kernel', k, '-initrd', 'target/guest-linux/seq.cpio.gz',
    '-append', 'console=ttyS0 panic=1 reboot=k tsc=reliable no_timer_check',
    '-display', 'none', '-serial', 'file:' + con, '-monitor', 'unix:/tmp/mon,server,nowait',
    '-no-reboot', '-nodefaults'])
for _ in range(600):
    if os.path.exists('/tmp/mon') or q.poll() is not None: break
    time.sleep(0.1)
s = socket.socket(socket.AF_UNIX); s.connect('/tmp/mon'); s.settimeout(5)
def hmp(cmd):
    s.sendall((cmd + '\n').encode()); time.sleep(0.2)
    out = b''
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
            if out.endswith(b'(qemu) '): break
    except socket.timeout: pass
    return out.decode(errors='replace')
hmp('')
hmp('migrate_set_parameter downtime-limit 1')
start = time.time(); n = 0; secs = float(sys.argv[1]); migrate = sys.argv[2] == 'migrate'
while time.time() - start < secs:
    if q.poll() is not None:
        print(f'QEMU ({sys.argv[2]}) exited ({q.returncode}) after {time.time()-start:.1f} s and {n} migrations'); break
    if not migrate:
        time.sleep(1); n += 1; continue
    try:
        hmp('migrate -d "exec:cat > /dev/null"')
    except BrokenPipeError:
        continue
    while True:
        try:
            info = hmp('info migrate')
        except BrokenPipeError:
            break
        if 'Migration status: completed' in info or 'failed' in info or q.poll() is not None: break
        time.sleep(0.05)
    try:
        hmp('cont')
    except BrokenPipeError:
        pass
    n += 1
    if n % 20 == 0: print(f'{time.time()-start:.0f} s: {n} migrations', flush=True)
else:
    print(f'{sys.argv[2]}: {n} rounds in {secs} s, guest alive')
seqs = [l for l in open(con, errors='replace') if l.startswith('seq ')]
print('console seq lines', len(seqs), seqs[-1:] , [l.strip() for l in open(con, errors='replace') if 'triple' in l.lower() or 'panic' in l.lower()][:3])
q.kill()
s.close()
if os.path.exists('/tmp/mon'):
    os.remove('/tmp/mon')
