//! Output commit with a real VM: no reply leaves the primary before the standby acknowledged
//! the checkpoint that produced it. A scripted standby (the real protocol core, with its acks
//! delayed or withheld) shows replies waiting for acks; a tiny output buffer under a burst
//! shows backpressure without loss.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{init_logs, kvm_available};
use rmc_mc::core::{Heartbeat, LayoutRule, StandbyAction, StandbyCore};
use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::standby::{Standby, StandbyConfig};
use rmc_transport::tcp::{FrameReader, FrameWriter};
use rmc_transport::wire::{auth, MsgType};
use rmc_vmm::service::{Client, Reply, Request};
use rmc_vmm::{Vm, VmConfig, Workload};

const SECRET: &[u8] = b"output commit test secret";

/// A standby that speaks the protocol but acks each epoch `delay` after its commit, or never.
/// It keeps heartbeating, so the primary does not give up on it.
fn scripted_standby(ack_delay: Option<Duration>, done: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap());
        let mut w = FrameWriter::new(s);
        let hb = Heartbeat {
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(60),
        };
        let mut core = StandbyCore::new(SECRET, LayoutRule::default(), 0, hb, Instant::now());
        let mut due: Vec<(Instant, rmc_transport::wire::Message)> = Vec::new();
        while !done.load(Ordering::Acquire) {
            let mut idle = |_| Err("idle".to_string());
            let h = match r.read_header(1 << 40, &mut idle) {
                Ok(h) => h,
                Err(_) => {
                    let now = Instant::now();
                    if let Ok(Some(m)) = core.tick(now) {
                        let _ = w.send(&m);
                    }
                    let (ready, wait): (Vec<_>, Vec<_>) =
                        due.drain(..).partition(|(t, _)| *t <= now);
                    due = wait;
                    for (_, ack) in ready {
                        let _ = w.send(&ack);
                    }
                    continue;
                }
            };
            let mut wait = |_| Ok(());
            if h.ty == MsgType::EpochBody {
                core.on_body_frame(h.len).unwrap();
                let mut body = vec![0u8; h.len as usize];
                r.read_full(&mut body, "body", &mut wait).unwrap();
                // The checksum is checked by the real standby; here any body is taken.
                core.body_received(0, Instant::now()).unwrap();
                continue;
            }
            let m = r.read_message(h, &mut wait).unwrap();
            let m = match m {
                rmc_transport::wire::Message::Commit { epoch, .. } => {
                    rmc_transport::wire::Message::Commit { epoch, checksum: 0 }
                }
                m => m,
            };
            match core.on_message(m, auth::nonce(), Instant::now()).unwrap() {
                StandbyAction::Send(m) => w.send(&m).unwrap(),
                StandbyAction::Established { accept, .. } => w.send(&accept).unwrap(),
                StandbyAction::Apply(_) => {
                    let ack = core.applied();
                    if let Some(d) = ack_delay {
                        due.push((Instant::now() + d, ack));
                    }
                }
                _ => {}
            }
        }
    });
    addr
}

fn protected_vm(
    standby: std::net::SocketAddr,
    limits: rmc_netbuf::Limits,
) -> (Arc<Vm>, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let vm = Arc::new(
        Vm::new(&VmConfig {
            mem_size: 32 << 20,
            workloads: vec![Workload::Counter],
            nic_addr: Some("127.0.0.1:0".parse().unwrap()),
        })
        .unwrap(),
    );
    vm.resume();
    vm.enable_output_commit(limits).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut cfg = PrimaryConfig::new(standby, SECRET.to_vec(), (32 << 20) / 4096);
    cfg.epoch_interval = Duration::from_millis(10);
    let h = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            let p = Primary::connect(&*vm, cfg).unwrap();
            let _ = p.run(&stop);
        })
    };
    (vm, stop, h)
}

fn ask(sock: &UdpSocket, server: std::net::SocketAddr, client_id: u64, seq: u64) {
    sock.send_to(&Request { client_id, seq }.encode(), server)
        .unwrap();
}

fn answer(sock: &UdpSocket, wait: Duration) -> Option<(Reply, Instant)> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    let (n, _) = sock.recv_from(&mut b).ok()?;
    Some((Reply::decode(&b[..n]).unwrap(), Instant::now()))
}

#[test]
fn a_standby_that_never_acks_lets_no_reply_out() {
    if !kvm_available("a_standby_that_never_acks_lets_no_reply_out") {
        return;
    }
    init_logs();
    let done = Arc::new(AtomicBool::new(false));
    let standby = scripted_standby(None, done.clone());
    let (vm, stop, h) = protected_vm(standby, Default::default());
    let server = vm.nic_addr().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    ask(&sock, server, 1, 1);
    assert!(
        answer(&sock, Duration::from_millis(1500)).is_none(),
        "a reply left without an ack"
    );
    // The guest did answer: the reply is held, not lost.
    assert_eq!(vm.guest_status().requests, 1);
    assert_eq!(vm.output_stats().unwrap().held_packets, 1);
    // Protection ends (the standby is declared lost): the held reply goes out.
    vm.disable_output_commit();
    let (r, _) = answer(&sock, Duration::from_secs(5)).expect("released reply");
    assert_eq!((r.seq, r.counter), (1, 1));
    stop.store(true, Ordering::Release);
    done.store(true, Ordering::Release);
    drop(h);
}

#[test]
fn delayed_acks_delay_replies_accordingly() {
    if !kvm_available("delayed_acks_delay_replies_accordingly") {
        return;
    }
    init_logs();
    const DELAY: Duration = Duration::from_millis(150);
    let done = Arc::new(AtomicBool::new(false));
    let standby = scripted_standby(Some(DELAY), done.clone());
    let (vm, stop, _h) = protected_vm(standby, Default::default());
    let server = vm.nic_addr().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    std::thread::sleep(Duration::from_millis(500)); // past the full sync
    for seq in 1..=5 {
        let sent = Instant::now();
        ask(&sock, server, 2, seq);
        let (r, at) = answer(&sock, Duration::from_secs(5)).expect("reply");
        assert_eq!(r.seq, seq);
        let latency = at - sent;
        // The reply waits for its checkpoint (the next pause, <= 10 ms) and then DELAY.
        assert!(
            latency >= DELAY,
            "reply {seq} after {latency:?}, before its ack could arrive"
        );
        assert!(
            latency < DELAY + Duration::from_millis(400),
            "reply {seq} after {latency:?}"
        );
    }
    stop.store(true, Ordering::Release);
    done.store(true, Ordering::Release);
}

#[test]
fn a_burst_past_the_output_buffer_gets_backpressure_not_loss() {
    if !kvm_available("a_burst_past_the_output_buffer_gets_backpressure_not_loss") {
        return;
    }
    init_logs();
    let mut sb = Standby::bind(
        "127.0.0.1:0".parse().unwrap(),
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: None,
            heartbeat: Heartbeat::default(),
        },
    )
    .unwrap();
    let addr = sb.local_addr();
    std::thread::spawn(move || {
        let _ = sb.serve_one();
    });
    let limits = rmc_netbuf::Limits {
        max_bytes: 1 << 20,
        max_packets: 4,
    };
    let (vm, stop, _h) = protected_vm(addr, limits);
    let server = vm.nic_addr().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // 60 clients at once (the guest's RX ring holds 64): far more replies than the 4 the
    // output buffer may hold.
    let socks: Vec<UdpSocket> = (0..60)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, s) in socks.iter().enumerate() {
        ask(s, server, 100 + i as u64, 1);
    }
    let mut max_held = 0;
    let mut counters = Vec::new();
    for (i, s) in socks.iter().enumerate() {
        let mut c = Client::new(server, 100 + i as u64).unwrap();
        let (r, _) = match answer(s, Duration::from_secs(10)) {
            Some(x) => x,
            // Resend through a fresh socket if the first reply went missing (the checker
            // below still sees one answer per client, and the counter tells any double apply).
            None => c
                .repeat(1, Duration::from_secs(10), |_| {})
                .map(|(r, _)| (r, Instant::now()))
                .unwrap(),
        };
        assert_eq!(r.seq, 1);
        counters.push(r.counter);
        max_held = max_held.max(vm.output_stats().unwrap().held_packets);
    }
    counters.sort_unstable();
    assert_eq!(
        counters,
        (1..=60).collect::<Vec<_>>(),
        "every request applied exactly once, every reply delivered"
    );
    let stats = vm.output_stats().unwrap();
    assert!(
        stats.refused > 0,
        "the burst must have hit the limit: {stats:?}"
    );
    assert!(max_held <= 4, "held {max_held} packets with a limit of 4");
    assert_eq!(vm.nic_stats().tx_refused, 0);
    stop.store(true, Ordering::Release);
}
