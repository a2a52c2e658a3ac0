//! The legacy devices a stock Linux kernel needs: a 16550 UART on COM1 (vm-superio's
//! `Serial`, interrupt on IRQ 4 through an irqfd) and an i8042 controller that is there for
//! one thing, the reset line (`reboot=k`: the kernel writes 0xfe to port 0x64).
//!
//! ## Console output and output commit
//!
//! What the guest writes to the UART is output a user sees: like network packets it must not
//! be seen and then rolled back by a failover, and a console, unlike TCP, has no
//! retransmission to cover a line lost in between. So under protection the *standby* shows
//! the console: [`ConsoleOutput`] keeps every byte the standby has not acknowledged, each
//! checkpoint carries them with their position in the console stream ([`SerialState::output`]
//! and [`SerialState::output_offset`]), and the standby writes out what it had not written yet
//! once it holds the checkpoint ([`ConsoleEmitter`]). The process that shows a line is the one
//! that holds the state in which the guest printed it: after a failover the restored guest
//! continues the stream exactly where the standby's console stopped, with no line repeated
//! or lost, which a primary releasing on acks cannot promise (an ack in flight when it dies).
//!
//! The first byte written since the last checkpoint wakes the primary (the same
//! [`OutputWaker`] as the NIC's), so a console line reaches the standby about one checkpoint
//! after the guest printed it. A guest that prints more than [`MAX_HELD_BYTES`] while the
//! standby does not acknowledge loses the excess (counted in
//! [`ConsoleStats::dropped_bytes`], reported once): a UART cannot make the guest wait without
//! stopping the vCPU.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::warn;
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use rmc_guest_api::OutputWaker;

use crate::bus::{BusDevice, IoAction, IoContext};
use crate::nic::SendGate;
use crate::persist::{self, Persist, Versioned};
use crate::state::StateError;

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// Ports a 16550 decodes.
pub const UART_PORTS: u16 = 8;
/// COM1's interrupt line (ISA IRQ 4).
pub const COM1_IRQ: u32 = 4;
/// The i8042's data port; its command/status port is 4 above.
pub const I8042_BASE: u16 = 0x60;
/// Ports from [`I8042_BASE`] the i8042 decodes (0x60..=0x64).
pub const I8042_PORTS: u16 = 5;
/// Most console bytes held for unacknowledged checkpoints.
pub const MAX_HELD_BYTES: usize = 16 << 20;
/// Bytes the UART's receive FIFO holds (vm-superio's).
const FIFO_SIZE: usize = 64;

/// Where released console output goes.
pub type ConsoleSink = Box<dyn Write + Send>;

/// Console output counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Bytes that reached the sink.
    pub written_bytes: u64,
    /// Bytes held now.
    pub held_bytes: usize,
    /// Bytes lost because too much was held (or the fencing gate closed).
    pub dropped_bytes: u64,
}

/// Console bytes not yet acknowledged by the standby.
#[derive(Debug, Default)]
struct Carry {
    /// Stream offset of `bytes[0]`.
    base: u64,
    bytes: Vec<u8>,
    /// End offset of each checkpoint's output, oldest first.
    epochs: VecDeque<(u64, u64)>,
    /// Stream offset when the last checkpoint was taken.
    closed_at: u64,
}

struct OutInner {
    sink: ConsoleSink,
    /// Offset in the console stream of the next byte the guest writes.
    total: u64,
    /// `Some` while output commit is on.
    carry: Option<Carry>,
    waker: Option<OutputWaker>,
    gate: Option<SendGate>,
    stats: ConsoleStats,
    said_full: bool,
}

/// The console's output path: straight to the sink, or carried in checkpoints to the
/// standby (output commit).
pub struct ConsoleOutput(Mutex<OutInner>);

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = self.0.lock();
        f.debug_struct("ConsoleOutput")
            .field("total", &o.total)
            .field("carry", &o.carry)
            .field("stats", &o.stats)
            .finish_non_exhaustive()
    }
}

fn emit(sink: &mut ConsoleSink, gate: Option<&SendGate>, stats: &mut ConsoleStats, b: &[u8]) {
    if b.is_empty() {
        return;
    }
    if gate.is_some_and(|g| !g.allows()) {
        stats.dropped_bytes += b.len() as u64;
        return;
    }
    // A console that cannot be written (closed pipe) must not stop the guest.
    if sink.write_all(b).and_then(|()| sink.flush()).is_ok() {
        stats.written_bytes += b.len() as u64;
    } else {
        stats.dropped_bytes += b.len() as u64;
    }
}

impl ConsoleOutput {
    /// Output to `sink`, not carried.
    pub fn new(sink: ConsoleSink) -> Self {
        ConsoleOutput(Mutex::new(OutInner {
            sink,
            total: 0,
            carry: None,
            waker: None,
            gate: None,
            stats: ConsoleStats::default(),
            said_full: false,
        }))
    }

    /// Bytes the guest wrote.
    fn write(&self, bytes: &[u8]) {
        let wake = {
            let mut o = self.0.lock();
            let o = &mut *o;
            match o.carry.as_mut() {
                None => {
                    emit(&mut o.sink, o.gate.as_ref(), &mut o.stats, bytes);
                    o.total += bytes.len() as u64;
                    None
                }
                Some(c) => {
                    let room = MAX_HELD_BYTES.saturating_sub(c.bytes.len());
                    let take = bytes.len().min(room);
                    if take < bytes.len() {
                        o.stats.dropped_bytes += (bytes.len() - take) as u64;
                        if !o.said_full {
                            o.said_full = true;
                            warn!(
                                "console: {MAX_HELD_BYTES} bytes wait for the standby's \
                                 acknowledgement; further output is dropped until it comes"
                            );
                        }
                    }
                    let first = o.total == c.closed_at && take > 0;
                    c.bytes.extend_from_slice(&bytes[..take]);
                    o.total += take as u64;
                    o.stats.held_bytes = c.bytes.len();
                    first.then(|| o.waker.clone()).flatten()
                }
            }
        };
        // Outside the lock: whoever watches may ask `waiting` at once.
        if let Some(w) = wake {
            w.wake();
        }
    }

    /// Turns output commit on: from now on bytes go to the standby in checkpoints. Already on
    /// (a new session after a lost one, whose checkpoints are numbered afresh): what the last
    /// standby did not acknowledge goes with the new session's checkpoints.
    pub fn hold(&self) {
        let mut o = self.0.lock();
        let total = o.total;
        match o.carry.as_mut() {
            None => {
                o.carry = Some(Carry {
                    base: total,
                    closed_at: total,
                    ..Carry::default()
                })
            }
            Some(c) => {
                c.epochs.clear();
                c.closed_at = c.base;
            }
        }
    }

    /// Turns output commit off (protection lost, the VM runs on alone): what no standby
    /// acknowledged is written here now (a standby that applied a checkpoint whose ack was
    /// lost has shown part of it already), new output at once.
    pub fn release_all(&self) {
        let mut o = self.0.lock();
        let o = &mut *o;
        if let Some(c) = o.carry.take() {
            emit(&mut o.sink, o.gate.as_ref(), &mut o.stats, &c.bytes);
        }
        o.stats.held_bytes = 0;
    }

    /// A checkpoint `epoch` was taken: the output so far is in it.
    pub fn close_epoch(&self, epoch: u64) {
        let mut o = self.0.lock();
        let total = o.total;
        if let Some(c) = o.carry.as_mut() {
            if total > c.closed_at {
                c.epochs.push_back((epoch, total));
                c.closed_at = total;
            }
        }
    }

    /// The standby acknowledged every checkpoint up to `acked`: it has their output.
    pub fn release(&self, acked: u64) {
        let mut o = self.0.lock();
        let Some(c) = o.carry.as_mut() else { return };
        let mut upto = None;
        while c.epochs.front().is_some_and(|(e, _)| *e <= acked) {
            upto = c.epochs.pop_front().map(|(_, end)| end);
        }
        if let Some(end) = upto {
            let n = (end - c.base) as usize;
            c.bytes.drain(..n.min(c.bytes.len()));
            c.base = end;
        }
        let held = c.bytes.len();
        o.stats.held_bytes = held;
    }

    /// Whether output waits for a checkpoint not taken yet.
    pub fn waiting(&self) -> bool {
        let o = self.0.lock();
        o.carry.as_ref().is_some_and(|c| o.total > c.closed_at)
    }

    /// What a checkpoint carries: the stream offset of the first byte not acknowledged, and
    /// the bytes from there (none while output commit is off).
    pub(crate) fn carried(&self) -> (u64, Vec<u8>) {
        let o = self.0.lock();
        match &o.carry {
            Some(c) => (c.base, c.bytes.clone()),
            None => (o.total, Vec::new()),
        }
    }

    /// A restored VM: the standby showed everything up to `end`; the guest continues there.
    pub(crate) fn continue_at(&self, end: u64) {
        let mut o = self.0.lock();
        o.total = end;
        o.carry = None;
        o.stats.held_bytes = 0;
    }

    /// Whom to wake when output starts waiting.
    pub fn set_waker(&self, waker: Option<OutputWaker>) {
        self.0.lock().waker = waker;
    }

    /// Fencing: output is written here only while `gate` allows.
    pub fn set_gate(&self, gate: Option<SendGate>) {
        self.0.lock().gate = gate;
    }

    /// Counters.
    pub fn stats(&self) -> ConsoleStats {
        self.0.lock().stats
    }
}

/// The standby's side: writes the console output each held checkpoint carries, each byte of
/// the stream once.
pub struct ConsoleEmitter {
    sink: Mutex<(ConsoleSink, Option<u64>)>,
}

impl std::fmt::Debug for ConsoleEmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleEmitter")
            .field("shown_up_to", &self.sink.lock().1)
            .finish_non_exhaustive()
    }
}

impl ConsoleEmitter {
    /// An emitter writing to `sink`.
    pub fn new(sink: ConsoleSink) -> Self {
        ConsoleEmitter {
            sink: Mutex::new((sink, None)),
        }
    }

    /// The standby holds a checkpoint with this serial state: writes what of its output was
    /// not written yet. Returns the bytes written.
    pub fn checkpoint_held(&self, serial: &SerialState) -> usize {
        let mut g = self.sink.lock();
        let (sink, shown) = &mut *g;
        let end = serial.output_offset + serial.output.len() as u64;
        let from = shown
            .unwrap_or(serial.output_offset)
            .max(serial.output_offset);
        if from >= end {
            return 0;
        }
        let bytes = &serial.output[(from - serial.output_offset) as usize..];
        let mut stats = ConsoleStats::default();
        emit(sink, None, &mut stats, bytes);
        *shown = Some(end);
        bytes.len()
    }
}

/// The UART's `Write`: into the [`ConsoleOutput`].
struct ToConsole(Arc<ConsoleOutput>);

impl Write for ToConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An interrupt line: an eventfd KVM turns into an edge on a GSI (irqfd).
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A new line (register [`IrqLine::fd`] with KVM before use).
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// The eventfd to register.
    pub fn fd(&self) -> &EventFd {
        &self.0
    }

    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(IrqLine(self.0.try_clone()?))
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's state in a checkpoint (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
    /// Stream offset of the first console byte in `output`.
    pub output_offset: u64,
    /// Console output the standby has not acknowledged yet (see the module docs).
    pub output: Vec<u8>,
}

impl Versioned for SerialState {
    const NAME: &'static str = "serial";
    const VERSION: u32 = 1;

    fn check(&self) -> Result<(), String> {
        if self.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "receive FIFO holds {} bytes, the UART {FIFO_SIZE}",
                self.in_buffer.len()
            ));
        }
        if self.output.len() > MAX_HELD_BYTES {
            return Err(format!(
                "carries {} bytes of console output, at most {MAX_HELD_BYTES} are kept",
                self.output.len()
            ));
        }
        Ok(())
    }
}

impl From<SuperioState> for SerialState {
    fn from(s: SuperioState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            output_offset: 0,
            output: Vec::new(),
        }
    }
}

impl From<&SerialState> for SuperioState {
    fn from(s: &SerialState) -> Self {
        SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Default for SerialState {
    fn default() -> Self {
        SuperioState::default().into()
    }
}

/// A read of a byte-wide register: its value in the first byte, zeros above.
fn byte_register(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(b) = data.first_mut() {
        *b = value;
    }
}

type Uart = Serial<IrqLine, NoEvents, ToConsole>;

/// COM1.
pub(crate) struct SerialDevice {
    uart: Mutex<Uart>,
    irq: IrqLine,
    out: Arc<ConsoleOutput>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq`, writing to `out`.
    pub(crate) fn new(irq: IrqLine, out: Arc<ConsoleOutput>) -> std::io::Result<Self> {
        let uart = Serial::new(irq.try_clone()?, ToConsole(out.clone()));
        Ok(SerialDevice {
            uart: Mutex::new(uart),
            irq,
            out,
        })
    }

    /// Bytes typed at the console (as many as the FIFO takes; returns how many).
    pub(crate) fn input(&self, bytes: &[u8]) -> usize {
        self.uart.lock().enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, _io: &IoContext<'_>, offset: u64, data: &mut [u8]) {
        byte_register(data, self.uart.lock().read(offset as u8));
    }

    fn write(&self, _io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.lock().write(offset as u8, b) {
                warn!("serial: {e:?}");
            }
        }
        IoAction::Continue
    }
}

impl Persist for SerialDevice {
    type State = SerialState;

    fn save(&self) -> SerialState {
        let mut s: SerialState = self.uart.lock().state().into();
        (s.output_offset, s.output) = self.out.carried();
        s
    }

    fn restore(&self, state: &SerialState) -> Result<(), StateError> {
        persist::check(state, &format_args!("device {}", SerialState::NAME))?;
        let fresh = |what: &str, e: &dyn std::fmt::Debug| StateError::Invalid {
            part: format!("device {}", SerialState::NAME),
            reason: format!("{what}: {e:?}"),
        };
        let irq = self
            .irq
            .try_clone()
            .map_err(|e| fresh("cannot clone the interrupt line", &e))?;
        let uart = Serial::from_state(&state.into(), irq, NoEvents, ToConsole(self.out.clone()))
            .map_err(|e| fresh("the UART refused the state", &e))?;
        *self.uart.lock() = uart;
        self.out
            .continue_at(state.output_offset + state.output.len() as u64);
        Ok(())
    }
}

/// A reset request, seen by the i8042.
#[derive(Debug, Default, Clone)]
struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The i8042: answers reads with 0 (no keyboard), and stops the VM on a CPU reset command.
pub(crate) struct I8042 {
    dev: Mutex<I8042Device<ResetFlag>>,
    reset: ResetFlag,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    pub(crate) fn new() -> Self {
        let reset = ResetFlag::default();
        I8042 {
            dev: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, _io: &IoContext<'_>, offset: u64, data: &mut [u8]) {
        byte_register(data, self.dev.lock().read(offset as u8));
    }

    fn write(&self, _io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction {
        if let Some(&b) = data.first() {
            let _ = self.dev.lock().write(offset as u8, b);
        }
        if self.reset.0.swap(false, Ordering::SeqCst) {
            return IoAction::Stop("the guest reset the machine (i8042 reset line)".into());
        }
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::{RunControl, Waker};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(s: &Shared) -> String {
        String::from_utf8_lossy(&s.0.lock()).into_owned()
    }

    /// The serial state a checkpoint would carry now.
    fn checkpoint(out: &ConsoleOutput) -> SerialState {
        let (output_offset, output) = out.carried();
        SerialState {
            output_offset,
            output,
            ..SerialState::default()
        }
    }

    #[test]
    fn carried_console_output_is_shown_by_the_standby_once_each() {
        let primary_sink = Shared::default();
        let out = ConsoleOutput::new(Box::new(primary_sink.clone()));
        out.write(b"boot ");
        assert_eq!(text(&primary_sink), "boot ", "unprotected: written at once");
        let woke = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woke.clone();
        out.set_waker(Some(OutputWaker::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        })));
        let standby_sink = Shared::default();
        let standby = ConsoleEmitter::new(Box::new(standby_sink.clone()));

        out.hold();
        assert!(!out.waiting());
        out.write(b"a");
        out.write(b"b");
        assert!(out.waiting());
        assert_eq!(woke.load(Ordering::SeqCst), 1, "the first byte wakes, once");
        let c1 = checkpoint(&out);
        out.close_epoch(1);
        assert!(!out.waiting());
        assert_eq!((c1.output_offset, c1.output.as_slice()), (5, &b"ab"[..]));
        out.write(b"c");
        assert_eq!(woke.load(Ordering::SeqCst), 2);
        let c2 = checkpoint(&out);
        out.close_epoch(2);
        assert_eq!(c2.output, b"abc", "unacknowledged output rides again");
        // The standby holds checkpoint 1, then 2: each byte shown once.
        assert_eq!(standby.checkpoint_held(&c1), 2);
        assert_eq!(standby.checkpoint_held(&c2), 1);
        assert_eq!(text(&standby_sink), "abc");
        assert_eq!(standby.checkpoint_held(&c2), 0, "a repeat shows nothing");
        out.release(1);
        let c3 = checkpoint(&out);
        assert_eq!((c3.output_offset, c3.output.as_slice()), (7, &b"c"[..]));
        out.write(b"d");
        out.release(2);
        let c4 = checkpoint(&out);
        assert_eq!((c4.output_offset, c4.output.as_slice()), (8, &b"d"[..]));
        assert_eq!(
            text(&primary_sink),
            "boot ",
            "the primary shows nothing protected"
        );

        // The standby takes over from checkpoint 2: the restored guest continues the stream
        // where the standby's console stopped.
        let restored = ConsoleOutput::new(Box::new(standby_sink.clone()));
        restored.continue_at(c2.output_offset + c2.output.len() as u64);
        restored.write(b"e");
        assert_eq!(text(&standby_sink), "abce");
        assert_eq!(checkpoint(&restored).output_offset, 9);

        // The primary loses its standby and runs on alone: what was not acknowledged is
        // shown here.
        out.release_all();
        assert_eq!(text(&primary_sink), "boot d");
        out.write(b"f");
        assert_eq!(text(&primary_sink), "boot df");
        assert_eq!(out.stats().dropped_bytes, 0);
    }

    #[test]
    fn a_new_session_carries_what_the_lost_standby_did_not_acknowledge() {
        let out = ConsoleOutput::new(Box::new(std::io::sink()));
        out.hold();
        out.write(b"xy");
        out.close_epoch(7);
        // The session is lost; a new one numbers its checkpoints from 1 again.
        out.hold();
        assert!(
            out.waiting(),
            "the carried bytes wait for the new session's checkpoint"
        );
        out.close_epoch(1);
        out.release(1);
        assert_eq!(checkpoint(&out).output, b"");
        assert_eq!(checkpoint(&out).output_offset, 2);
    }

    #[test]
    fn a_closed_gate_drops_console_output() {
        let sink = Shared::default();
        let out = ConsoleOutput::new(Box::new(sink.clone()));
        let open = Arc::new(AtomicBool::new(false));
        let o = open.clone();
        out.set_gate(Some(SendGate::new(move || o.load(Ordering::SeqCst))));
        out.write(b"x");
        assert_eq!(text(&sink), "");
        assert_eq!(out.stats().dropped_bytes, 1);
        open.store(true, Ordering::SeqCst);
        out.write(b"y");
        assert_eq!(text(&sink), "y");
    }

    #[test]
    fn the_uart_prints_through_the_console_and_its_state_round_trips() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctl = RunControl::new(1);
        let waker = Waker::new(&kick, &ctl);
        let io = IoContext::new(0, &waker);
        let sink = Shared::default();
        let out = Arc::new(ConsoleOutput::new(Box::new(sink.clone())));
        let irq = IrqLine::new().unwrap();
        let s = SerialDevice::new(irq, out).unwrap();
        // Line control: 8N1 with the divisor latch, divisor 1, then back.
        s.write(&io, 3, &[0x83]);
        s.write(&io, 0, &[1]);
        s.write(&io, 3, &[0x03]);
        s.write(&io, 7, &[0x5a]); // scratch
        for &b in b"hi\n" {
            s.write(&io, 0, &[b]);
        }
        assert_eq!(text(&sink), "hi\n");
        assert_eq!(s.input(b"ls"), 2);
        let saved = s.save();
        assert_eq!(saved.scratch, 0x5a);
        assert_eq!(saved.baud_divisor_low, 1);
        assert_eq!(saved.in_buffer, b"ls".to_vec());
        let other = SerialDevice::new(
            IrqLine::new().unwrap(),
            Arc::new(ConsoleOutput::new(Box::new(std::io::sink()))),
        )
        .unwrap();
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        let mut b = [0u8];
        other.read(&io, 0, &mut b);
        assert_eq!(b[0], b'l', "the receive FIFO came back");
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; FIFO_SIZE + 1];
        assert!(other.restore(&bad).is_err());
    }

    #[test]
    fn the_i8042_reset_command_stops_the_vcpu() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctl = RunControl::new(1);
        let waker = Waker::new(&kick, &ctl);
        let io = IoContext::new(0, &waker);
        let k = I8042::new();
        assert_eq!(k.write(&io, 4, &[0xaa]), IoAction::Continue);
        assert_eq!(k.write(&io, 0, &[0xfe]), IoAction::Continue, "data port");
        assert!(matches!(k.write(&io, 4, &[0xfe]), IoAction::Stop(_)));
    }
}
