//! The paravirtual NIC: descriptor rings in guest memory, doorbells by port I/O, and a UDP
//! socket as its host side.
//!
//! ## Registers (32-bit `out`, see [`crate::layout::ports`])
//!
//! The guest writes the guest physical addresses of a TX ring and an RX ring (one 4 KiB page
//! each) and then the ring size (a power of two, at most 128), which enables the device and
//! resets its indices. It then posts receive buffers and rings `NIC_RX_DOORBELL` with its new
//! RX producer index, and for each packet to send fills a TX descriptor and rings
//! `NIC_TX_DOORBELL` with its new TX producer index. Producer and used indices are free-running
//! `u32`s; descriptor `i` lives in slot `i % size`.
//!
//! ## Ring page
//!
//! ```text
//! 0x000  descriptor[size]   addr u64 | len u32 | flags u16 | status u16   (16 bytes each)
//! 0xff8  used index u32     written by the device after it finished a descriptor
//! ```
//!
//! TX: `len` is the frame length; the device sends it and sets `status` to OK, or to REFUSED if
//! the descriptor is bad (address outside guest memory, length past its buffer limit, short or
//! unknown header). RX: `len` is the buffer capacity on the way in and the frame length on the
//! way out. A datagram larger than the buffer is dropped and counted.
//!
//! ## Frames
//!
//! Every frame (TX and RX) starts with a 20-byte address header, then the UDP payload:
//!
//! ```text
//! family u8 (4 or 6) | reserved u8 | port u16 LE | address [16] (IPv4 in the first 4 bytes)
//! ```
//!
//! On RX the header holds the sender's address; on TX the destination. So the guest answers a
//! request by copying its header into the reply, and never needs to know IP or UDP.
//!
//! ## Where the work happens
//!
//! All device work runs on the vCPU thread that wrote the doorbell or waits on
//! `NIC_RX_WAIT`, so when every vCPU is paused the device is quiet too and a checkpoint sees
//! guest memory and device state from the same instant. Every write into guest memory goes
//! through vm-memory, so the dirty bitmap sees it.
//!
//! ## On the bus and in a checkpoint
//!
//! `device` puts the NIC on the VM's port bus (its register block and its two wait ports);
//! [`persist`] is its save/restore code and the version of [`NicState`]'s encoding.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, warn};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use rmc_guest_api::OutputWaker;
use rmc_netbuf::{Limits, NetBuf};

use crate::layout::{ring, PAGE_BYTES, PAGE_SIZE};
use crate::GuestMem;

pub(crate) mod device;
pub mod persist;

/// Length of the address header in front of every frame.
pub const HEADER_LEN: usize = 20;
/// Largest frame the device accepts (header + the largest UDP payload).
pub const MAX_FRAME: usize = HEADER_LEN + 65_507;
/// Largest ring the device accepts.
pub const MAX_RING_SIZE: u32 = 128;

/// The device state that a checkpoint carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    /// TX ring address (0 = not set).
    pub tx_ring: u64,
    /// RX ring address (0 = not set).
    pub rx_ring: u64,
    /// Ring size; 0 while the device is disabled.
    pub size: u32,
    /// Guest's TX producer index.
    pub tx_prod: u32,
    /// Device's TX used index.
    pub tx_used: u32,
    /// Guest's RX producer index.
    pub rx_prod: u32,
    /// Device's RX used index.
    pub rx_used: u32,
    /// Statistics.
    pub stats: NicStats,
    /// The UDP address the host side served on (where the guest's clients reach it).
    pub host_addr: Option<SocketAddr>,
}

/// NIC counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStats {
    /// Frames sent.
    pub tx_frames: u64,
    /// TX descriptors refused (bad address, length or header).
    pub tx_refused: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Datagrams dropped because they did not fit the guest's buffer.
    pub rx_dropped: u64,
}

/// Asked just before each packet leaves the host whether this host may still speak for the
/// VM (fencing: its arbiter lease is certainly valid). `false` drops the packet: a primary
/// whose lease may have run out is being stopped, and another may already serve the VM.
#[derive(Clone)]
pub struct SendGate(std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl SendGate {
    /// A gate that asks `may_send` each time.
    pub fn new(may_send: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        SendGate(std::sync::Arc::new(may_send))
    }

    /// Whether a packet may leave now.
    pub fn allows(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for SendGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendGate")
    }
}

/// Output commit for the NIC: packets the guest sends wait here, tagged with their epoch,
/// until the standby acknowledged the checkpoint that produced them (see `rmc_netbuf`).
#[derive(Debug)]
pub struct OutputCommit {
    buf: parking_lot::Mutex<NetBuf<(SocketAddr, Vec<u8>)>>,
    socket: UdpSocket,
    gate: Option<SendGate>,
    /// Called when a packet starts waiting for a checkpoint (the first since the last one).
    waker: parking_lot::Mutex<Option<OutputWaker>>,
}

impl OutputCommit {
    /// A gate that sends released packets on `socket` (a clone of the NIC's), each only if
    /// `gate` (when given) allows it at that moment.
    pub fn new(socket: UdpSocket, limits: Limits, gate: Option<SendGate>) -> Self {
        OutputCommit {
            buf: parking_lot::Mutex::new(NetBuf::new(limits)),
            socket,
            gate,
            waker: parking_lot::Mutex::new(None),
        }
    }

    /// Calls `waker` whenever a packet is held while none waited for a checkpoint (`None`:
    /// stop); see [`rmc_guest_api::OutputCommit::watch_output`].
    pub fn set_waker(&self, waker: Option<OutputWaker>) {
        *self.waker.lock() = waker;
    }

    /// Whether packets wait for a checkpoint not taken yet.
    pub fn waiting(&self) -> bool {
        self.buf.lock().open_packets() > 0
    }

    /// Holds a packet the guest sent, or hands it back when the buffer is full. The first
    /// packet of an open epoch wakes whoever watches (the primary, to checkpoint early).
    fn hold(
        &self,
        packet: (SocketAddr, Vec<u8>),
    ) -> Result<(), rmc_netbuf::Full<(SocketAddr, Vec<u8>)>> {
        let first = {
            let mut buf = self.buf.lock();
            buf.push(packet)?;
            buf.open_packets() == 1
        };
        if first {
            if let Some(waker) = self.waker.lock().as_ref() {
                waker.wake();
            }
        }
        Ok(())
    }

    /// Packets sent so far belong to checkpoint `epoch`.
    pub fn close_epoch(&self, epoch: u64) {
        self.buf.lock().close_epoch(epoch);
    }

    /// Sends the packets of every checkpoint up to `acked`.
    pub fn release(&self, acked: u64) {
        let out = self.buf.lock().release(acked);
        self.send(out);
    }

    /// A new session takes over what is held (see [`rmc_netbuf::NetBuf::reopen`]).
    pub fn reopen(&self) {
        self.buf.lock().reopen();
    }

    /// Sends everything held (protection ended).
    pub fn release_all(&self) {
        let out = self.buf.lock().release_all();
        self.send(out);
    }

    fn send(&self, packets: Vec<(SocketAddr, Vec<u8>)>) {
        for (dest, payload) in packets {
            if self.gate.as_ref().is_some_and(|g| !g.allows()) {
                continue;
            }
            if let Err(e) = self.socket.send_to(&payload, dest) {
                warn!("NIC: send to {dest} failed: {e}");
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> rmc_netbuf::Stats {
        self.buf.lock().stats()
    }
}

/// The NIC: its state plus the host socket.
#[derive(Debug)]
pub struct Nic {
    state: NicState,
    socket: Option<UdpSocket>,
    rx_scratch: Vec<u8>,
    output: Option<std::sync::Arc<OutputCommit>>,
    gate: Option<SendGate>,
}

/// A TX or RX descriptor the device could not use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DescriptorError {
    /// The descriptor's buffer is not inside guest memory.
    #[error("Descriptor {index} buffer {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Descriptor index.
        index: u32,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The length is shorter than the header or longer than the device's limit.
    #[error("Descriptor {index} length {len} is outside {min}..={max}")]
    BadLength {
        /// Descriptor index.
        index: u32,
        /// Length found.
        len: u32,
        /// Smallest length accepted.
        min: usize,
        /// Largest length accepted.
        max: usize,
    },
    /// The frame header names an unknown address family.
    #[error("Descriptor {index} header has unknown address family {family}")]
    BadFamily {
        /// Descriptor index.
        index: u32,
        /// Family byte found.
        family: u8,
    },
}

impl Nic {
    /// A NIC whose host side is `socket` (`None`: frames are counted and discarded).
    pub fn new(socket: Option<UdpSocket>) -> io::Result<Self> {
        if let Some(s) = &socket {
            s.set_nonblocking(true)?;
        }
        Ok(Nic {
            state: NicState {
                host_addr: socket.as_ref().and_then(|s| s.local_addr().ok()),
                ..NicState::default()
            },
            socket,
            rx_scratch: vec![0; MAX_FRAME],
            output: None,
            gate: None,
        })
    }

    /// Asks `gate` before each packet sent directly (output commit off); see [`SendGate`].
    pub fn set_gate(&mut self, gate: Option<SendGate>) {
        self.gate = gate;
    }

    /// Holds every packet the guest sends in `gate` from now on (`None`: send at once).
    pub fn set_output(&mut self, gate: Option<std::sync::Arc<OutputCommit>>) {
        self.output = gate;
    }

    /// A clone of the host socket (for an [`OutputCommit`]).
    pub fn socket_clone(&self) -> Option<UdpSocket> {
        self.socket.as_ref().and_then(|s| s.try_clone().ok())
    }

    /// The device state, for a checkpoint.
    pub fn state(&self) -> &NicState {
        &self.state
    }

    /// Replaces the device state (restoring a checkpoint). The host address stays this NIC's
    /// own.
    pub fn set_state(&mut self, state: NicState) {
        self.state = NicState {
            host_addr: self.local_addr(),
            ..state
        };
    }

    /// The host socket's address, if any.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// The socket's file descriptor, to wait for input.
    pub fn socket_fd(&self) -> Option<RawFd> {
        self.socket.as_ref().map(|s| s.as_raw_fd())
    }

    /// The RX used index (what `NIC_RX_WAIT` compares against).
    pub fn rx_used(&self) -> u32 {
        self.state.rx_used
    }

    /// The TX used index.
    pub fn tx_used(&self) -> u32 {
        self.state.tx_used
    }

    /// Handles a 32-bit register write. Register errors are logged; the device ignores them.
    pub fn write_register(&mut self, port: u16, value: u32, mem: &GuestMem) {
        use crate::layout::ports::*;
        match port {
            NIC_TX_RING => self.state.tx_ring = u64::from(value),
            NIC_RX_RING => self.state.rx_ring = u64::from(value),
            NIC_RING_SIZE => self.enable(value, mem),
            NIC_TX_DOORBELL => {
                if self.check_producer("TX", value, self.state.tx_used) {
                    self.state.tx_prod = value;
                    self.process_tx(mem);
                }
            }
            NIC_RX_DOORBELL => {
                if self.check_producer("RX", value, self.state.rx_used) {
                    self.state.rx_prod = value;
                    self.fill_rx(mem);
                }
            }
            _ => warn!(port, value, "NIC: write to unknown register ignored"),
        }
    }

    fn enable(&mut self, size: u32, mem: &GuestMem) {
        let ring_ok = |addr: u64| {
            addr != 0
                && addr.is_multiple_of(PAGE_SIZE)
                && mem.get_slice(GuestAddress(addr), PAGE_BYTES).is_ok()
        };
        if !size.is_power_of_two() || size > MAX_RING_SIZE {
            error!(size, "NIC: ring size must be a power of two up to {MAX_RING_SIZE}; device stays disabled");
            self.state.size = 0;
            return;
        }
        if !ring_ok(self.state.tx_ring) || !ring_ok(self.state.rx_ring) {
            error!(
                tx_ring = format_args!("{:#x}", self.state.tx_ring),
                rx_ring = format_args!("{:#x}", self.state.rx_ring),
                "NIC: rings must be page-aligned pages inside guest memory; device stays disabled"
            );
            self.state.size = 0;
            return;
        }
        self.state.size = size;
        self.state.tx_prod = 0;
        self.state.tx_used = 0;
        self.state.rx_prod = 0;
        self.state.rx_used = 0;
        // The used indices live in guest memory too.
        let _ = mem.write_obj(0u32, GuestAddress(self.state.tx_ring + ring::USED_IDX));
        let _ = mem.write_obj(0u32, GuestAddress(self.state.rx_ring + ring::USED_IDX));
        debug!(size, "NIC enabled");
    }

    fn check_producer(&self, which: &str, prod: u32, used: u32) -> bool {
        if self.state.size == 0 {
            error!("NIC: {which} doorbell while the device is disabled; ignored");
            return false;
        }
        if prod.wrapping_sub(used) > self.state.size {
            error!(
                prod,
                used,
                size = self.state.size,
                "NIC: {which} producer index runs more than a ring ahead; doorbell ignored"
            );
            return false;
        }
        true
    }

    fn desc_addr(ring_addr: u64, size: u32, index: u32) -> GuestAddress {
        GuestAddress(ring_addr + u64::from(index % size) * ring::DESC_SIZE)
    }

    fn finish(&self, ring_addr: u64, index: u32, len: Option<u32>, status: u16, mem: &GuestMem) {
        let desc = Self::desc_addr(ring_addr, self.state.size, index);
        if let Some(len) = len {
            let _ = mem.write_obj(len, desc.unchecked_add(ring::DESC_LEN));
        }
        let _ = mem.write_obj(status, desc.unchecked_add(ring::DESC_STATUS));
        let _ = mem.write_obj(
            index.wrapping_add(1),
            GuestAddress(ring_addr + ring::USED_IDX),
        );
    }

    /// Sends every TX descriptor between the used and the producer index. With output commit
    /// on, a packet that does not fit the buffer stays in the ring, unconsumed, until a later
    /// call (backpressure: the guest sees its ring fill up and waits).
    pub fn process_tx(&mut self, mem: &GuestMem) {
        let mut frame = Vec::new();
        while self.state.tx_used != self.state.tx_prod {
            let index = self.state.tx_used;
            let status = match self.read_tx_frame(index, mem, &mut frame) {
                Ok(dest) => {
                    if let Some(gate) = &self.output {
                        let packet = (dest, frame[HEADER_LEN..].to_vec());
                        if gate.hold(packet).is_err() {
                            return;
                        }
                    } else {
                        self.send(&frame[HEADER_LEN..], dest);
                    }
                    self.state.stats.tx_frames += 1;
                    ring::STATUS_OK
                }
                Err(e) => {
                    error!("NIC: TX refused: {e}");
                    self.state.stats.tx_refused += 1;
                    ring::STATUS_REFUSED
                }
            };
            self.finish(self.state.tx_ring, index, None, status, mem);
            self.state.tx_used = index.wrapping_add(1);
        }
    }

    fn read_tx_frame(
        &self,
        index: u32,
        mem: &GuestMem,
        frame: &mut Vec<u8>,
    ) -> Result<SocketAddr, DescriptorError> {
        let desc = Self::desc_addr(self.state.tx_ring, self.state.size, index);
        let addr: u64 = mem.read_obj(desc).unwrap_or(u64::MAX);
        let len: u32 = mem
            .read_obj(desc.unchecked_add(ring::DESC_LEN))
            .unwrap_or(0);
        if (len as usize) < HEADER_LEN || len as usize > MAX_FRAME {
            return Err(DescriptorError::BadLength {
                index,
                len,
                min: HEADER_LEN,
                max: MAX_FRAME,
            });
        }
        frame.resize(len as usize, 0);
        mem.read_slice(frame, GuestAddress(addr))
            .map_err(|_| DescriptorError::OutsideMemory { index, addr, len })?;
        decode_header(&frame[..HEADER_LEN])
            .map_err(|family| DescriptorError::BadFamily { index, family })
    }

    fn send(&self, payload: &[u8], dest: SocketAddr) {
        let Some(socket) = &self.socket else { return };
        if self.gate.as_ref().is_some_and(|g| !g.allows()) {
            return;
        }
        if let Err(e) = socket.send_to(payload, dest) {
            // UDP: a send that fails is a lost datagram, which the client's retry covers.
            warn!("NIC: send to {dest} failed: {e}");
        }
    }

    /// Moves datagrams waiting on the socket into posted RX buffers. Returns how many frames
    /// were delivered.
    pub fn fill_rx(&mut self, mem: &GuestMem) -> usize {
        let Some(socket) = &self.socket else { return 0 };
        let mut delivered = 0;
        while self.state.size != 0 && self.state.rx_used != self.state.rx_prod {
            let (n, from) = match socket.recv_from(&mut self.rx_scratch[HEADER_LEN..]) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("NIC: receive failed: {e}");
                    break;
                }
            };
            let index = self.state.rx_used;
            let desc = Self::desc_addr(self.state.rx_ring, self.state.size, index);
            let addr: u64 = mem.read_obj(desc).unwrap_or(u64::MAX);
            let cap: u32 = mem
                .read_obj(desc.unchecked_add(ring::DESC_LEN))
                .unwrap_or(0);
            let frame_len = HEADER_LEN + n;
            if frame_len > cap as usize {
                warn!(from = %from, len = n, cap, "NIC: datagram larger than the guest's buffer dropped");
                self.state.stats.rx_dropped += 1;
                continue;
            }
            encode_header(from, &mut self.rx_scratch[..HEADER_LEN]);
            let status = match mem.write_slice(&self.rx_scratch[..frame_len], GuestAddress(addr)) {
                Ok(()) => {
                    self.state.stats.rx_frames += 1;
                    delivered += 1;
                    ring::STATUS_OK
                }
                Err(_) => {
                    error!(
                        "NIC: RX refused: {}",
                        DescriptorError::OutsideMemory {
                            index,
                            addr,
                            len: cap
                        }
                    );
                    ring::STATUS_REFUSED
                }
            };
            let len = if status == ring::STATUS_OK {
                frame_len as u32
            } else {
                0
            };
            self.finish(self.state.rx_ring, index, Some(len), status, mem);
            self.state.rx_used = index.wrapping_add(1);
        }
        delivered
    }
}

/// Writes the 20-byte address header for `addr`.
pub fn encode_header(addr: SocketAddr, out: &mut [u8]) {
    out[..HEADER_LEN].fill(0);
    out[2..4].copy_from_slice(&addr.port().to_le_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[0] = 4;
            out[4..8].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out[0] = 6;
            out[4..20].copy_from_slice(&ip.octets());
        }
    }
}

/// Reads a 20-byte address header; the error is the unknown family byte.
pub fn decode_header(h: &[u8]) -> Result<SocketAddr, u8> {
    let port = u16::from_le_bytes([h[2], h[3]]);
    let ip = match h[0] {
        4 => IpAddr::V4(Ipv4Addr::new(h[4], h[5], h[6], h[7])),
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&h[4..20]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        f => return Err(f),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for a in ["127.0.0.1:4000", "[::1]:65535"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut h = [0u8; HEADER_LEN];
            encode_header(a, &mut h);
            assert_eq!(decode_header(&h), Ok(a));
        }
        let mut h = [0u8; HEADER_LEN];
        h[0] = 9;
        assert_eq!(decode_header(&h), Err(9));
    }
}
