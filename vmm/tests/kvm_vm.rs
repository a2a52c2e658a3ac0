//! VM tests that need KVM: snapshot/restore, determinism, dirty tracking, put-back, and a
//! guest that feeds the NIC malformed descriptors.
//!
//! Nothing here is timed: every wait is a hang guard of minutes ([`HANG_GUARD`]), not a speed
//! requirement.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::time::Duration;

use rmc_tests::{init_logs, kvm_available, wait_for};
use rmc_vmm::layout::{self, PAGE_SIZE};
use rmc_vmm::service::{Client, Reply};
use rmc_vmm::{DirtierConfig, Vm, VmConfig, VmState, Workload};
use vm_memory::{Bytes, GuestAddress};

/// How long any wait may last before the test is declared hung. A hang guard for a loaded
/// machine, not a speed requirement.
const HANG_GUARD: Duration = Duration::from_secs(180);

/// Waits for `cond`, failing after [`HANG_GUARD`].
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    wait_for(
        &format!("{what} (a hang guard, not a speed requirement)"),
        HANG_GUARD,
        cond,
    );
}

/// A request (`None`: the next new seq; `Some`: a repeat of that seq) to the guest's counter
/// service; a reply that never comes fails the test after [`HANG_GUARD`] (the client resends
/// meanwhile).
fn ask(c: &mut Client, seq: Option<u64>) -> Reply {
    match seq {
        None => c.request(HANG_GUARD, |_| {}),
        Some(seq) => c.repeat(seq, HANG_GUARD, |_| {}),
    }
    .unwrap_or_else(|e| panic!("{e} (a hang guard, not a speed requirement)"))
    .0
}

fn config(workloads: Vec<Workload>) -> VmConfig {
    VmConfig {
        mem_size: 64 << 20,
        workloads,
        nic_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    }
}

fn restore_from(cfg: &VmConfig, state: &VmState, image: &[(u64, Vec<u8>)]) -> Vm {
    // Through the wire format, as a standby would receive it.
    let state = VmState::decode(&state.encode()).expect("state decodes");
    Vm::restore(cfg, &state, |mem| {
        for (base, bytes) in image {
            mem.write_slice(bytes, GuestAddress(*base))?;
        }
        Ok::<_, vm_memory::GuestMemoryError>(())
    })
    .expect("restore")
}

fn read_range(vm: &Vm, addr: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    vm.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Guest-visible results of the counter and the dirtier: service state, client table, and
/// the dirtier's working set (not the NIC buffers, which hold the client's port).
fn guest_results(vm: &Vm, dirtier_vcpu: usize) -> Vec<u8> {
    let (ws, pages) = vm.dirtier_working_set(dirtier_vcpu);
    let mut v = read_range(vm, layout::COUNTER_STATE_ADDR, 32);
    v.extend(read_range(
        vm,
        layout::CLIENT_TABLE_ADDR,
        layout::CLIENT_TABLE_ENTRIES * 32,
    ));
    v.extend(read_range(vm, ws, pages * PAGE_SIZE));
    v
}

#[test]
fn snapshot_restore_continues_counter_and_dirtier() {
    if !kvm_available("snapshot_restore_continues_counter_and_dirtier") {
        return;
    }
    init_logs();
    let cfg = config(vec![
        Workload::Counter,
        Workload::Dirtier(DirtierConfig {
            pages: 512,
            rate: 20_000,
            limit: 0,
        }),
    ]);
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    let mut client = Client::new(vm.nic_addr().unwrap(), 42).unwrap();
    let mut last = None;
    for _ in 0..25 {
        last = Some(ask(&mut client, None));
    }
    let last = last.unwrap();
    assert_eq!(last.counter, 25);
    eventually("dirtier progress", || vm.dirtier_progress(1) > 1000);

    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    let image = vm.memory_image();
    let progress = vm.dirtier_progress(1);
    assert_eq!(vm.guest_status().counter, 25);
    drop(vm);

    let vm = restore_from(&cfg, &state, &image);
    assert_eq!(vm.dirtier_progress(1), progress);
    vm.resume();
    // A new NIC socket: the client follows it, the guest's state carries on.
    let mut client2 = Client::new(vm.nic_addr().unwrap(), 42).unwrap();
    let again = ask(&mut client2, Some(25));
    assert_eq!(
        again, last,
        "a repeat after restore gets the very same reply"
    );
    let next = ask(&mut client2, Some(26));
    assert_eq!(next.status, rmc_vmm::guest::STATUS_OK);
    assert_eq!(
        next.counter, 26,
        "the counter continues from its saved value"
    );
    eventually("dirtier continues after restore", || {
        vm.dirtier_progress(1) > progress + 500
    });
    assert!(vm.stopped_vcpus().is_empty(), "{:?}", vm.stopped_vcpus());
}

/// A restore takes each part's state through that part's own checks: a saved state that a
/// device could never have produced is refused naming the device, before any VM is built;
/// the state as saved restores.
#[test]
fn restore_refuses_a_device_state_naming_the_device() {
    if !kvm_available("restore_refuses_a_device_state_naming_the_device") {
        return;
    }
    init_logs();
    let cfg = config(vec![Workload::Counter]);
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    let mut client = Client::new(vm.nic_addr().unwrap(), 8).unwrap();
    assert_eq!(ask(&mut client, None).counter, 1);
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    let image = vm.memory_image();
    drop(vm);
    assert_eq!(state.devices.nic.size, layout::NIC_RING_SIZE);

    let mut bad = VmState::decode(&state.encode()).unwrap();
    bad.devices.nic.size = 3;
    let err = Vm::restore(&cfg, &bad, |_| Ok::<_, std::convert::Infallible>(()))
        .expect_err("a NIC ring of 3 entries is refused");
    assert!(
        matches!(
            &err,
            rmc_vmm::VmError::State(rmc_vmm::state::StateError::Invalid { part, .. })
                if part == "device nic"
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("NIC ring of 3 entries"), "{err}");

    // Restored as saved, but for the host address: the NIC's own (a new socket).
    let vm = restore_from(&cfg, &state, &image);
    let mut want = state.devices.clone();
    want.nic.host_addr = vm.nic_addr();
    assert_eq!(vm.save_state().unwrap().devices, want);
    vm.resume();
    let mut client = Client::new(vm.nic_addr().unwrap(), 8).unwrap();
    assert_eq!(ask(&mut client, Some(2)).counter, 2);
}

/// Runs the counter with requests `seqs` and returns the replies.
fn requests(vm: &Vm, client_id: u64, seqs: std::ops::RangeInclusive<u64>) -> Vec<Reply> {
    let mut c = Client::new(vm.nic_addr().unwrap(), client_id).unwrap();
    seqs.map(|s| ask(&mut c, Some(s))).collect()
}

#[test]
fn restored_run_matches_uninterrupted_run() {
    if !kvm_available("restored_run_matches_uninterrupted_run") {
        return;
    }
    init_logs();
    const LIMIT: u64 = 6000;
    let cfg = config(vec![
        Workload::Counter,
        Workload::Dirtier(DirtierConfig {
            pages: 700,
            rate: 0,
            limit: LIMIT,
        }),
    ]);

    // Uninterrupted.
    let a = Vm::new(&cfg).unwrap();
    a.resume();
    let replies_a = requests(&a, 7, 1..=30);
    eventually("dirtier reaches its limit", || {
        a.dirtier_progress(1) == LIMIT
    });
    a.pause().unwrap();
    let results_a = guest_results(&a, 1);
    drop(a);

    // Snapshotted mid-way (dirtier running, counter half done), restored, finished. The
    // snapshot must catch the dirtier before its limit; the dirtier runs flat out, so if this
    // thread is held up (a busy machine) it may finish first: that attempt shows nothing and
    // is made again on a fresh VM (the snapshot taken is always a mid-way one).
    let mut attempt = 0;
    let (mut replies_b, state, image) = loop {
        attempt += 1;
        let b = Vm::new(&cfg).unwrap();
        b.resume();
        let replies = requests(&b, 7, 1..=15);
        eventually("dirtier mid-way", || b.dirtier_progress(1) >= 1000);
        b.pause().unwrap();
        let mid = b.dirtier_progress(1);
        if mid < LIMIT {
            break (replies, b.save_state().unwrap(), b.memory_image());
        }
        assert!(
            attempt < 5,
            "snapshot must be taken while the dirtier still runs: in {attempt} attempts it \
             had always reached its limit of {LIMIT} writes first"
        );
        eprintln!(
            "attempt {attempt}: the dirtier reached its limit before the snapshot (this \
             thread was held up); again on a fresh VM"
        );
    };
    let c = restore_from(&cfg, &state, &image);
    c.resume();
    replies_b.extend(requests(&c, 7, 16..=30));
    eventually("restored dirtier reaches its limit", || {
        c.dirtier_progress(1) == LIMIT
    });
    c.pause().unwrap();
    let results_b = guest_results(&c, 1);

    assert_eq!(replies_a, replies_b, "replies differ between the two runs");
    assert_eq!(replies_a.last().unwrap().counter, 30);
    assert!(
        results_a == results_b,
        "guest memory results differ between the two runs"
    );
}

fn page(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

fn pages_of(start: u64, len: u64) -> impl Iterator<Item = u64> {
    (page(start)..start + len).step_by(PAGE_SIZE as usize)
}

fn page_table_pages() -> BTreeSet<u64> {
    (0..layout::PD_COUNT)
        .map(|i| layout::PD_ADDR + i * PAGE_SIZE)
        .chain([layout::PML4_ADDR, layout::PDPT_ADDR])
        .collect()
}

#[test]
fn dirty_set_is_exactly_guest_writes_union_device_writes() {
    if !kvm_available("dirty_set_is_exactly_guest_writes_union_device_writes") {
        return;
    }
    init_logs();
    const WS_PAGES: u64 = 300;
    let cfg = config(vec![
        Workload::Counter,
        Workload::Dirtier(DirtierConfig {
            pages: WS_PAGES,
            rate: 0,
            limit: WS_PAGES,
        }),
    ]);
    let vm = Vm::new(&cfg).unwrap();
    let code_len = {
        let p = rmc_vmm::guest::GuestProgram::build().unwrap();
        p.code.len() as u64
    };
    vm.resume();
    eventually("both workloads ready, dirtier done", || {
        vm.vcpu_ready(0) && vm.vcpu_ready(1) && vm.dirtier_progress(1) == WS_PAGES
    });
    vm.pause().unwrap();

    // Phase 1: everything since boot. VMM writes (boot tables, code, config) + guest init
    // writes (status records, stacks, NIC rings) + device writes (used indices) + the
    // dirtier's working set, each page once.
    let got: BTreeSet<u64> = vm.harvest_dirty().unwrap().pages().map(|g| g.0).collect();
    let (ws, _) = vm.dirtier_working_set(1);
    let mut want: BTreeSet<u64> = page_table_pages();
    want.insert(layout::GDT_ADDR);
    want.extend(pages_of(layout::CODE_ADDR, code_len));
    want.insert(layout::CONFIG_ADDR);
    want.insert(layout::STATUS_ADDR);
    for i in 0..2 {
        want.insert(layout::STACKS_ADDR + (i + 1) * layout::STACK_SIZE - PAGE_SIZE);
    }
    want.insert(layout::TX_RING_ADDR);
    want.insert(layout::RX_RING_ADDR);
    want.extend(pages_of(ws, WS_PAGES * PAGE_SIZE));
    assert_eq!(got, want, "phase 1 dirty set");

    // Phase 2: three requests. The guest writes its TX buffers, rings, client table and
    // counter state; the device writes RX buffers (the guest never writes those: only
    // vm-memory's bitmap can report them) and the used indices.
    vm.resume();
    let replies = requests(&vm, 99, 1..=3);
    assert_eq!(replies[2].counter, 3);
    vm.pause().unwrap();
    let got: BTreeSet<u64> = vm.harvest_dirty().unwrap().pages().map(|g| g.0).collect();
    let mut want: BTreeSet<u64> = [
        layout::TX_RING_ADDR,
        layout::RX_RING_ADDR,
        layout::COUNTER_STATE_ADDR,
    ]
    .into();
    for i in 0..3u64 {
        want.insert(page(
            layout::TX_BUF_ADDR + i * u64::from(layout::NIC_BUF_SIZE),
        ));
        want.insert(page(
            layout::RX_BUF_ADDR + i * u64::from(layout::NIC_BUF_SIZE),
        ));
    }
    // The client's table entry: find it by scanning the table for client 99.
    let table = read_range(
        &vm,
        layout::CLIENT_TABLE_ADDR,
        layout::CLIENT_TABLE_ENTRIES * 32,
    );
    let slot = table
        .chunks(32)
        .position(|e| u64::from_le_bytes(e[..8].try_into().unwrap()) == 99)
        .expect("client 99 in the table") as u64;
    want.insert(page(layout::CLIENT_TABLE_ADDR + slot * 32));
    // The first touch of the client table's 2 MiB page sets its accessed/dirty bits, which
    // dirties a page-directory page.
    let pts = page_table_pages();
    let got_without_pt: BTreeSet<u64> = got.difference(&pts).copied().collect();
    assert_eq!(
        got_without_pt, want,
        "phase 2 dirty set (page-table pages aside)"
    );
    assert!(
        got.contains(&layout::RX_BUF_ADDR),
        "device (RX) writes are tracked"
    );

    // Phase 3: nothing ran, nothing is dirty.
    assert!(vm.harvest_dirty().unwrap().is_empty());
}

/// Page writes the dirtier of vCPU `i` really did: its progress counter, plus one when the
/// next write already landed. A pause can fall between the dirtier's page store and the
/// progress store that counts it; that page is then dirty in the epoch the pause closes,
/// although the counter does not show it yet. Write `k` stores `(k, 3k)` (two u64) at page
/// `(k - 1) % pages`, offset `((k - 1) / pages * 16) & 0xff0`: a value no other write stores.
fn dirtier_writes_done(vm: &Vm, i: usize) -> u64 {
    let (base, pages) = vm.dirtier_working_set(i);
    let p = vm.dirtier_progress(i);
    let addr = base + (p % pages) * PAGE_SIZE + ((p / pages * 16) & 0xff0);
    let lanes: [u64; 2] = vm.memory().read_obj(GuestAddress(addr)).unwrap();
    if lanes == [p + 1, 3 * (p + 1)] {
        p + 1
    } else {
        p
    }
}

/// Pages of vCPU `i`'s working set written by its dirtier's writes `from + 1 ..= to`.
fn dirtier_pages(vm: &Vm, i: usize, from: u64, to: u64) -> BTreeSet<u64> {
    let (base, pages) = vm.dirtier_working_set(i);
    (from..to)
        .take(pages as usize)
        .map(|k| base + (k % pages) * PAGE_SIZE)
        .collect()
}

/// Names a guest page for assertion messages.
fn describe(vm: &Vm, dirtiers: std::ops::Range<usize>, addr: u64) -> String {
    for i in dirtiers {
        let (base, pages) = vm.dirtier_working_set(i);
        if (base..base + pages * PAGE_SIZE).contains(&addr) {
            return format!(
                "{addr:#x} (vCPU {i} working set page {})",
                (addr - base) / PAGE_SIZE
            );
        }
    }
    let names = [
        (layout::STACKS_ADDR, layout::TX_RING_ADDR, "stacks"),
        (layout::TX_RING_ADDR, layout::TX_BUF_ADDR, "NIC rings"),
        (layout::TX_BUF_ADDR, layout::RX_BUF_ADDR, "TX buffers"),
        (layout::RX_BUF_ADDR, layout::CLIENT_TABLE_ADDR, "RX buffers"),
        (
            layout::CLIENT_TABLE_ADDR,
            layout::WORKSET_ADDR,
            "client table",
        ),
    ];
    match names.iter().find(|(a, b, _)| (*a..*b).contains(&addr)) {
        Some((_, _, what)) => format!("{addr:#x} ({what})"),
        None => format!("{addr:#x}"),
    }
}

/// Four vCPUs write at once: the counter service (vCPU 0) answers two clients, so the NIC
/// writes RX frames into guest memory while three dirtiers (vCPUs 1-3, working sets of
/// different sizes, some wrapping within an epoch) rewrite theirs. Each epoch ends with a pause
/// at a quiescent point of the NIC (every frame delivered to the guest answered and sent), and
/// its harvest must be exactly the pages written in it, derived from the dirtiers' progress
/// counters and working sets and from the NIC's frame counters (which RX/TX buffers were used).
#[test]
fn dirty_set_is_exact_with_four_vcpus_and_the_nic_writing() {
    if !kvm_available("dirty_set_is_exact_with_four_vcpus_and_the_nic_writing") {
        return;
    }
    init_logs();
    const EPOCHS: u64 = 4;
    const NEW_PER_EPOCH: u64 = 5;
    const CLIENTS: [u64; 2] = [11, 12];
    // Dirtiers of vCPUs 1-3: (working-set pages, writes each must make in every epoch, so
    // that they run while the clients do, and the first two wrap around their sets within an
    // epoch while the last does not). The test waits for progress, never for time.
    const DIRTIERS: [(u64, u64); 3] = [(100, 250), (257, 300), (1000, 64)];
    let cfg = config(
        std::iter::once(Workload::Counter)
            .chain(DIRTIERS.iter().map(|&(pages, _)| {
                Workload::Dirtier(DirtierConfig {
                    pages,
                    rate: 10_000,
                    limit: 0,
                })
            }))
            .collect(),
    );
    let dirtiers = 1..4usize;
    let vm = Vm::new(&cfg).unwrap();
    let code_len = rmc_vmm::guest::GuestProgram::build().unwrap().code.len() as u64;
    let server = vm.nic_addr().unwrap();
    let mut clients: Vec<Client> = CLIENTS
        .iter()
        .map(|&id| Client::new(server, id).unwrap())
        .collect();
    let pts = page_table_pages();
    let buf_page = |base: u64, frame: u64| {
        page(base + (frame % u64::from(layout::NIC_RING_SIZE)) * u64::from(layout::NIC_BUF_SIZE))
    };
    let stack_page = |i: u64| layout::STACKS_ADDR + (i + 1) * layout::STACK_SIZE - PAGE_SIZE;

    // Every count starts at 0: the VM has not run.
    let mut done: Vec<u64> = vec![0; cfg.workloads.len()];
    let (mut rx, mut tx) = (0u64, 0u64);
    for epoch in 0..EPOCHS {
        let start: Vec<u64> = (0..cfg.workloads.len())
            .map(|i| vm.dirtier_progress(i))
            .collect();
        vm.resume();
        if epoch == 0 {
            eventually("every vCPU's workload ready", || {
                (0..4).all(|i| vm.vcpu_ready(i))
            });
        }
        std::thread::scope(|s| {
            for c in &mut clients {
                s.spawn(move || {
                    let mut last = None;
                    for _ in 0..NEW_PER_EPOCH {
                        last = Some(ask(c, None));
                    }
                    let last = last.unwrap();
                    assert_eq!(ask(c, Some(last.seq)), last, "a repeat gets the same reply");
                });
            }
            eventually("every dirtier wrote while the clients ran", || {
                dirtiers
                    .clone()
                    .all(|i| vm.dirtier_progress(i) >= start[i] + DIRTIERS[i - 1].1)
            });
        });
        // Quiescent NIC: every frame delivered to the guest was answered and sent (a late
        // resend may still arrive; it is then delivered in a later epoch, and counted there).
        eventually("a pause with every delivered frame answered", || {
            vm.pause().unwrap();
            let s = vm.nic_stats();
            if s.rx_frames == s.tx_frames {
                return true;
            }
            vm.resume();
            false
        });
        let got: BTreeSet<u64> = vm.harvest_dirty().unwrap().pages().map(|g| g.0).collect();
        let stats = vm.nic_stats();
        assert_eq!((stats.rx_dropped, stats.tx_refused), (0, 0));
        assert!(vm.stopped_vcpus().is_empty(), "{:?}", vm.stopped_vcpus());

        let mut want = BTreeSet::new();
        if epoch == 0 {
            // VMM writes at boot and each workload's initialisation: the NIC's rings (the
            // device zeroes the used indices, the guest posts its RX buffers), the status
            // records (READY), and each vCPU's stack (the console print's call).
            want.extend(&pts);
            want.insert(layout::GDT_ADDR);
            want.extend(pages_of(layout::CODE_ADDR, code_len));
            want.insert(layout::CONFIG_ADDR);
            want.insert(layout::STATUS_ADDR);
            want.extend([layout::TX_RING_ADDR, layout::RX_RING_ADDR]);
            want.insert(stack_page(0));
        }
        // The dirtiers: their working-set pages, their stacks (each write goes through the
        // stack) and progress counters (the status page).
        let mut writes = Vec::new();
        for i in dirtiers.clone() {
            let now = dirtier_writes_done(&vm, i);
            writes.push(now - done[i]);
            want.extend(dirtier_pages(&vm, i, done[i], now));
            want.insert(stack_page(i as u64));
            done[i] = now;
        }
        want.insert(layout::STATUS_ADDR);
        // The NIC and the counter service: the RX buffer of every frame delivered (written by
        // the device only: vm-memory's bitmap reports them), the TX buffer of every reply (the
        // guest), both rings (descriptors, used indices), the counter state and each client's
        // table entry (every client sent a new seq this epoch).
        want.extend((rx..stats.rx_frames).map(|f| buf_page(layout::RX_BUF_ADDR, f)));
        want.extend((tx..stats.tx_frames).map(|f| buf_page(layout::TX_BUF_ADDR, f)));
        want.extend([
            layout::TX_RING_ADDR,
            layout::RX_RING_ADDR,
            layout::COUNTER_STATE_ADDR,
        ]);
        let table = read_range(
            &vm,
            layout::CLIENT_TABLE_ADDR,
            layout::CLIENT_TABLE_ENTRIES * 32,
        );
        for id in CLIENTS {
            let slot = table
                .chunks(32)
                .position(|e| u64::from_le_bytes(e[..8].try_into().unwrap()) == id)
                .unwrap_or_else(|| panic!("client {id} in the table"))
                as u64;
            want.insert(page(layout::CLIENT_TABLE_ADDR + slot * 32));
        }
        (rx, tx) = (stats.rx_frames, stats.tx_frames);

        // After the first epoch a page-table page may be dirty or not: the first touch of a
        // 2 MiB page sets its accessed/dirty bits in a page directory.
        let got_cmp: BTreeSet<u64> = if epoch == 0 {
            got.clone()
        } else {
            got.difference(&pts).copied().collect()
        };
        let missed: Vec<String> = want
            .difference(&got_cmp)
            .map(|&a| describe(&vm, dirtiers.clone(), a))
            .collect();
        let unexpected: Vec<String> = got_cmp
            .difference(&want)
            .map(|&a| describe(&vm, dirtiers.clone(), a))
            .collect();
        assert!(
            missed.is_empty() && unexpected.is_empty(),
            "epoch {epoch} (dirtier writes {writes:?}, frames rx {rx} tx {tx}): the harvest \
             missed {missed:?} and had unexpected {unexpected:?}"
        );
        eprintln!(
            "epoch {epoch}: {} pages exactly as written (dirtier writes {writes:?}, frames {rx})",
            got.len()
        );
    }
    assert_eq!(
        vm.guest_status().counter,
        EPOCHS * NEW_PER_EPOCH * CLIENTS.len() as u64
    );
    // Nothing ran since the last harvest: nothing is dirty.
    assert!(vm.harvest_dirty().unwrap().is_empty());
}

#[test]
fn put_back_loses_no_page() {
    if !kvm_available("put_back_loses_no_page") {
        return;
    }
    init_logs();
    let cfg = config(vec![
        Workload::Counter,
        Workload::Dirtier(DirtierConfig {
            pages: 256,
            rate: 0,
            limit: 0,
        }),
    ]);
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    eventually("dirtier running", || vm.dirtier_progress(1) > 300);
    vm.pause().unwrap();
    vm.harvest_dirty().unwrap();
    // A full round over the working set after the harvest (counted from where the dirtier
    // was then, however late this thread paused it).
    let p1 = vm.dirtier_progress(1);
    vm.resume();
    eventually("a full round of writes", || {
        vm.dirtier_progress(1) >= p1 + 256
    });
    vm.pause().unwrap();
    let first = vm.harvest_dirty().unwrap();
    assert!(
        first.len() >= 256,
        "the whole working set was rewritten: {}",
        first.len()
    );
    // The epoch that harvested `first` failed: hand it back.
    vm.put_back_dirty(first.clone());
    vm.resume();
    requests(&vm, 5, 1..=2);
    vm.pause().unwrap();
    let second = vm.harvest_dirty().unwrap();
    for p in first.pages() {
        assert!(second.contains(p.0), "page {:#x} lost after put-back", p.0);
    }
    assert!(
        second.contains(layout::RX_BUF_ADDR),
        "new writes are there too"
    );
    // Put back twice (two failed epochs in a row): still nothing lost.
    vm.put_back_dirty(second.clone());
    vm.put_back_dirty(first.clone());
    let third = vm.harvest_dirty().unwrap();
    let mut union = first.clone();
    union.union_with(&second);
    for p in union.pages() {
        assert!(
            third.contains(p.0),
            "page {:#x} lost after two put-backs",
            p.0
        );
    }
}

/// A guest that hands the NIC malformed TX descriptors, then a good one, then keeps counting.
fn abusive_guest(base: u64, peer_port: u16) -> Vec<u8> {
    use iced_x86::code_asm::*;
    use layout::ports;
    let mut a = CodeAssembler::new(64).unwrap();
    let out = |a: &mut CodeAssembler, port: u16, value: u32| {
        a.mov(dx, port as u32).unwrap();
        a.mov(eax, value).unwrap();
        a.out(dx, eax).unwrap();
    };
    out(&mut a, ports::NIC_TX_RING, layout::TX_RING_ADDR as u32);
    out(&mut a, ports::NIC_RX_RING, layout::RX_RING_ADDR as u32);
    out(&mut a, ports::NIC_RING_SIZE, 8);
    // A good frame in TX buffer 0: header (IPv4 127.0.0.1:peer_port) + "hi".
    a.mov(rdi, layout::TX_BUF_ADDR).unwrap();
    a.mov(dword_ptr(rdi), 4 | (u32::from(peer_port) << 16))
        .unwrap();
    a.mov(dword_ptr(rdi + 4), u32::from_le_bytes([127, 0, 0, 1]))
        .unwrap();
    a.mov(word_ptr(rdi + 20), u32::from(u16::from_le_bytes(*b"hi")))
        .unwrap();
    // A frame with an unknown address family in TX buffer 1.
    a.mov(dword_ptr(rdi + 2048), 9).unwrap();
    let descs: [(u64, u32); 4] = [
        (0xff_0000_0000, 64),             // outside guest memory
        (layout::TX_BUF_ADDR, 1 << 20),   // longer than any frame
        (layout::TX_BUF_ADDR + 2048, 30), // bad header
        (layout::TX_BUF_ADDR, 22),        // good
    ];
    a.mov(rsi, layout::TX_RING_ADDR).unwrap();
    for (i, (addr, len)) in descs.iter().enumerate() {
        a.mov(rax, *addr).unwrap();
        a.mov(qword_ptr(rsi + 16 * i), rax).unwrap();
        a.mov(dword_ptr(rsi + 16 * i + 8), *len).unwrap();
    }
    out(&mut a, ports::NIC_TX_DOORBELL, descs.len() as u32);
    // A doorbell that runs more than a ring ahead is refused too.
    out(&mut a, ports::NIC_TX_DOORBELL, 1000);
    // Keep running: count in the status record of vCPU 0 (PROGRESS).
    let mut lp = a.create_label();
    a.mov(rbx, layout::STATUS_ADDR).unwrap();
    a.set_label(&mut lp).unwrap();
    a.inc(qword_ptr(rbx + layout::status::PROGRESS)).unwrap();
    a.jmp(lp).unwrap();
    a.assemble(base).unwrap()
}

#[test]
fn malformed_nic_descriptors_are_refused_and_guest_keeps_running() {
    if !kvm_available("malformed_nic_descriptors_are_refused_and_guest_keeps_running") {
        return;
    }
    init_logs();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let vm = Vm::new(&config(vec![Workload::Idle])).unwrap();
    let base = layout::CODE_ADDR + 0x1_8000;
    vm.load_custom_entry(
        0,
        base,
        &abusive_guest(base, peer.local_addr().unwrap().port()),
    )
    .unwrap();
    vm.resume();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap_or_else(|e| {
        panic!("no frame from the guest's NIC: {e} (a hang guard of {HANG_GUARD:?}, not a speed requirement)")
    });
    assert_eq!(&buf[..n], b"hi");
    assert_eq!(from, vm.nic_addr().unwrap());
    eventually("guest keeps running", || vm.dirtier_progress(0) > 1000);
    let p = vm.dirtier_progress(0);
    eventually("guest still running", || vm.dirtier_progress(0) > p + 1000);
    vm.pause().unwrap();
    let stats = vm.nic_stats();
    assert_eq!(stats.tx_refused, 3);
    assert_eq!(stats.tx_frames, 1);
    let status = |i: u64| -> u16 {
        vm.memory()
            .read_obj(GuestAddress(
                layout::TX_RING_ADDR + 16 * i + layout::ring::DESC_STATUS,
            ))
            .unwrap()
    };
    assert_eq!(
        [status(0), status(1), status(2), status(3)],
        [
            layout::ring::STATUS_REFUSED,
            layout::ring::STATUS_REFUSED,
            layout::ring::STATUS_REFUSED,
            layout::ring::STATUS_OK
        ]
    );
    assert!(vm.stopped_vcpus().is_empty());
}

#[test]
fn four_gib_guest_runs_and_tracks_both_regions() {
    if !kvm_available("four_gib_guest_runs_and_tracks_both_regions") {
        return;
    }
    init_logs();
    let cfg = VmConfig {
        mem_size: 4 << 30,
        ..config(vec![
            Workload::Counter,
            Workload::Dirtier(DirtierConfig {
                pages: 1000,
                rate: 0,
                limit: 1000,
            }),
        ])
    };
    let vm = Vm::new(&cfg).unwrap();
    assert_eq!(vm.regions(), &[(0, 3 << 30), (4 << 30, 1 << 30)]);
    vm.resume();
    assert_eq!(requests(&vm, 3, 1..=5)[4].counter, 5);
    eventually("dirtier done", || vm.dirtier_progress(1) == 1000);
    vm.pause().unwrap();
    vm.harvest_dirty().unwrap();
    // A device write at the very top of the high region is tracked.
    let top = (5u64 << 30) - 8;
    vm.memory().write_obj(0xabcdu64, GuestAddress(top)).unwrap();
    let set = vm.harvest_dirty().unwrap();
    assert_eq!(
        set.pages().map(|g| g.0).collect::<Vec<_>>(),
        vec![page(top)]
    );
}

/// A PC VM (in-kernel PICs, IOAPIC, LAPICs, PIT, KVM clock, COM1, i8042: what a stock kernel
/// gets) running the built-in guest, which this host's KVM can run: its checkpoint carries
/// the platform and the UART, a fresh VM restored from it holds exactly that platform state
/// again (the PIT's programmed count, the LAPICs, the clock not gone back), and the guest
/// continues. The guest leaves the platform alone, so the test programs the PIT and a LAPIC
/// register itself through the state.
///
/// Catches: platform state not saved or not restored (a restored kernel would lose its timer
/// and interrupt routing), a restore into a VM without the platform, a clock that restarts.
#[test]
fn a_pc_vm_checkpoints_its_platform_and_continues() {
    if !kvm_available("a_pc_vm_checkpoints_its_platform_and_continues") {
        return;
    }
    init_logs();
    let mut cfg = config(vec![
        Workload::Counter,
        Workload::Dirtier(DirtierConfig {
            pages: 256,
            rate: 20_000,
            limit: 0,
        }),
    ]);
    cfg.pc = true;
    cfg.console = rmc_vmm::vm::ConsoleTo::Discard;
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    let mut client = Client::new(vm.nic_addr().unwrap(), 7).unwrap();
    for _ in 0..10 {
        ask(&mut client, None);
    }
    vm.pause().unwrap();
    let mut state = vm.save_state().unwrap();
    let platform = state
        .devices
        .platform
        .clone()
        .expect("a PC VM's checkpoint carries its platform");
    assert_eq!(platform.lapics.len(), 2, "one LAPIC per vCPU");
    assert!(state.devices.serial.is_some(), "and its UART");
    // Program PIT channel 0 and a LAPIC register (the spurious vector, offset 0xf0) in the
    // saved state: a restore must bring exactly these back.
    let p = state.devices.platform.as_mut().unwrap();
    p.pit.channels[0].count = 0x1234;
    p.pit.channels[0].mode = 2;
    p.lapics[1].regs[0xf0] = 0x3f;
    p.lapics[1].regs[0xf1] = 0x01;
    let programmed = state.devices.platform.clone().unwrap();
    let image = vm.memory_image();
    drop(vm);

    let vm = restore_from(&cfg, &state, &image);
    let again = vm.save_state().unwrap();
    let back = again.devices.platform.clone().expect("restored as a PC VM");
    assert_eq!(back.pit.channels[0].count, 0x1234);
    assert_eq!(back.pit.channels[0].mode, 2);
    assert_eq!(back.lapics[1].regs[0xf0], 0x3f);
    assert_eq!(back.lapics[1].regs[0xf1], 0x01);
    assert_eq!(back.pic_master.chip_id, programmed.pic_master.chip_id);
    assert!(
        back.clock.clock >= programmed.clock.clock,
        "the KVM clock went back: {} < {}",
        back.clock.clock,
        programmed.clock.clock
    );
    assert_eq!(again.devices.serial, state.devices.serial);
    vm.resume();
    let mut client2 = Client::new(vm.nic_addr().unwrap(), 7).unwrap();
    let next = ask(&mut client2, Some(11));
    assert_eq!(
        next.counter, 11,
        "the guest continues on the restored PC VM"
    );
    assert!(vm.stopped_vcpus().is_empty(), "{:?}", vm.stopped_vcpus());

    // A PC VM's state does not go into a VM of the built-in kind by mistake: a restore
    // builds whatever the state is (here: a PC VM again, although the config says not).
    let plain = config(vec![Workload::Idle, Workload::Idle]);
    vm.pause().unwrap();
    let s = vm.save_state().unwrap();
    let image = vm.memory_image();
    drop(vm);
    let vm = restore_from(&plain, &s, &image);
    assert!(vm.save_state().unwrap().devices.platform.is_some());
}

/// The newest /boot/vmlinuz-* (a stock kernel), or `None` with a SKIPPED line; with
/// RMC_REQUIRE_KVM=1 (CI, which installs linux-image-amd64) a missing kernel fails instead.
fn stock_kernel(test: &str) -> Option<std::path::PathBuf> {
    let k = rmc_vmm::linux::newest_kernel();
    if k.is_none() {
        if std::env::var("RMC_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: no /boot/vmlinuz-* (apt-get install linux-image-amd64)");
        }
        eprintln!("SKIPPED {test}: no /boot/vmlinuz-* (install linux-image-amd64)");
    }
    k
}

/// A Linux VM at the limits a real VM needs: 16 vCPUs and 64 GiB, RAM above 4 GiB. It is
/// built (kernel, initrd and boot parameters loaded, vCPUs set up; this host's KVM cannot run
/// a stock kernel, so it is not started), checkpointed, and restored on the same memory in a
/// fresh VM, as a standby does: every vCPU and its LAPIC come back, the RAM layout is the
/// two regions, and what the VMM wrote (the kernel at 1 MiB, the initrd, the boot
/// parameters) is in the dirty log.
///
/// Catches: limits that refuse a real VM's size, a layout that loses RAM above 4 GiB, a
/// platform state that does not fit many vCPUs, VMM writes missing from the dirty log.
#[test]
fn a_16_vcpu_64_gib_linux_vm_is_built_checkpointed_and_restored() {
    const NAME: &str = "a_16_vcpu_64_gib_linux_vm_is_built_checkpointed_and_restored";
    if !kvm_available(NAME) {
        return;
    }
    let Some(kernel) = stock_kernel(NAME) else {
        return;
    };
    init_logs();
    let initrd = std::env::temp_dir().join(format!("rmc-kvm-vm-initrd-{}", std::process::id()));
    std::fs::write(&initrd, vec![0x5a; 300 << 10]).unwrap();
    let cfg = VmConfig {
        mem_size: 64 << 30,
        workloads: vec![Workload::Idle; 16],
        nic_addr: None,
        pc: true,
        linux: Some(rmc_vmm::linux::LinuxBoot {
            kernel,
            initrd: Some(initrd.clone()),
            cmdline: rmc_vmm::linux::DEFAULT_CMDLINE.into(),
        }),
        console: rmc_vmm::vm::ConsoleTo::Discard,
    };
    let vm = Vm::new(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let _ = std::fs::remove_file(&initrd);
    assert_eq!(
        vm.regions(),
        &[(0, 3 << 30), (4 << 30, 61 << 30)],
        "RAM above 3 GiB sits above 4 GiB"
    );
    let dirty = vm.harvest_dirty().unwrap();
    assert!(
        dirty.contains(0x10_0000) && dirty.contains(0x7000),
        "the kernel at 1 MiB and the boot parameters are in the dirty log"
    );
    assert!(dirty.len() > 1000, "{} pages", dirty.len());
    vm.put_back_dirty(dirty);
    let state = vm.save_state().unwrap();
    assert_eq!(state.vcpus.len(), 16);
    assert_eq!(state.devices.platform.as_ref().unwrap().lapics.len(), 16);
    assert!(state.devices.serial.is_some() && state.devices.cmos.is_some());
    let state = VmState::decode(&state.encode()).unwrap();
    let mem = vm.memory().clone();
    drop(vm);
    let restored_cfg = VmConfig {
        mem_size: 64 << 30,
        workloads: vec![Workload::Idle; 16],
        ..Default::default()
    };
    let vm = Vm::restore_on(&restored_cfg, &state, mem).unwrap_or_else(|e| panic!("{e:#}"));
    let again = vm.save_state().unwrap();
    assert_eq!(again.vcpus.len(), 16);
    for (i, (a, b)) in state.vcpus.iter().zip(&again.vcpus).enumerate() {
        assert_eq!(a.regs.rip, b.regs.rip, "vCPU {i}");
        assert_eq!(a.sregs.cr3, b.sregs.cr3, "vCPU {i}");
    }
    let (p, q) = (
        state.devices.platform.as_ref().unwrap(),
        again.devices.platform.as_ref().unwrap(),
    );
    // APIC id, spurious vector, LINT0 and LINT1 (ExtINT and NMI on every vCPU).
    for i in 0..16 {
        for reg in [0x20, 0xf0, 0x350, 0x360] {
            assert_eq!(
                p.lapics[i].regs[reg..reg + 4],
                q.lapics[i].regs[reg..reg + 4],
                "LAPIC register {reg:#x} of vCPU {i}"
            );
        }
        assert_eq!(q.lapics[i].regs[0x23] as u8, i as u8, "APIC id of vCPU {i}");
    }
}
