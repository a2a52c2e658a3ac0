//! The RDMA transport: rdma_cm connection management and one reliable-connected (RC) queue pair
//! per primary/standby pair, on `rdma-sys` (libibverbs + librdmacm). Everything that touches
//! the C libraries is in this module, behind five types: [`Listener`], [`Connection`], [`Rx`]
//! (implements `Read`), [`Tx`] (implements `Write`, plus [`Tx::place`]) and [`Closer`], so the
//! binding could be replaced without touching the protocol code.
//!
//! ## Mapping of the protocol onto verbs
//!
//! ```text
//! control frames (Hello ... Heartbeat)   a byte stream of SENDs from registered 64 KiB buffers
//!                                        into pre-posted 64 KiB receives (RECV_BUFS of them,
//!                                        re-posted as soon as the reader consumed one)
//! epoch body (index | pages | state)     RDMA WRITEs from the primary's slot i straight into the
//!                                        standby's slot i (three large writes, unsignaled)
//! BodyPlaced + Commit                    SENDs on the same QP, after the writes: RC ordering
//!                                        makes the data visible before the standby sees them
//! acks, heartbeats                       SENDs the other way
//! ```
//!
//! Both sides register their staging region once per connection (never per epoch); the
//! standby registers it with remote write access and tells the primary its address, stride and
//! rkey in `RegionKey`. Nothing else of the standby (its backup of guest memory in particular)
//! is registered, so nothing else is remotely writable.
//!
//! The send queue is bounded ([`SQ_DEPTH`]) and signaled selectively: SENDs are signaled (their
//! buffer is reused on completion), WRITEs are not, except one in every `SQ_DEPTH / 2` so the
//! queue can be reclaimed. Completions are awaited on completion channels (no busy polling).
//!
//! ## Failures
//!
//! An error completion (retry exceeded, remote access error, ...) fails the read or write that
//! sees it with the verbs status string. rdma_cm `DISCONNECTED` ends the stream like a closed
//! TCP connection (reads return end of file once everything received was read), so the callers'
//! failover and standby-loss paths are the same as for TCP; `DEVICE_REMOVAL` is an error. A
//! queue pair forced into the error state flushes every posted work request, which reads and
//! writes report as "queue pair in error state". A peer that stays connected but silent is the
//! heartbeats' business (in `rmc-mc`).

use std::collections::VecDeque;
use std::ffi::CStr;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::raw::c_int;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdma_sys::*;
use rmc_staging::{Slot, SlotRing, StagingRegion};
use tracing::{debug, info};

use crate::wire::RegionKey;

/// Bytes per send or receive buffer of the control stream.
pub const BUF_SIZE: usize = 64 * 1024;
/// Receive buffers kept posted.
pub const RECV_BUFS: usize = 32;
/// Send buffers.
pub const SEND_BUFS: usize = 16;
/// Work requests the send queue holds.
pub const SQ_DEPTH: u32 = 128;
/// Largest single RDMA WRITE (larger areas are split).
const MAX_WRITE: usize = 1 << 30;
/// Work request id of a signaled WRITE (SEND ids are buffer numbers).
const WRITE_ID: u64 = u64::MAX;
/// Timeout of address and route resolution.
const RESOLVE_MS: c_int = 2000;
/// `RDMA_OPTION_ID` and `RDMA_OPTION_ID_ACK_TIMEOUT` of <rdma/rdma_cma.h> (not in the
/// generated bindings).
const RDMA_OPTION_ID: c_int = 0;
const RDMA_OPTION_ID_ACK_TIMEOUT: c_int = 3;
/// Local ACK timeout exponent: 4.096 us x 2^14 = 67 ms per try; with 7 retries a peer that
/// stopped acknowledging is reported (IBV_WC_RETRY_EXC_ERR) within about half a second.
const ACK_TIMEOUT: u8 = 14;

/// Sets the QP's ACK timeout through rdma_cm (before connect or accept). Older kernels lack
/// the option: then the route's default stays, and heartbeats still catch a silent peer.
fn set_ack_timeout(id: *mut rdma_cm_id) {
    let mut t = ACK_TIMEOUT;
    // SAFETY: the id is live; optval points to one byte, as the option expects.
    let rc = unsafe {
        rdma_set_option(
            id,
            RDMA_OPTION_ID,
            RDMA_OPTION_ID_ACK_TIMEOUT,
            (&mut t as *mut u8).cast(),
            1,
        )
    };
    if rc != 0 {
        debug!(
            "rdma_set_option(ACK_TIMEOUT) failed: {}",
            io::Error::last_os_error()
        );
    }
}

/// An `io::Error` for a failed call that set `errno`.
fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// An `io::Error` for a call that returns an errno value (the verbs data-path calls do).
fn errno_err(what: &str, rc: c_int) -> io::Error {
    let e = io::Error::from_raw_os_error(rc.abs());
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(rc: c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(os_err(what))
    }
}

fn set_nonblocking(fd: c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(os_err("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: forever). Returns which
/// were readable.
fn wait_readable(fds: &[c_int], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as c_int);
    // SAFETY: `p` is a valid array of `p.len()` pollfd structs that outlives the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

fn event_name(kind: rdma_cm_event_type::Type) -> String {
    // SAFETY: rdma_event_str returns a pointer to a static string for any value.
    let s = unsafe { CStr::from_ptr(rdma_event_str(kind)) };
    s.to_string_lossy().into_owned()
}

fn wc_status_name(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a pointer to a static string for any value.
    let s = unsafe { CStr::from_ptr(ibv_wc_status_str(status)) };
    s.to_string_lossy().into_owned()
}

/// A socket address as the `sockaddr_storage` rdma_cm takes.
fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

/// Reads a `sockaddr` rdma_cm filled in.
///
/// # Safety
/// `sa` must point to a sockaddr of the size its family implies.
unsafe fn from_sockaddr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees `sa` is valid for its family's size.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// An rdma_cm event channel (one per listener and one per connection).
struct EventChannel(*mut rdma_event_channel);

struct CmEvent {
    kind: rdma_cm_event_type::Type,
    status: c_int,
    id: *mut rdma_cm_id,
}

impl EventChannel {
    fn new() -> io::Result<Self> {
        // SAFETY: no arguments; a null return is handled.
        let ch = unsafe { rdma_create_event_channel() };
        if ch.is_null() {
            return Err(os_err(
                "rdma_create_event_channel (is librdmacm installed and /dev/infiniband/rdma_cm present?)",
            ));
        }
        let ch = EventChannel(ch);
        set_nonblocking(ch.fd())?;
        Ok(ch)
    }

    fn fd(&self) -> c_int {
        // SAFETY: self.0 is a live channel until drop.
        unsafe { (*self.0).fd }
    }

    /// The next event, acknowledged, or `None` when `timeout` passes first.
    fn next(&self, timeout: Option<Duration>) -> io::Result<Option<CmEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut ev: *mut rdma_cm_event = ptr::null_mut();
            // SAFETY: the channel is live; `ev` receives an event we acknowledge below.
            let rc = unsafe { rdma_get_cm_event(self.0, &mut ev) };
            if rc == 0 {
                // SAFETY: rdma_get_cm_event succeeded, so `ev` points to a valid event until
                // it is acknowledged; we copy what we need first.
                let out = unsafe {
                    let e = &*ev;
                    let out = CmEvent {
                        kind: e.event,
                        status: e.status,
                        id: e.id,
                    };
                    rdma_ack_cm_event(ev);
                    out
                };
                return Ok(Some(out));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(io::Error::new(e.kind(), format!("rdma_get_cm_event: {e}")));
            }
            let left = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    Some(d - now)
                }
                None => None,
            };
            wait_readable(&[self.fd()], left)?;
        }
    }

    /// Waits for `want`; any other event, or none within `timeout`, is an error explained
    /// with `context`.
    fn expect(
        &self,
        want: rdma_cm_event_type::Type,
        timeout: Duration,
        context: &str,
    ) -> io::Result<CmEvent> {
        match self.next(Some(timeout))? {
            Some(ev) if ev.kind == want => Ok(ev),
            Some(ev) => {
                use rdma_cm_event_type::*;
                let hint = match ev.kind {
                    RDMA_CM_EVENT_ADDR_ERROR => {
                        " (no RDMA device serves the route to this address: see `rmc devices`)"
                    }
                    RDMA_CM_EVENT_REJECTED => {
                        " (nothing accepts RDMA connections there: is `rmc standby --transport rdma` running on that address and port?)"
                    }
                    RDMA_CM_EVENT_UNREACHABLE => " (the peer's RDMA device did not answer)",
                    _ => "",
                };
                Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "{context}: rdma_cm reported {} (status {}){hint}",
                        event_name(ev.kind),
                        ev.status
                    ),
                ))
            }
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{context}: no {} event within {timeout:?}",
                    event_name(want)
                ),
            )),
        }
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel was destroyed or migrated before (owners drop in
        // that order) and every event was acknowledged in `next`.
        unsafe { rdma_destroy_event_channel(self.0) };
    }
}

/// A registered staging region: the MR and the ring that keeps its memory alive.
struct StagingMr {
    mr: *mut ibv_mr,
    _ring: SlotRing,
}

/// Everything of one connection. Dropped when its last handle ([`Rx`], [`Tx`], [`Closer`]) is.
struct Shared {
    id: *mut rdma_cm_id,
    pd: *mut ibv_pd,
    send_cc: *mut ibv_comp_channel,
    recv_cc: *mut ibv_comp_channel,
    send_cq: *mut ibv_cq,
    recv_cq: *mut ibv_cq,
    qp: bool,
    bufs: *mut u8,
    bufs_len: usize,
    bufs_mr: *mut ibv_mr,
    staging: Mutex<Option<StagingMr>>,
    connected: AtomicBool,
    /// rdma_cm reported DISCONNECTED (or we disconnected): reads end at end of file.
    disconnected: AtomicBool,
    peer: SocketAddr,
    device: String,
    // Last: dropped after the id that lives on it.
    channel: EventChannel,
}

// SAFETY: the verbs and rdma_cm objects are thread-safe for the calls made on them (libibverbs
// serializes posting per queue; CQs are polled by one owner each: the receive CQ by `Rx`, the
// send CQ by `Tx`). The receive buffers are touched only by `Rx` and the send buffers only by
// `Tx`, which are not cloneable, and the staging MR is behind a mutex.
unsafe impl Send for Shared {}
// SAFETY: see `Send`; shared access is limited to the atomics, the mutex and thread-safe calls.
unsafe impl Sync for Shared {}

impl Shared {
    fn empty(channel: EventChannel, id: *mut rdma_cm_id, peer: SocketAddr) -> Self {
        Shared {
            id,
            pd: ptr::null_mut(),
            send_cc: ptr::null_mut(),
            recv_cc: ptr::null_mut(),
            send_cq: ptr::null_mut(),
            recv_cq: ptr::null_mut(),
            qp: false,
            bufs: ptr::null_mut(),
            bufs_len: 0,
            bufs_mr: ptr::null_mut(),
            staging: Mutex::new(None),
            connected: AtomicBool::new(false),
            disconnected: AtomicBool::new(false),
            peer,
            device: String::new(),
            channel,
        }
    }

    /// Creates the protection domain, completion queues, the RC queue pair and the control
    /// buffers on the device the id was bound to, and posts the receives.
    fn setup(&mut self) -> io::Result<()> {
        // SAFETY: self.id is a live id bound to a device (route resolved or connect request),
        // so `verbs` is a valid context; every object created is stored in self and destroyed
        // in Drop, in reverse order; null returns are errors.
        unsafe {
            let verbs = (*self.id).verbs;
            if verbs.is_null() {
                return Err(io::Error::other("rdma_cm id is not bound to a device"));
            }
            self.device = CStr::from_ptr(ibv_get_device_name((*verbs).device))
                .to_string_lossy()
                .into_owned();
            self.pd = ibv_alloc_pd(verbs);
            if self.pd.is_null() {
                return Err(os_err("ibv_alloc_pd"));
            }
            self.send_cc = ibv_create_comp_channel(verbs);
            self.recv_cc = ibv_create_comp_channel(verbs);
            if self.send_cc.is_null() || self.recv_cc.is_null() {
                return Err(os_err("ibv_create_comp_channel"));
            }
            set_nonblocking((*self.send_cc).fd)?;
            set_nonblocking((*self.recv_cc).fd)?;
            self.send_cq =
                ibv_create_cq(verbs, SQ_DEPTH as c_int, ptr::null_mut(), self.send_cc, 0);
            self.recv_cq =
                ibv_create_cq(verbs, RECV_BUFS as c_int, ptr::null_mut(), self.recv_cc, 0);
            if self.send_cq.is_null() || self.recv_cq.is_null() {
                return Err(os_err("ibv_create_cq"));
            }
            let mut attr: ibv_qp_init_attr = mem::zeroed();
            attr.send_cq = self.send_cq;
            attr.recv_cq = self.recv_cq;
            attr.qp_type = ibv_qp_type::IBV_QPT_RC;
            attr.sq_sig_all = 0;
            attr.cap.max_send_wr = SQ_DEPTH;
            attr.cap.max_recv_wr = RECV_BUFS as u32;
            attr.cap.max_send_sge = 1;
            attr.cap.max_recv_sge = 1;
            check(
                rdma_create_qp(self.id, self.pd, &mut attr),
                "rdma_create_qp (RC)",
            )?;
            self.qp = true;
            self.bufs_len = (RECV_BUFS + SEND_BUFS) * BUF_SIZE;
            self.bufs = Box::into_raw(vec![0u8; self.bufs_len].into_boxed_slice()).cast();
            self.bufs_mr = ibv_reg_mr(
                self.pd,
                self.bufs.cast(),
                self.bufs_len,
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as c_int,
            );
            if self.bufs_mr.is_null() {
                return Err(os_err("ibv_reg_mr (control buffers)"));
            }
        }
        for i in 0..RECV_BUFS {
            self.post_recv(i)?;
        }
        Ok(())
    }

    fn qp(&self) -> *mut ibv_qp {
        // SAFETY: the id is live while self is.
        unsafe { (*self.id).qp }
    }

    fn buf(&self, i: usize) -> *mut u8 {
        debug_assert!(i < RECV_BUFS + SEND_BUFS);
        // SAFETY: i is in range, so the offset stays inside the buffer allocation.
        unsafe { self.bufs.add(i * BUF_SIZE) }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: bufs_mr is registered once setup succeeded (all callers run after it).
        unsafe { (*self.bufs_mr).lkey }
    }

    /// Posts receive buffer `i` (0..RECV_BUFS).
    fn post_recv(&self, i: usize) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: self.buf(i) as u64,
            length: BUF_SIZE as u32,
            lkey: self.lkey(),
        };
        let mut wr = ibv_recv_wr {
            wr_id: i as u64,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` are valid for the call (the provider copies
        // them); the buffer is registered and owned by the receive side until it completes.
        let rc = unsafe { ibv_post_recv(self.qp(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(errno_err("ibv_post_recv", rc));
        }
        Ok(())
    }

    /// The queue pair's current state.
    fn qp_state(&self) -> io::Result<ibv_qp_state::Type> {
        // SAFETY: all-zero is a valid ibv_qp_attr to be filled in.
        let mut attr: ibv_qp_attr = unsafe { mem::zeroed() };
        // SAFETY: all-zero is a valid ibv_qp_init_attr to be filled in.
        let mut init: ibv_qp_init_attr = unsafe { mem::zeroed() };
        // SAFETY: the QP is live; both out-structs are valid for the call.
        let rc = unsafe {
            ibv_query_qp(
                self.qp(),
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
                &mut init,
            )
        };
        if rc != 0 {
            return Err(errno_err("ibv_query_qp", rc));
        }
        Ok(attr.qp_state)
    }

    fn disconnect(&self) {
        self.disconnected.store(true, Ordering::Release);
        if self.connected.swap(false, Ordering::AcqRel) {
            // SAFETY: the id is live; rdma_disconnect moves the QP to the error state, which
            // flushes posted work requests and wakes any thread waiting for them.
            unsafe { rdma_disconnect(self.id) };
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.disconnect();
        // SAFETY: each object is destroyed once, after everything that depends on it, and only
        // if it was created; no other handle exists (this is the last Arc).
        unsafe {
            if self.qp {
                rdma_destroy_qp(self.id);
            }
            if let Some(s) = self.staging.get_mut().take() {
                ibv_dereg_mr(s.mr);
            }
            if !self.bufs_mr.is_null() {
                ibv_dereg_mr(self.bufs_mr);
            }
            if !self.send_cq.is_null() {
                ibv_destroy_cq(self.send_cq);
            }
            if !self.recv_cq.is_null() {
                ibv_destroy_cq(self.recv_cq);
            }
            if !self.send_cc.is_null() {
                ibv_destroy_comp_channel(self.send_cc);
            }
            if !self.recv_cc.is_null() {
                ibv_destroy_comp_channel(self.recv_cc);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            rdma_destroy_id(self.id);
            if !self.bufs.is_null() {
                drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
                    self.bufs,
                    self.bufs_len,
                )));
            }
        }
    }
}

fn conn_param() -> rdma_conn_param {
    // SAFETY: all-zero is a valid rdma_conn_param (no private data).
    let mut p: rdma_conn_param = unsafe { mem::zeroed() };
    p.responder_resources = 1;
    p.initiator_depth = 1;
    // Transport retries before an error completion (IBV_WC_RETRY_EXC_ERR): a dead peer is
    // reported after a few hundred milliseconds to seconds; heartbeats usually notice first.
    p.retry_count = 7;
    // Receiver not ready: 7 = retry forever. The receiver re-posts a buffer as soon as it has
    // read it, so RNR only means "reader busy"; a reader that stopped is caught by heartbeats.
    p.rnr_retry_count = 7;
    p
}

/// Creates an rdma_cm id on `channel`.
fn create_id(channel: &EventChannel) -> io::Result<*mut rdma_cm_id> {
    let mut id: *mut rdma_cm_id = ptr::null_mut();
    // SAFETY: the channel is live; `id` receives a new id we own.
    let rc = unsafe {
        rdma_create_id(
            channel.0,
            &mut id,
            ptr::null_mut(),
            rdma_port_space::RDMA_PS_TCP,
        )
    };
    check(rc, "rdma_create_id")?;
    Ok(id)
}

/// A connected RC queue pair to the peer, with its control stream.
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("rdma::Connection")
            .field("peer", &self.shared.peer)
            .field("device", &self.shared.device)
            .finish()
    }
}

impl Connection {
    /// Resolves `addr` to an RDMA device and route with rdma_cm and connects to the
    /// [`Listener`] there.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Connection> {
        let channel = EventChannel::new()?;
        let id = create_id(&channel)?;
        let mut sh = Shared::empty(channel, id, addr);
        let mut dst = to_sockaddr(addr);
        // SAFETY: the id is live; `dst` is a valid sockaddr for the call's duration.
        let rc = unsafe {
            rdma_resolve_addr(
                id,
                ptr::null_mut(),
                (&mut dst as *mut libc::sockaddr_storage).cast(),
                RESOLVE_MS,
            )
        };
        check(rc, "rdma_resolve_addr")?;
        let ctx = format!("Resolving {} for RDMA", addr.ip());
        let wait = Duration::from_millis(RESOLVE_MS as u64 + 1000);
        sh.channel
            .expect(rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED, wait, &ctx)?;
        // SAFETY: the id is live and its address resolved.
        let rc = unsafe { rdma_resolve_route(id, RESOLVE_MS) };
        check(rc, "rdma_resolve_route")?;
        sh.channel.expect(
            rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            wait,
            &format!("Resolving the RDMA route to {}", addr.ip()),
        )?;
        sh.setup()?;
        set_ack_timeout(id);
        let mut param = conn_param();
        // SAFETY: the id is live with a QP; `param` is valid for the call.
        check(unsafe { rdma_connect(id, &mut param) }, "rdma_connect")?;
        sh.channel.expect(
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            timeout,
            &format!("Connecting to {addr} over RDMA"),
        )?;
        sh.connected.store(true, Ordering::Release);
        info!(peer = %addr, device = %sh.device, "RDMA connection established (RC queue pair)");
        Ok(Connection {
            shared: Arc::new(sh),
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The local RDMA device the connection runs on.
    pub fn device(&self) -> &str {
        &self.shared.device
    }

    /// Splits the connection into its receiving and sending halves and a handle to close it.
    /// Reads return `WouldBlock` after `read_timeout` without data; a send that needs a free
    /// buffer or send-queue entry fails when the peer acknowledged nothing for `send_timeout`
    /// (it is gone, or its link is).
    /// A handle that closes this connection from any thread, before or after it is split.
    pub fn closer(&self) -> Closer {
        Closer {
            sh: self.shared.clone(),
        }
    }

    pub fn split(self, read_timeout: Duration, send_timeout: Duration) -> (Rx, Tx, Closer) {
        let sh = self.shared;
        (
            Rx {
                sh: sh.clone(),
                cur: None,
                timeout: read_timeout,
            },
            Tx {
                sh: sh.clone(),
                free: (RECV_BUFS..RECV_BUFS + SEND_BUFS).rev().collect(),
                cur: None,
                used: 0,
                since_signal: 0,
                pending: VecDeque::new(),
                placement: None,
                send_timeout,
            },
            Closer { sh },
        )
    }
}

/// Listens for RDMA connections on an address (rdma_cm).
pub struct Listener {
    id: *mut rdma_cm_id,
    addr: SocketAddr,
    channel: EventChannel,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("rdma::Listener")
            .field("addr", &self.addr)
            .finish()
    }
}

// SAFETY: the listening id and its channel are used only through &self by one accepting thread
// at a time (accept takes &self but rdma_cm calls on a listening id are thread-safe).
unsafe impl Send for Listener {}

impl Listener {
    /// Binds `addr` (port 0: any free port) and listens.
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let channel = EventChannel::new()?;
        let id = create_id(&channel)?;
        let mut l = Listener { id, addr, channel };
        let mut sa = to_sockaddr(addr);
        // SAFETY: the id is live; `sa` is a valid sockaddr for the call.
        let rc = unsafe { rdma_bind_addr(id, (&mut sa as *mut libc::sockaddr_storage).cast()) };
        check(rc, &format!("rdma_bind_addr({addr})"))?;
        // SAFETY: the id is bound.
        check(unsafe { rdma_listen(id, 4) }, "rdma_listen")?;
        // SAFETY: the id is bound, so its source address is filled in and lives with the id.
        if let Some(a) = unsafe { from_sockaddr(rdma_get_local_addr(&*id)) } {
            l.addr = a;
        }
        Ok(l)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for a connection request and accepts it.
    pub fn accept(&self) -> io::Result<Connection> {
        loop {
            let ev = match self.channel.next(None)? {
                Some(ev) => ev,
                None => continue,
            };
            if ev.kind != rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                debug!(event = %event_name(ev.kind), "rdma_cm event on the listener ignored");
                continue;
            }
            match accept_request(ev.id) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    // A failed accept concerns that one peer: report it, the listener stays.
                    return Err(io::Error::new(
                        e.kind(),
                        format!("accepting an RDMA connection: {e}"),
                    ));
                }
            }
        }
    }
}

fn accept_request(child: *mut rdma_cm_id) -> io::Result<Connection> {
    let channel = EventChannel::new()?;
    // SAFETY: `child` is the new id of a connect request whose event was acknowledged; moving
    // it to its own channel keeps its later events (DISCONNECTED) away from the listener.
    if unsafe { rdma_migrate_id(child, channel.0) } != 0 {
        let e = os_err("rdma_migrate_id");
        // SAFETY: the child id is ours to reject and destroy.
        unsafe {
            rdma_reject(child, ptr::null(), 0);
            rdma_destroy_id(child);
        }
        return Err(e);
    }
    // SAFETY: the child's destination address was filled in by the connect request.
    let peer = unsafe { from_sockaddr(rdma_get_peer_addr(&*child)) }
        .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let mut sh = Shared::empty(channel, child, peer);
    if let Err(e) = sh.setup() {
        // SAFETY: the child is live and not yet accepted.
        unsafe { rdma_reject(child, ptr::null(), 0) };
        return Err(e);
    }
    set_ack_timeout(child);
    let mut param = conn_param();
    // SAFETY: the child is live with a QP and posted receives; `param` is valid for the call.
    check(unsafe { rdma_accept(child, &mut param) }, "rdma_accept")?;
    sh.channel.expect(
        rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
        Duration::from_secs(10),
        &format!("Accepting an RDMA connection from {peer}"),
    )?;
    sh.connected.store(true, Ordering::Release);
    info!(%peer, device = %sh.device, "RDMA connection accepted (RC queue pair)");
    Ok(Connection {
        shared: Arc::new(sh),
    })
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: the listening id is ours; the channel is dropped after it (field order).
        unsafe { rdma_destroy_id(self.id) };
    }
}

/// Waits for the next completion on `cq` (armed through `cc`), or until `timeout` passes
/// (`None`), or until `also` (another descriptor) becomes readable (`Some(None)` then).
enum Waited {
    Completion(ibv_wc),
    TimedOut,
    Other,
}

fn next_completion(
    cq: *mut ibv_cq,
    cc: *mut ibv_comp_channel,
    timeout: Duration,
    also: Option<c_int>,
) -> io::Result<Waited> {
    let deadline = Instant::now() + timeout;
    let mut armed = false;
    loop {
        // SAFETY: all-zero is a valid ibv_wc to be overwritten.
        let mut wc: ibv_wc = unsafe { mem::zeroed() };
        // SAFETY: cq is live while its connection is; one entry fits in `wc`.
        let n = unsafe { ibv_poll_cq(cq, 1, &mut wc) };
        if n < 0 {
            return Err(errno_err("ibv_poll_cq", n));
        }
        if n == 1 {
            return Ok(Waited::Completion(wc));
        }
        if !armed {
            // SAFETY: cq is live. Arm, then poll again to close the race with a completion
            // that arrived before arming.
            let rc = unsafe { ibv_req_notify_cq(cq, 0) };
            if rc != 0 {
                return Err(errno_err("ibv_req_notify_cq", rc));
            }
            armed = true;
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited::TimedOut);
        }
        // SAFETY: cc is live while its connection is.
        let cc_fd = unsafe { (*cc).fd };
        let mut fds = vec![cc_fd];
        fds.extend(also);
        let ready = wait_readable(&fds, Some(deadline - now))?;
        if ready[0] {
            let mut ev_cq: *mut ibv_cq = ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = ptr::null_mut();
            // SAFETY: cc is live and non-blocking; an event we get is acknowledged at once.
            if unsafe { ibv_get_cq_event(cc, &mut ev_cq, &mut ctx) } == 0 {
                // SAFETY: ev_cq is the CQ the event was for (ours), acked exactly once.
                unsafe { ibv_ack_cq_events(ev_cq, 1) };
                armed = false;
            }
        }
        if ready.get(1).copied().unwrap_or(false) {
            return Ok(Waited::Other);
        }
    }
}

fn wc_error(side: &str, wc: &ibv_wc) -> io::Error {
    let status = wc_status_name(wc.status);
    if wc.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
        return io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("RDMA {side} flushed: the queue pair is in the error state ({status})"),
        );
    }
    let kind = if wc.status == ibv_wc_status::IBV_WC_RETRY_EXC_ERR {
        io::ErrorKind::TimedOut
    } else {
        io::ErrorKind::ConnectionAborted
    };
    io::Error::new(
        kind,
        format!(
            "RDMA {side} completion failed: {status} (status {}, vendor error {:#x})",
            wc.status, wc.vendor_err
        ),
    )
}

/// The receiving half: the control stream, read from pre-posted receive buffers.
pub struct Rx {
    sh: Arc<Shared>,
    /// The buffer being read: (index, length, read position).
    cur: Option<(usize, usize, usize)>,
    timeout: Duration,
}

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("rdma::Rx")
            .field("peer", &self.sh.peer)
            .finish()
    }
}

impl Rx {
    /// Handles the connection's rdma_cm events. Returns an error for a device removal.
    fn cm_events(&mut self) -> io::Result<()> {
        while let Some(ev) = self.sh.channel.next(Some(Duration::ZERO))? {
            use rdma_cm_event_type::*;
            match ev.kind {
                RDMA_CM_EVENT_DISCONNECTED => {
                    info!(peer = %self.sh.peer, "rdma_cm: DISCONNECTED");
                    self.sh.connected.store(false, Ordering::Release);
                    self.sh.disconnected.store(true, Ordering::Release);
                }
                RDMA_CM_EVENT_DEVICE_REMOVAL => {
                    self.sh.disconnected.store(true, Ordering::Release);
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "RDMA device {} was removed (rdma_cm DEVICE_REMOVAL)",
                            self.sh.device
                        ),
                    ));
                }
                other => debug!(event = %event_name(other), "rdma_cm event"),
            }
        }
        Ok(())
    }

    /// The next received buffer; `None` at end of stream; `WouldBlock` after the timeout.
    fn next_buffer(&mut self) -> io::Result<Option<(usize, usize)>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let cm_fd = self.sh.channel.fd();
            match next_completion(self.sh.recv_cq, self.sh.recv_cc, left, Some(cm_fd))? {
                Waited::Completion(wc) => {
                    if wc.status == ibv_wc_status::IBV_WC_SUCCESS {
                        let i = wc.wr_id as usize;
                        if i >= RECV_BUFS {
                            return Err(io::Error::other(format!(
                                "receive completion for unknown buffer {i}"
                            )));
                        }
                        if wc.byte_len == 0 {
                            self.sh.post_recv(i)?;
                            continue;
                        }
                        return Ok(Some((i, wc.byte_len as usize)));
                    }
                    if wc.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                        // Flushed because the peer disconnected (end of stream), or because
                        // the queue pair failed: the pending rdma_cm event tells which.
                        self.cm_events()?;
                        if self.sh.disconnected.load(Ordering::Acquire) {
                            return Ok(None);
                        }
                    }
                    return Err(wc_error("receive", &wc));
                }
                Waited::Other => self.cm_events()?,
                Waited::TimedOut => {
                    self.cm_events()?;
                    if self.sh.disconnected.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    // Some providers do not flush posted receives when the QP fails: ask.
                    if self.sh.qp_state()? == ibv_qp_state::IBV_QPS_ERR {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "RDMA receive impossible: the queue pair is in the error state",
                        ));
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "no RDMA receive completion within the read timeout",
                    ));
                }
            }
        }
    }
}

impl Read for Rx {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.cur.is_none() {
            match self.next_buffer()? {
                Some((i, len)) => self.cur = Some((i, len, 0)),
                None => return Ok(0),
            }
        }
        let (i, len, pos) = self.cur.expect("set above");
        let n = out.len().min(len - pos);
        // SAFETY: buffer i is a registered receive buffer whose completion we consumed: the
        // device wrote `len` bytes and will not touch it until we re-post it below.
        let src = unsafe { std::slice::from_raw_parts(self.sh.buf(i).add(pos), n) };
        out[..n].copy_from_slice(src);
        if pos + n == len {
            self.cur = None;
            self.sh.post_recv(i)?;
        } else {
            self.cur = Some((i, len, pos + n));
        }
        Ok(n)
    }
}

/// Where the sending half RDMA-writes epoch bodies.
struct Placement {
    lkey: u32,
    local: *const u8,
    local_stride: usize,
    remote: RegionKey,
}

/// The sending half: the control stream as SENDs, and [`Tx::place`] for epoch bodies.
pub struct Tx {
    sh: Arc<Shared>,
    free: Vec<usize>,
    /// The send buffer being filled: (index, bytes in it).
    cur: Option<(usize, usize)>,
    /// Work requests in the send queue not yet known to be complete.
    used: u32,
    /// Unsignaled work requests posted since the last signaled one.
    since_signal: u32,
    /// Signaled work requests in flight: (id, work requests their completion retires).
    pending: VecDeque<(u64, u32)>,
    placement: Option<Placement>,
    send_timeout: Duration,
}

// SAFETY: `placement.local` points into a staging region kept alive by the MR record in
// `Shared`; everything else is Send (see `Shared`).
unsafe impl Send for Tx {}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("rdma::Tx")
            .field("peer", &self.sh.peer)
            .field("placement", &self.placement.is_some())
            .finish()
    }
}

/// Registers `ring`'s region on the connection's protection domain (once per connection).
fn register(sh: &Shared, ring: &SlotRing, remote_write: bool) -> io::Result<*mut ibv_mr> {
    let region: &StagingRegion = ring.region();
    let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    if remote_write {
        access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    let t = Instant::now();
    // SAFETY: the region is a live mapping of `len` bytes; the ring clone stored next to the
    // MR keeps it mapped until the MR is deregistered (in Shared's Drop).
    let mr = unsafe { ibv_reg_mr(sh.pd, region.as_ptr().cast(), region.len(), access as c_int) };
    if mr.is_null() {
        return Err(os_err(
            "ibv_reg_mr (staging region; as a normal user `ulimit -l` must cover it)",
        ));
    }
    let mut slot = sh.staging.lock();
    if let Some(old) = slot.take() {
        // SAFETY: the previous registration is no longer used by any work request (a
        // connection registers once; this only happens if a caller registers twice).
        unsafe { ibv_dereg_mr(old.mr) };
    }
    *slot = Some(StagingMr {
        mr,
        _ring: ring.clone(),
    });
    info!(
        bytes = region.len(),
        remote_write,
        ms = t.elapsed().as_millis() as u64,
        "staging region registered"
    );
    Ok(mr)
}

impl Tx {
    /// Standby side: registers `ring`'s region for remote writes and returns the key the
    /// primary needs (sent in `RegionKey`).
    pub fn expose(&mut self, ring: &SlotRing) -> io::Result<RegionKey> {
        let mr = register(&self.sh, ring, true)?;
        let region = ring.region();
        Ok(RegionKey {
            addr: region.as_ptr() as u64,
            len: region.len() as u64,
            slot_stride: region.layout().slot_size() as u64,
            // SAFETY: mr was just registered and is live.
            rkey: unsafe { (*mr).rkey },
        })
    }

    /// Primary side: registers `ring`'s region (local access only) and remembers where the
    /// standby's slots are, so [`Tx::place`] can write into them. Checks that the standby's
    /// region has the same slot stride and room for every slot.
    pub fn enable_placement(&mut self, ring: &SlotRing, remote: RegionKey) -> io::Result<()> {
        let region = ring.region();
        let stride = region.layout().slot_size();
        let need = stride as u64 * region.slot_count() as u64;
        if remote.slot_stride != stride as u64 || remote.len < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the standby's staging region (stride {}, {} bytes) does not match ours (stride {stride}, {need} bytes)",
                    remote.slot_stride, remote.len
                ),
            ));
        }
        let mr = register(&self.sh, ring, false)?;
        self.placement = Some(Placement {
            // SAFETY: mr was just registered and is live.
            lkey: unsafe { (*mr).lkey },
            local: region.as_ptr(),
            local_stride: stride,
            remote,
        });
        Ok(())
    }

    /// Waits until every work request posted so far has completed (posts a signaled SEND of
    /// one byte behind them; the peer's stream gets that byte).
    pub fn drain(&mut self) -> io::Result<()> {
        self.write_all(&[0])?;
        self.flush()?;
        while !self.pending.is_empty() {
            self.reap()?;
        }
        Ok(())
    }

    /// Whether [`Tx::place`] can be used.
    pub fn can_place(&self) -> bool {
        self.placement.is_some()
    }

    /// RDMA-writes the used parts of `slot` (index, pages and, with `state`, the state blob)
    /// into the standby's slot of the same number. Returns the body length. The writes are
    /// unsignaled; a SEND posted afterwards on this queue pair is seen by the standby only
    /// after their data.
    pub fn place(&mut self, slot: &Slot, state: bool) -> io::Result<u64> {
        let p = self
            .placement
            .as_ref()
            .ok_or_else(|| io::Error::other("RDMA placement is not set up"))?;
        let layout = slot.layout();
        let mut areas = vec![
            (0, slot.pages() * 8),
            (layout.data_offset(), slot.pages() * rmc_staging::PAGE_BYTES),
        ];
        if state {
            areas.push((layout.state_offset(), slot.state().len()));
        }
        let local_base = p.local as u64 + (slot.index() * p.local_stride) as u64;
        let remote_base = p.remote.addr + slot.index() as u64 * p.remote.slot_stride;
        let (lkey, rkey) = (p.lkey, p.remote.rkey);
        let mut total = 0u64;
        for (off, len) in areas {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(MAX_WRITE);
                let o = (off + done) as u64;
                self.post_write(local_base + o, lkey, remote_base + o, rkey, n as u32)?;
                done += n;
            }
            total += len as u64;
        }
        Ok(total)
    }

    fn post_write(
        &mut self,
        local: u64,
        lkey: u32,
        remote: u64,
        rkey: u32,
        len: u32,
    ) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: local,
            length: len,
            lkey,
        };
        // SAFETY: all-zero is a valid ibv_send_wr to fill in.
        let mut wr: ibv_send_wr = unsafe { mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        wr.wr.rdma = rdma_t {
            remote_addr: remote,
            rkey,
        };
        let signal = self.since_signal + 1 >= SQ_DEPTH / 2;
        self.post(&mut wr, WRITE_ID, signal)
    }

    /// Retires the send completions already there without waiting, so an error completion
    /// (peer gone, retries exceeded, queue pair in error) surfaces at the next send.
    fn reap_ready(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            // SAFETY: all-zero is a valid ibv_wc to be overwritten.
            let mut wc: ibv_wc = unsafe { mem::zeroed() };
            // SAFETY: the send CQ is live while the connection is; one entry fits in `wc`.
            let n = unsafe { ibv_poll_cq(self.sh.send_cq, 1, &mut wc) };
            if n < 0 {
                return Err(errno_err("ibv_poll_cq", n));
            }
            if n == 0 {
                return Ok(());
            }
            self.retire(&wc)?;
        }
        Ok(())
    }

    /// Accounts for one send completion.
    fn retire(&mut self, wc: &ibv_wc) -> io::Result<()> {
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            return Err(wc_error("send", wc));
        }
        let (id, covered) = self
            .pending
            .pop_front()
            .ok_or_else(|| io::Error::other("unexpected send completion"))?;
        if id != wc.wr_id {
            return Err(io::Error::other(format!(
                "send completion for work request {} while {id} was expected",
                wc.wr_id
            )));
        }
        self.used -= covered;
        if (id as usize) < RECV_BUFS + SEND_BUFS {
            self.free.push(id as usize);
        }
        Ok(())
    }

    /// Posts `wr`, waiting for room in the send queue first.
    fn post(&mut self, wr: &mut ibv_send_wr, id: u64, signaled: bool) -> io::Result<()> {
        self.reap_ready()?;
        while self.used + 1 > SQ_DEPTH || (self.used > 0 && self.since_signal + 1 >= SQ_DEPTH) {
            self.reap()?;
        }
        wr.wr_id = id;
        if signaled {
            wr.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; `wr` and its sge are valid for the call (the provider copies
        // them); the local memory is registered and stays untouched until the completion that
        // retires it (send buffers return to `free` only then; staging slots are held by the
        // caller until the epoch is acknowledged, which is after this completes).
        let rc = unsafe { ibv_post_send(self.sh.qp(), wr, &mut bad) };
        if rc != 0 {
            return Err(errno_err("ibv_post_send", rc));
        }
        self.used += 1;
        if signaled {
            self.pending.push_back((id, self.since_signal + 1));
            self.since_signal = 0;
        } else {
            self.since_signal += 1;
        }
        Ok(())
    }

    /// Waits for at least one send completion and retires what it covers.
    fn reap(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Err(io::Error::other(
                "RDMA send queue full of unsignaled work requests",
            ));
        }
        let deadline = Instant::now() + self.send_timeout;
        loop {
            match next_completion(
                self.sh.send_cq,
                self.sh.send_cc,
                Duration::from_millis(100),
                None,
            )? {
                Waited::Completion(wc) => return self.retire(&wc),
                Waited::TimedOut | Waited::Other => {
                    if self.sh.disconnected.load(Ordering::Acquire) {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "RDMA connection closed while sending",
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the peer acknowledged none of our RDMA sends for {:?} (it is gone, or its link is)",
                                self.send_timeout
                            ),
                        ));
                    }
                }
            }
        }
    }

    fn post_cur(&mut self) -> io::Result<()> {
        let Some((i, len)) = self.cur.take() else {
            return Ok(());
        };
        let mut sge = ibv_sge {
            addr: self.sh.buf(i) as u64,
            length: len as u32,
            lkey: self.sh.lkey(),
        };
        // SAFETY: all-zero is a valid ibv_send_wr to fill in.
        let mut wr: ibv_send_wr = unsafe { mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        self.post(&mut wr, i as u64, true)
    }
}

impl Write for Tx {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.cur.is_none() {
            while self.free.is_empty() {
                self.reap()?;
            }
            self.cur = Some((self.free.pop().expect("not empty"), 0));
        }
        let (i, len) = self.cur.expect("set above");
        let n = data.len().min(BUF_SIZE - len);
        // SAFETY: send buffer i is ours (taken from `free`, not posted); the range is inside
        // it.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.sh.buf(i).add(len), n) };
        self.cur = Some((i, len + n));
        if len + n == BUF_SIZE {
            self.post_cur()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.post_cur()
    }
}

/// Closes a connection from any thread (wakes the halves with end of file / errors).
pub struct Closer {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("rdma::Closer").finish()
    }
}

impl Closer {
    /// Another handle to the same connection.
    pub fn handle(&self) -> Closer {
        Closer {
            sh: self.sh.clone(),
        }
    }

    /// Disconnects (rdma_disconnect): the peer sees DISCONNECTED, our queue pair goes to the
    /// error state and every posted work request is flushed.
    pub fn close(&self) {
        self.sh.disconnect();
    }

    /// Forces the queue pair into the error state without disconnecting (for tests of that
    /// failure): every posted work request on both sides of this QP is flushed.
    pub fn force_qp_error(&self) -> io::Result<()> {
        // SAFETY: all-zero is a valid ibv_qp_attr; only qp_state is read (mask IBV_QP_STATE).
        let mut attr: ibv_qp_attr = unsafe { mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: the QP is live; modifying to ERR is always allowed.
        let rc = unsafe {
            ibv_modify_qp(
                self.sh.qp(),
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
            )
        };
        if rc != 0 {
            return Err(errno_err("ibv_modify_qp(ERR)", rc));
        }
        Ok(())
    }
}
