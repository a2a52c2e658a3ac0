//! A reader that turns fuzzer bytes into values. It never fails: past the end of the input it
//! yields zeros, so every input, however short, is a complete run, and a longer input only
//! makes it go further.

/// Values interesting at boundaries, picked by [`Input::u64_edge`].
const EDGES: [u64; 12] = [
    0,
    1,
    2,
    4095,
    4096,
    4097,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    u64::MAX / 2,
    u64::MAX - 1,
    u64::MAX,
];

/// Fuzzer bytes, consumed front to back.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        a
    }

    /// Fills the front of `dst` with what is left, up to its length (the rest stays).
    pub fn fill(&mut self, dst: &mut [u8]) {
        let b = self.bytes(dst.len());
        dst[..b.len()].copy_from_slice(b);
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte (0 at the end).
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    /// Little endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    /// Little endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    /// Little endian.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }

    /// 32 bytes (a nonce or a proof).
    pub fn arr32(&mut self) -> [u8; 32] {
        self.fixed()
    }

    /// A coin.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A number below `n` (`n` > 0), from one byte when `n` <= 256.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        if n <= 256 {
            u64::from(self.u8()) % n
        } else if n <= 1 << 16 {
            u64::from(self.u16()) % n
        } else {
            self.u64() % n
        }
    }

    /// A u64 that is often a boundary value: one selector byte, then the value.
    pub fn u64_edge(&mut self) -> u64 {
        let s = self.u8();
        match s % 4 {
            0 => EDGES[usize::from(s / 4) % EDGES.len()],
            1 => u64::from(self.u8()),
            2 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }

    /// `base` moved by a small signed delta, or any u64 (one selector byte first).
    pub fn near(&mut self, base: u64) -> u64 {
        let s = self.u8();
        match s % 4 {
            0 => base,
            1 => base.wrapping_add(u64::from(s >> 2)),
            2 => base.wrapping_sub(u64::from(s >> 2)),
            _ => self.u64_edge(),
        }
    }
}

/// A small deterministic generator (xorshift64*), for the smoke tests and seed corpora; no
/// dependency, the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (`seed` 0 is replaced).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A copy of `input` with a few random edits (flip, set, insert, delete, truncate,
    /// duplicate a span), as a mutating fuzzer would make.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..1 + self.below(4) {
            let len = v.len() as u64;
            match self.below(6) {
                0 if len > 0 => {
                    let at = self.below(len) as usize;
                    v[at] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let at = self.below(len) as usize;
                    v[at] = self.next_u64() as u8;
                }
                2 => {
                    let at = self.below(len + 1) as usize;
                    v.insert(at, self.next_u64() as u8);
                }
                3 if len > 0 => {
                    v.remove(self.below(len) as usize);
                }
                4 => v.truncate(self.below(len + 1) as usize),
                _ if len > 0 => {
                    let a = self.below(len) as usize;
                    let b = a + self.below(len - a as u64 + 1).min(64) as usize;
                    let span = v[a..b].to_vec();
                    let at = self.below(v.len() as u64 + 1) as usize;
                    v.splice(at..at, span);
                }
                _ => v.push(self.next_u64() as u8),
            }
        }
        v
    }
}
