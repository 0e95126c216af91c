//! The serial frame format: a `Decoder` for what devices send and an `Encoder` for simulators.
//!
//! One frame per line, NMEA-style, readable with `cat` on a real port:
//!
//! ```text
//! $TH,<seq>,<value>,<unit>*<CC>\r\n             e.g.  $TH,42,42.914800,arb.units*30\r\n
//! $TH,<seq>,<value>,<unit>,<channel>*<CC>\r\n   e.g.  $TH,42,21.500000,degC,temperature*7B\r\n
//! ```
//!
//! The second form names the quantity measured (its channel: 1 to 32 of `A-Z a-z 0-9 _ . -`),
//! for devices that report several; a frame of the first form carries the device's default
//! channel. Both forms are checksummed alike, over every byte between `$` and `*`.
//!
//! A line ends at `\r`, `\n` or `\r\n`, as serial terminals send them: the first line-end
//! byte completes it (so a frame ending in a bare `\r` does not wait for the next one), and the
//! `\n` of a `\r\n` is then an empty line, skipped like any other, even when it arrives in a
//! later read. `<CC>` is two hex digits, the XOR of every byte between `$` and `*`. Bytes arrive from the
//! device's link (simulated duplex stream or tty) and leave as [`Frame`]s for the device task.
//! Bad input never fails the stream: the decoder skips it, resynchronises at the next `$` and
//! yields a [`Frame::Invalid`] with the reason so the device task can count it. Frame length is
//! bounded, so a line without a newline cannot make the buffer grow without limit.

use std::fmt::Write as _;

use bytes::{Buf, BytesMut};
use smol_str::SmolStr;
use tokio_util::codec::{Decoder, Encoder};

/// A sample as the device sent it, whole: what [`parse_line`] reads from one line and what the
/// [`Encoder`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSample {
    /// The device's own counter.
    pub seq: u32,
    /// The value as sent.
    pub value: f64,
    /// The unit token.
    pub unit: SmolStr,
    /// The channel the frame names, if it names one (the second frame form); `None` means the
    /// device's default channel.
    pub channel: Option<SmolStr>,
}

/// A sample as a decoder yields it, before the gateway stamps it: its unit and channel only
/// when they differ from the previous sample's.
///
/// A device repeats one unit (and channel) in frame after frame, so a decoder hands them out
/// once per change instead of once per sample: a sample is 24 bytes instead of 64, and a
/// consumer builds what it derives from the names (the device task's labels) once per change.
/// A consumer must therefore follow every sample of the stream in order: one that skips a
/// sample may skip a change of names.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSample {
    /// The device's own counter.
    pub seq: u32,
    /// The value as sent.
    pub value: f64,
    /// The unit and channel, when they are not those of the sample this codec yielded before
    /// (always for its first sample); `None` means the same as that one's.
    pub names: Option<Box<SampleNames>>,
}

/// The unit and channel a frame was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleNames {
    /// The unit token.
    pub unit: SmolStr,
    /// The channel the frame names, if it names one (the second frame form); `None` means the
    /// device's default channel.
    pub channel: Option<SmolStr>,
}

/// The names of one decoded stream, followed from sample to sample: what a consumer that wants
/// every sample whole (a test, a tool) keeps beside the decoder.
#[derive(Debug, Clone, Default)]
pub struct NameTrail {
    last: Option<SampleNames>,
}

impl NameTrail {
    /// `sample` whole, with the names it carries or else those of the sample before it; `None`
    /// for a sample without names before any sample with them, which one codec never yields.
    pub fn resolve(&mut self, sample: FrameSample) -> Option<RawSample> {
        if let Some(names) = sample.names {
            self.last = Some(*names);
        }
        let names = self.last.as_ref()?;
        Some(RawSample {
            seq: sample.seq,
            value: sample.value,
            unit: names.unit.clone(),
            channel: names.channel.clone(),
        })
    }
}

/// Why a frame was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// The checksum did not match the frame's bytes.
    Checksum,
    /// Not a well-formed frame: garbage, a missing field, a bad number, a truncated frame.
    Syntax,
    /// Longer than the configured maximum frame length.
    TooLong,
}

impl InvalidReason {
    /// Every reason, for metrics and snapshots.
    pub const ALL: [InvalidReason; 3] = [Self::Checksum, Self::Syntax, Self::TooLong];

    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Checksum => "checksum",
            Self::Syntax => "syntax",
            Self::TooLong => "too_long",
        }
    }

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One decoded item.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A valid data frame.
    Sample(FrameSample),
    /// A device's answer to a command: a line starting `OK:`, `ERROR:` or `STATUS:`.
    Reply(String),
    /// Skipped bytes, and why.
    Invalid(InvalidReason),
}

/// How a device's answers to commands begin.
pub const REPLY_PREFIXES: [&[u8]; 3] = [b"OK:", b"ERROR:", b"STATUS:"];

/// Decodes `$TH,...*CC` lines and encodes samples as such lines.
///
/// What it keeps between calls (a garbage run being skipped, the names of the last sample)
/// belongs to one stream: a clone continues that stream, and a new stream takes a new codec.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_len: usize,
    /// Inside an over-long frame or a run of garbage: skip until `$` or a line end.
    skipping: bool,
    /// The names of the last sample decoded: a device repeats them in every frame.
    names: NameCache,
}

/// The unit and channel of the last sample a codec yielded: a frame spelling the same bytes
/// carries no names ([`FrameSample::names`] is `None`) and needs no charset check.
#[derive(Debug, Clone, Default)]
struct NameCache {
    last: Option<SampleNames>,
}

impl NameCache {
    /// The names of a frame whose other fields are valid: `Some(None)` when they repeat the
    /// last sample's, `Some(Some(..))` when they are new and valid (and now the last), `None`
    /// when invalid. Nothing that can still refuse the frame may come after this call: the
    /// names it takes as the last must be the ones a consumer received.
    #[inline(always)]
    fn of(&mut self, unit: &[u8], channel: Option<&[u8]>) -> Option<Option<Box<SampleNames>>> {
        if let Some(last) = &self.last
            && same_bytes(last.unit.as_bytes(), unit)
            && match (&last.channel, channel) {
                (None, None) => true,
                (Some(last), Some(channel)) => same_bytes(last.as_bytes(), channel),
                _ => false,
            }
        {
            return Some(None);
        }
        self.new_names(unit, channel).map(Some)
    }

    /// Names unlike the last: checked, and kept as the last when valid.
    #[inline(never)]
    fn new_names(&mut self, unit: &[u8], channel: Option<&[u8]>) -> Option<Box<SampleNames>> {
        // Valid names are ASCII, so `from_utf8` cannot fail on them.
        let name = |bytes, valid: fn(&[u8]) -> bool| {
            valid(bytes)
                .then(|| std::str::from_utf8(bytes).ok().map(SmolStr::new))
                .flatten()
        };
        let names = SampleNames {
            unit: name(unit, valid_unit)?,
            channel: match channel {
                None => None,
                Some(channel) => Some(name(channel, valid_channel)?),
            },
        };
        self.last = Some(names.clone());
        Some(Box::new(names))
    }
}

impl FrameCodec {
    /// A codec that rejects frames longer than `max_len` bytes, counted up to and including
    /// their first line-end byte.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            skipping: false,
            names: NameCache::default(),
        }
    }

    /// Decodes the complete items at the front of `src` into `out` until `out` holds `max`,
    /// and removes their bytes: what [`Decoder::decode`] does once per item, in one call per
    /// read (the bytes are consumed once per call instead of once per frame, and no item
    /// travels through a `Result<Option<_>>`). The device task reads its link this way.
    pub fn decode_into(&mut self, src: &mut BytesMut, out: &mut Vec<Frame>, max: usize) {
        let mut pos = 0;
        while out.len() < max {
            match self.next_item(src, &mut pos) {
                Some(frame) => out.push(frame),
                None => break,
            }
        }
        src.advance(pos);
    }

    /// [`Self::decode_into`] at the end of the stream, without a limit: what is left after the
    /// last complete item is a frame cut short, a syntax error ([`Decoder::decode_eof`]).
    pub fn finish_into(&mut self, src: &mut BytesMut, out: &mut Vec<Frame>) {
        self.decode_into(src, out, usize::MAX);
        if !src.is_empty() {
            src.clear();
            out.push(Frame::Invalid(InvalidReason::Syntax));
        }
    }

    /// The next item of `src[*pos..]`, moving `pos` past the bytes it used (and past skipped
    /// bytes and empty lines); `None` when the item there is not complete yet.
    #[inline(always)]
    fn next_item(&mut self, src: &[u8], pos: &mut usize) -> Option<Frame> {
        loop {
            let rest = &src[*pos..];
            if self.skipping {
                // Drop bytes up to the next `$` (kept) or line end (dropped).
                let Some(at) = memchr::memchr3(b'$', b'\r', b'\n', rest) else {
                    *pos = src.len();
                    return None;
                };
                *pos += at + usize::from(is_line_end(rest[at]));
                self.skipping = false;
                continue;
            }
            let &first = rest.first()?;
            match first {
                b'\r' | b'\n' => *pos += 1,
                b'$' => return self.frame_at(rest, pos),
                b'O' | b'E' | b'S' if could_be_reply(rest) => match self.reply_at(rest, pos) {
                    Some(frame) => return Some(frame),
                    None if rest.len() < self.max_len => return None,
                    None => {
                        self.skipping = true;
                        return Some(Frame::Invalid(InvalidReason::TooLong));
                    }
                },
                _ => {
                    // Garbage: one count per run, however it is split across reads.
                    self.skipping = true;
                    return Some(Frame::Invalid(InvalidReason::Syntax));
                }
            }
        }
    }

    /// `src` starts with `$`. Returns a frame and moves `pos` past it, or `None` when the line
    /// is not complete yet.
    #[inline(always)]
    fn frame_at(&mut self, src: &[u8], pos: &mut usize) -> Option<Frame> {
        let limit = src.len().min(self.max_len);
        // The common case, a whole well-formed line followed by more bytes, in one pass.
        let mut scan = Scan::default();
        if let Some(end) = scan_line(src, limit, &mut scan) {
            let frame = parse_scanned(&src[..end], &scan, &mut self.names);
            return Self::hand_out(src, end, pos, frame);
        }
        let window = &src[..limit];
        // A second `$` before the line end means this frame lost its end: resync there.
        let Some(end) = memchr::memchr3(b'\r', b'\n', b'$', &window[1..]).map(|p| p + 1) else {
            if src.len() >= self.max_len {
                *pos += self.max_len;
                self.skipping = true;
                return Some(Frame::Invalid(InvalidReason::TooLong));
            }
            return None;
        };
        if src[end] == b'$' {
            *pos += end;
            return Some(Frame::Invalid(InvalidReason::Syntax));
        }
        let frame = parse_line_with(&src[..end], &mut self.names);
        Self::hand_out(src, end, pos, frame)
    }

    /// Hands out the frame parsed from `src[..end]` and moves `pos` past its line end.
    #[inline(always)]
    fn hand_out(src: &[u8], end: usize, pos: &mut usize, frame: Frame) -> Option<Frame> {
        // The line and its first line-end byte, and the `\n` of a `\r\n` when it is already
        // here (otherwise it is an empty line, skipped when it comes).
        let crlf = src[end] == b'\r' && src.get(end + 1) == Some(&b'\n');
        *pos += end + 1 + usize::from(crlf);
        Some(frame)
    }

    /// `src` starts like a reply. Returns the reply once its line is complete; a `$` before the
    /// line end means the reply was cut short, and the part before it is garbage.
    fn reply_at(&mut self, src: &[u8], pos: &mut usize) -> Option<Frame> {
        let window = &src[..src.len().min(self.max_len)];
        let end = window.iter().position(|&b| is_line_end(b) || b == b'$')?;
        let complete = is_line_end(src[end]) && REPLY_PREFIXES.iter().any(|p| src.starts_with(p));
        if !complete {
            *pos += end;
            return Some(Frame::Invalid(InvalidReason::Syntax));
        }
        *pos += end + 1;
        let text = String::from_utf8_lossy(&src[..end]);
        Some(Frame::Reply(text.into_owned()))
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(128)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        let mut pos = 0;
        let frame = self.next_item(src, &mut pos);
        src.advance(pos);
        Ok(frame)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                // The stream ended mid-frame.
                src.clear();
                Ok(Some(Frame::Invalid(InvalidReason::Syntax)))
            }
        }
    }
}

/// Whether `byte` ends a line: `\r` and `\n` both do, so `\r`, `\n` and `\r\n` are all line ends.
fn is_line_end(byte: u8) -> bool {
    byte == b'\r' || byte == b'\n'
}

/// Whether `src` starts with a reply prefix, or with the start of one (more bytes may come).
fn could_be_reply(src: &[u8]) -> bool {
    REPLY_PREFIXES.iter().any(|prefix| {
        let n = prefix.len().min(src.len());
        src[..n] == prefix[..n]
    })
}

/// Parses one line without its line ending: `$TH,<seq>,<value>,<unit>*<CC>` or
/// `$TH,<seq>,<value>,<unit>,<channel>*<CC>`.
///
/// Works on the bytes: the fields are found with one scan each, `<seq>` is read digit by digit,
/// and `<value>` by [`parse_value`]. It accepts exactly the lines the `str::split(',')` and
/// `str::parse` version it replaces accepted (a property test in this file checks the two
/// against each other); every field is ASCII-checked on the way, so no UTF-8 pass is needed.
pub fn parse_line(line: &[u8]) -> Result<RawSample, InvalidReason> {
    match parse_line_with(line, &mut NameCache::default()) {
        // A fresh cache: a valid line's sample always carries its names.
        Frame::Sample(FrameSample {
            seq,
            value,
            names: Some(names),
        }) => {
            let SampleNames { unit, channel } = *names;
            Ok(RawSample {
                seq,
                value,
                unit,
                channel,
            })
        }
        Frame::Invalid(reason) => Err(reason),
        Frame::Sample(_) | Frame::Reply(_) => Err(InvalidReason::Syntax),
    }
}

/// [`parse_line`] as a codec decodes a line: a [`Frame::Sample`] (without the names when they
/// repeat the codec's last sample's) or a [`Frame::Invalid`], never a reply.
fn parse_line_with(line: &[u8], names: &mut NameCache) -> Frame {
    let Some(star) = line.len().checked_sub(4).filter(|_| line.starts_with(b"$")) else {
        return Frame::Invalid(InvalidReason::Syntax);
    };
    parse_scanned(line, &Scan::of(&line[1..=star]), names)
}

/// [`parse_line_with`] given the scan of the line's payload. `scan` may also count commas
/// after the payload (in `*CC`): such a line fails the `*CC` checks before any comma is used.
#[inline(always)]
fn parse_scanned(line: &[u8], scan: &Scan, names: &mut NameCache) -> Frame {
    match check_sum(line, scan) {
        Ok(()) => parse_payload(line, scan, names),
        Err(reason) => Frame::Invalid(reason),
    }
}

/// Whether `line` ends in a `*CC` that matches the checksum of `scan`.
#[inline(always)]
fn check_sum(line: &[u8], scan: &Scan) -> Result<(), InvalidReason> {
    let body = line.strip_prefix(b"$").ok_or(InvalidReason::Syntax)?;
    let star = body.len().checked_sub(3).ok_or(InvalidReason::Syntax)?;
    if body[star] != b'*' {
        return Err(InvalidReason::Syntax);
    }
    let sent = hex_byte(&body[star + 1..]).ok_or(InvalidReason::Syntax)?;
    if scan.checksum != sent {
        return Err(InvalidReason::Checksum);
    }
    Ok(())
}

/// Finds the end of the line at the front of `src` (which starts with `$`) and scans its
/// payload in the same pass, 8 bytes per step: the line end, the checksum and the commas of
/// [`Scan::of`] at once, instead of a `memchr3` for the end and then the scan.
///
/// Every byte of a well-formed frame between `$` and its line end is at least `%` (0x25),
/// while `\r`, `\n` and `$` are below it; so the first byte below `%` ends the line. Returns
/// the line end's index (below `limit`), with the scan in `scan` (which starts empty: filled in
/// place, not returned, so it is not copied), when that byte is `\r` or `\n` and the line is at
/// least `$*CC` long; `None` for everything else (a `$` or another low byte first, no line end
/// yet, fewer than 8 bytes left to load), which the two-pass path decides as before.
#[inline(always)]
fn scan_line(src: &[u8], limit: usize, scan: &mut Scan) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut wide = 0u64;
    // The words from `src[1]` that start below `limit` and have 8 bytes to load: those of this
    // slice, so no step checks bounds of its own.
    let words = src.get(1..src.len().min(limit.saturating_add(7)))?;
    for (i, word) in words.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().expect("chunks_exact(8) yields 8 bytes"));
        // Payload position of the word's first byte (its index in `src` is one more).
        let at = i * 8;
        // 0x80 in the bytes below `%`: exact for the lowest one, which is all that is used
        // (a borrow only runs towards higher bytes).
        let low = word.wrapping_sub(ONES * 0x25) & !word & HIGH;
        let commas = bytes_equal_to(word, b',');
        if low != 0 {
            // The line ends in this word: only its bytes before the end count.
            let keep = ((1u64 << low.trailing_zeros()) - 1) >> 7;
            scan.commas_in(commas & keep, at);
            let end = at + 1 + (low.trailing_zeros() / 8) as usize;
            if end >= limit || end < 4 || !is_line_end(src[end]) {
                return None;
            }
            // The payload's checksum: every byte before the line end but `*CC`.
            let folded = xor_bytes(wide ^ (word & keep));
            scan.checksum = folded ^ src[end - 3] ^ src[end - 2] ^ src[end - 1];
            return Some(end);
        }
        wide ^= word;
        scan.commas_in(commas, at);
    }
    None
}

/// The XOR of the 8 bytes of `word`: three folds of its halves instead of eight byte steps.
#[inline(always)]
fn xor_bytes(word: u64) -> u8 {
    let word = word ^ (word >> 32);
    let word = word ^ (word >> 16);
    (word ^ (word >> 8)) as u8
}

/// `a == b`, without a `memcmp` call for the short names a device repeats: two overlapping
/// 8-byte (or 4-byte) comparisons cover every length from 4 to 16.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match (load8(a, 0), load8(b, 0)) {
        (Some(a0), Some(b0)) if n <= 16 => a0 == b0 && load8(a, n - 8) == load8(b, n - 8),
        _ if (4..8).contains(&n) => a[..4] == b[..4] && a[n - 4..] == b[n - 4..],
        _ => a == b,
    }
}

/// The 8 bytes of `bytes` from `at`, little-endian, if there are 8.
fn load8(bytes: &[u8], at: usize) -> Option<u64> {
    let word: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(word))
}

/// Eight ASCII `'0'`.
const ZEROS: u64 = u64::from_le_bytes([b'0'; 8]);

/// The number spelled by 8 ASCII digits (the first, most significant, in the lowest byte), or
/// `None` if any byte is not a digit. Three multiplications instead of eight steps (the
/// well-known SWAR digit parse of fast float parsers).
#[inline(always)]
fn eight_digits(word: u64) -> Option<u32> {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below '0' borrows into its high bit, one above '9' carries into it.
    if (word.wrapping_add(0x4646_4646_4646_4646) | word.wrapping_sub(ZEROS)) & HIGH != 0 {
        return None;
    }
    let v = word.wrapping_sub(ZEROS);
    let v = (v.wrapping_mul(10)).wrapping_add(v >> 8) & 0x00ff_00ff_00ff_00ff;
    let v = (v.wrapping_mul(100)).wrapping_add(v >> 16) & 0x0000_ffff_0000_ffff;
    let v = (v.wrapping_mul(10_000)).wrapping_add(v >> 32) & 0xffff_ffff;
    u32::try_from(v).ok()
}

/// 0x80 in exactly the bytes of `word` that are `byte`, 0 elsewhere (no carry crosses a byte,
/// so every byte is tested exactly, not only the first match).
#[inline(always)]
fn bytes_equal_to(word: u64, byte: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = word ^ u64::from_le_bytes([byte; 8]);
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// `line[start..end]` as 1 to 8 digits, right-aligned in a word of `'0'`s, or `None` when that
/// shape (or 8 readable bytes from `start`) is not there.
fn digits_word(line: &[u8], start: usize, end: usize) -> Option<u64> {
    let n = end.checked_sub(start)?;
    let word = load8(line, start)?;
    match n {
        8 => Some(word),
        1..=7 => Some((word << (8 * (8 - n))) | (ZEROS >> (8 * n))),
        _ => None,
    }
}

/// `<seq>` at `line[start..end]`: 1 to 8 plain digits in one step, anything else (a `+`, 9 or
/// 10 digits, an error) through [`parse_u32`], which decides acceptance as before.
fn seq_at(line: &[u8], start: usize, end: usize) -> Option<u32> {
    digits_word(line, start, end)
        .and_then(eight_digits)
        .or_else(|| parse_u32(&line[start..end]))
}

/// `<value>` at `line[start..end]`: `[+-]<1 to 7 digits>.<1 to 8 digits>` as two 8-digit words
/// (the same integer over the same power of ten as [`fast_value`], so the same double), anything
/// else through [`parse_value`], which decides acceptance as before.
fn value_at(line: &[u8], start: usize, end: usize) -> Option<f64> {
    swar_value(line, start, end).or_else(|| parse_value(&line[start..end]))
}

/// The two-word fast path of [`value_at`]; `None` means "not in this form", not "invalid".
fn swar_value(line: &[u8], start: usize, end: usize) -> Option<f64> {
    const POW10_INT: [u64; 9] = [
        1,
        10,
        100,
        1_000,
        10_000,
        100_000,
        1_000_000,
        10_000_000,
        100_000_000,
    ];
    let (negative, digits) = match line.get(start)? {
        b'-' => (true, start + 1),
        b'+' => (false, start + 1),
        _ => (false, start),
    };
    let n = end.checked_sub(digits)?;
    let word = load8(line, digits)?;
    // The first '.' of the 8 bytes (8 if none), as in `Scan::of`.
    let dot = bytes_equal_to(word, b'.').trailing_zeros() as usize / 8;
    if dot == 0 || dot >= 8 || dot >= n {
        return None;
    }
    let decimals = n - dot - 1;
    if !(1..=8).contains(&decimals) {
        return None;
    }
    let int = (word << (8 * (8 - dot))) | (ZEROS >> (8 * dot));
    // The decimals end the field: the 8 bytes up to `end`, the ones before them made '0'.
    let pad = 8 * (8 - decimals);
    let low = (1u64 << pad) - 1;
    let frac = (load8(line, end.checked_sub(8)?)? & !low) | (ZEROS & low);
    let mantissa =
        u64::from(eight_digits(int)?) * POW10_INT[decimals] + u64::from(eight_digits(frac)?);
    // Below 10^15 < 2^53: exact, and one correctly rounded division, as in `fast_value`.
    let magnitude = mantissa as f64 / POW10[decimals];
    Some(if negative { -magnitude } else { magnitude })
}

/// One pass over a payload: its checksum and where its commas are.
#[derive(Default)]
struct Scan {
    checksum: u8,
    /// Where the commas are, the `i`th at `at[i % 8]`: each in a slot of its own up to 8 of
    /// them (a valid line has 3 or 4; one with more is refused by its count alone, whatever its
    /// slots hold); `commas` counts all of them.
    at: [usize; 8],
    commas: usize,
}

impl Scan {
    /// Eight bytes per step: XOR for the checksum, and a comma test on every byte at once.
    fn of(payload: &[u8]) -> Self {
        let mut scan = Scan::default();
        let mut wide = 0u64;
        let mut words = payload.chunks_exact(8);
        for (i, word) in words.by_ref().enumerate() {
            let word = u64::from_le_bytes(word.try_into().expect("chunks_exact(8) yields 8 bytes"));
            wide ^= word;
            scan.commas_in(bytes_equal_to(word, b','), i * 8);
        }
        scan.checksum = xor_bytes(wide);
        let tail = payload.len() - words.remainder().len();
        for (i, &b) in words.remainder().iter().enumerate() {
            scan.checksum ^= b;
            if b == b',' {
                scan.comma(tail + i);
            }
        }
        scan
    }

    /// Records the commas of an 8-byte word starting at payload position `at`: `hits` has
    /// 0x80 in each byte that is a comma.
    #[inline(always)]
    fn commas_in(&mut self, mut hits: u64, at: usize) {
        while hits != 0 {
            self.comma(at + (hits.trailing_zeros() / 8) as usize);
            hits &= hits - 1;
        }
    }

    fn comma(&mut self, at: usize) {
        // No bounds check: a mask instead of `get_mut` in the hottest loop of the scan.
        self.at[self.commas % 8] = at;
        self.commas += 1;
    }
}

/// The fields of a checksummed line's payload: `TH,<seq>,<value>,<unit>[,<channel>]` (`scan`
/// counts from the payload's first byte, `line[1]`).
///
/// Returns the frame itself (its sample, or why it was refused) rather than an `Option` to
/// convert: the device task's decode loop moves it once less.
#[inline(never)]
fn parse_payload(line: &[u8], scan: &Scan, names: &mut NameCache) -> Frame {
    match payload_sample(line, scan, names) {
        Some(sample) => Frame::Sample(sample),
        None => Frame::Invalid(InvalidReason::Syntax),
    }
}

/// The sample of [`parse_payload`], if its fields are valid.
#[inline(always)]
fn payload_sample(line: &[u8], scan: &Scan, names: &mut NameCache) -> Option<FrameSample> {
    let payload = &line[1..line.len() - 3];
    let [first, seq_end, value_end, unit_end, ..] = scan.at;
    // Four fields, or five with a channel; a sixth is an error.
    let (unit, channel) = match scan.commas {
        3 => (&payload[value_end + 1..], None),
        4 => (
            &payload[value_end + 1..unit_end],
            Some(&payload[unit_end + 1..]),
        ),
        _ => return None,
    };
    if &payload[..first] != b"TH" {
        return None;
    }
    // In `line`, one byte further than in `payload`.
    let seq = seq_at(line, first + 2, seq_end + 1)?;
    let value = value_at(line, seq_end + 2, value_end + 1)?;
    // Last: a frame refused after its names were taken as the last would hide them from the
    // consumer. (A sixth field's comma fails the channel's charset.)
    let names = names.of(unit, channel)?;
    Some(FrameSample { seq, value, names })
}

/// What `u32::from_str` accepts: an optional `+`, then 1 or more ASCII digits, no overflow.
fn parse_u32(field: &[u8]) -> Option<u32> {
    let digits = field.strip_prefix(b"+").unwrap_or(field);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u32::from(digit))
    })
}

/// Exact powers of ten: every one up to 10^22 is a double without rounding.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// A frame's value: what `f64::from_str` reads, correctly rounded, and nothing else.
///
/// The common form `[+-]<digits>.<digits>` with at most 2^53 as its digits read as an integer
/// and at most 22 decimals is computed as that integer divided by a power of ten: both are exact
/// doubles, so the one division rounds correctly (Clinger's fast path, the same one fast float
/// parsers take first). Anything else (exponents, `inf`, `NaN`, more digits, `5.` or `.5`)
/// goes to `f64::from_str`, so what is accepted and what it is worth do not change.
pub fn parse_value(field: &[u8]) -> Option<f64> {
    fast_value(field).or_else(|| std::str::from_utf8(field).ok()?.parse().ok())
}

/// The fast path of [`parse_value`]; `None` means "not in the fast form", not "invalid".
fn fast_value(field: &[u8]) -> Option<f64> {
    let (negative, digits) = match field {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, field),
    };
    // At most 19 digits and a dot, so the u64 cannot overflow.
    if digits.len() > 20 {
        return None;
    }
    let mut mantissa = 0u64;
    // Where the dot is, counted from the end: the number of decimals.
    let mut dot = None;
    for (i, &b) in digits.iter().enumerate() {
        let digit = b.wrapping_sub(b'0');
        if digit <= 9 {
            // Wraps only for 20 digits without a dot, refused below.
            mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(digit));
        } else if b == b'.' && dot.is_none() {
            dot = Some(i);
        } else {
            return None;
        }
    }
    let decimals = match dot {
        // Digits on both sides of the dot (`5.` and `.5` are left to `f64::from_str`).
        Some(at) if at > 0 && at + 1 < digits.len() => digits.len() - at - 1,
        Some(_) => return None,
        None if !digits.is_empty() && digits.len() <= 19 => 0,
        None => return None,
    };
    if mantissa > 1 << 53 {
        return None;
    }
    let magnitude = mantissa as f64 / POW10[decimals];
    Some(if negative { -magnitude } else { magnitude })
}

/// The longest channel name.
pub const MAX_CHANNEL_LEN: usize = 32;

/// A channel name is 1 to [`MAX_CHANNEL_LEN`] bytes of `A-Z a-z 0-9 _ . -`.
pub fn valid_channel(channel: &[u8]) -> bool {
    (1..=MAX_CHANNEL_LEN).contains(&channel.len())
        && channel
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A unit is 1 to 16 bytes of `A-Z a-z 0-9 . _ / % -`.
pub fn valid_unit(unit: &[u8]) -> bool {
    (1..=16).contains(&unit.len())
        && unit
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'%' | b'-'))
}

/// XOR of every byte: the NMEA checksum of the bytes between `$` and `*`.
pub fn checksum(bytes: &[u8]) -> u8 {
    // Eight bytes per step (XOR commutes), then the bytes of that word and the tail.
    let mut words = bytes.chunks_exact(8);
    let wide = words.by_ref().fold(0u64, |acc, word| {
        acc ^ u64::from_le_bytes(word.try_into().expect("chunks_exact(8) yields 8 bytes"))
    });
    let folded = xor_bytes(wide);
    words.remainder().iter().fold(folded, |acc, &b| acc ^ b)
}

fn hex_byte(cc: &[u8]) -> Option<u8> {
    let digit = |b: u8| match HEX_VALUE[usize::from(b)] {
        NOT_HEX => None,
        v => Some(v),
    };
    match cc {
        [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
        _ => None,
    }
}

/// Not a hex digit, in [`HEX_VALUE`].
const NOT_HEX: u8 = 0xff;

/// Each byte's value as a hex digit (`0-9 a-f A-F`, what `char::to_digit(16)` accepts).
const HEX_VALUE: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            c @ b'0'..=b'9' => c - b'0',
            c @ b'a'..=b'f' => c - b'a' + 10,
            c @ b'A'..=b'F' => c - b'A' + 10,
            _ => NOT_HEX,
        };
        b += 1;
    }
    table
};

impl Encoder<&RawSample> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, sample: &RawSample, dst: &mut BytesMut) -> Result<(), Self::Error> {
        match &sample.channel {
            None => encode_frame(sample.seq, sample.value, &sample.unit, dst),
            Some(channel) => {
                encode_channel_frame(sample.seq, sample.value, &sample.unit, channel, dst)
            }
        }
        Ok(())
    }
}

/// Appends one frame of the first form (no channel), checksum and `\r\n` included, to `dst`.
pub fn encode_frame(seq: u32, value: f64, unit: &str, dst: &mut BytesMut) {
    let start = dst.len();
    dst.extend_from_slice(b"$TH,");
    push_u64(u64::from(seq), dst);
    dst.extend_from_slice(b",");
    push_value(value, dst);
    dst.extend_from_slice(b",");
    dst.extend_from_slice(unit.as_bytes());
    finish_frame(start, dst);
}

/// Appends one frame of the second form, naming `channel`, checksum and `\r\n` included, to
/// `dst`.
pub fn encode_channel_frame(seq: u32, value: f64, unit: &str, channel: &str, dst: &mut BytesMut) {
    let start = dst.len();
    dst.extend_from_slice(b"$TH,");
    push_u64(u64::from(seq), dst);
    dst.extend_from_slice(b",");
    push_value(value, dst);
    dst.extend_from_slice(b",");
    dst.extend_from_slice(unit.as_bytes());
    dst.extend_from_slice(b",");
    dst.extend_from_slice(channel.as_bytes());
    finish_frame(start, dst);
}

/// Appends the checksum of the frame that starts at `start` (its `$`) and the line end.
fn finish_frame(start: usize, dst: &mut BytesMut) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let sum = checksum(&dst[start + 1..]);
    dst.extend_from_slice(&[
        b'*',
        HEX[usize::from(sum >> 4)],
        HEX[usize::from(sum & 0xf)],
        b'\r',
        b'\n',
    ]);
}

/// Appends `n` in decimal.
fn push_u64(n: u64, dst: &mut BytesMut) {
    dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `value` with 6 decimals, byte for byte what `format!("{value:.6}")` writes (a unit
/// test and a property test check it), without `core::fmt`'s general float formatting.
fn push_value(value: f64, dst: &mut BytesMut) {
    match fixed6(value) {
        Some((negative, micros)) => {
            if negative {
                dst.extend_from_slice(b"-");
            }
            push_u64(micros / 1_000_000, dst);
            let mut frac = [b'.', 0, 0, 0, 0, 0, 0];
            let mut rest = micros % 1_000_000;
            for digit in frac[1..].iter_mut().rev() {
                *digit = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            dst.extend_from_slice(&frac);
        }
        None => {
            // Writing into a BytesMut cannot fail: it grows as needed.
            let _ = write!(dst, "{value:.6}");
        }
    }
}

/// `|value|` in millionths, rounded as `{:.6}` rounds (exactly, ties to even), and its sign;
/// `None` for values the fast path leaves to `core::fmt` (not finite, or `|value| >= 10^12`).
fn fixed6(value: f64) -> Option<(bool, u64)> {
    if !value.is_finite() || value.abs() >= 1e12 {
        return None;
    }
    let bits = value.to_bits();
    let negative = bits >> 63 != 0;
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    // |value| = mantissa * 2^-shift, and shift > 0 because |value| < 10^12 < 2^52.
    let (mantissa, shift) = if biased == 0 {
        (fraction, 1074)
    } else {
        (fraction | 1 << 52, 1075 - biased)
    };
    let shift = u32::try_from(shift).ok().filter(|&s| s > 0)?;
    // At most 2^53 * 10^6 < 2^73: the exact product of the value and 10^6, shifted by `shift`.
    let scaled = u128::from(mantissa) * 1_000_000;
    if shift >= 100 {
        // Below 2^-47: far under half a millionth.
        return Some((negative, 0));
    }
    let whole = scaled >> shift;
    let rest = scaled & ((1 << shift) - 1);
    let half = 1u128 << (shift - 1);
    let rounded = if rest > half || (rest == half && whole & 1 == 1) {
        whole + 1
    } else {
        whole
    };
    Some((negative, u64::try_from(rounded).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u32, value: f64, unit: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_frame(seq, value, unit, &mut buf);
        buf
    }

    /// Every item `buf` holds, each sample with its names (see [`whole`]).
    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = codec.decode(buf).unwrap() {
            out.push(f);
        }
        whole(out)
    }

    /// `frames` with the names a consumer follows written into every sample: what a test
    /// compares whole samples with. A sample without names before any (the codec handed them
    /// out in an earlier call) stays without.
    fn whole(frames: Vec<Frame>) -> Vec<Frame> {
        let mut trail = NameTrail::default();
        frames
            .into_iter()
            .map(|frame| match frame {
                Frame::Sample(sample) => match trail.resolve(sample.clone()) {
                    Some(sample) => full(sample),
                    None => Frame::Sample(sample),
                },
                other => other,
            })
            .collect()
    }

    /// A sample repeating the names of the one before it.
    fn repeat(seq: u32, value: f64) -> Frame {
        Frame::Sample(FrameSample {
            seq,
            value,
            names: None,
        })
    }

    /// `sample` as a frame carrying its names.
    fn full(sample: RawSample) -> Frame {
        Frame::Sample(FrameSample {
            seq: sample.seq,
            value: sample.value,
            names: Some(Box::new(SampleNames {
                unit: sample.unit,
                channel: sample.channel,
            })),
        })
    }

    fn sample(seq: u32, value: f64) -> Frame {
        full(RawSample {
            seq,
            value,
            unit: "arb.units".into(),
            channel: None,
        })
    }

    #[test]
    fn encodes_the_documented_example() {
        assert_eq!(
            &frame(42, 42.9148, "arb.units")[..],
            b"$TH,42,42.914800,arb.units*30\r\n"
        );
    }

    #[test]
    fn values_are_written_exactly_as_format_writes_them() {
        for value in [
            0.0,
            -0.0,
            0.5,
            2.5,
            42.9148,
            -42.9148,
            0.007_812_5,  // a tie: rounds to even, 0.007812
            0.023_437_5,  // a tie: rounds to even, 0.023438
            -0.000_000_5, // rounds to -0.000000
            0.000_001_5,
            999_999.999_999_5,
            1e-300,
            -5e-324,
            999_999_999_999.999_9,
            1e12,
            -1.5e300,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let mut buf = BytesMut::new();
            push_value(value, &mut buf);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), format!("{value:.6}"));
        }
        for seq in [0, 9, 10, 4_294_967_295] {
            let mut buf = BytesMut::new();
            push_u64(seq, &mut buf);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), seq.to_string());
        }
    }

    #[test]
    fn names_are_handed_out_once_per_change_and_only_for_samples_handed_out() {
        let mut buf = BytesMut::new();
        encode_channel_frame(1, 1.0, "V", "rail_5v", &mut buf);
        encode_channel_frame(2, 2.0, "V", "rail_5v", &mut buf);
        encode_channel_frame(3, 3.0, "mV", "rail_3v3", &mut buf);
        encode_channel_frame(4, 4.0, "m V", "rail_3v3", &mut buf);
        encode_channel_frame(5, 5.0, "mV", "rail 3v3", &mut buf);
        encode_frame(6, 6.0, "mV", &mut buf);
        encode_frame(7, 7.0, "mV", &mut buf);
        // A valid new unit in frames refused for their value and for their channel: not taken
        // as the last names, so the next frame with that unit carries it.
        for payload in ["TH,8,x,kV", "TH,8,8.0,kV,rail 5v"] {
            let line = format!("${payload}*{:02X}\r\n", checksum(payload.as_bytes()));
            buf.extend_from_slice(line.as_bytes());
        }
        encode_frame(9, 9.0, "kV", &mut buf);
        encode_channel_frame(10, 10.0, "kV", "rail_5v", &mut buf);
        encode_channel_frame(11, 11.0, "kV", "rail_12v", &mut buf);
        let mut codec = FrameCodec::default();
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
        let named = |seq, unit: &str, channel: Option<&str>| {
            full(RawSample {
                seq,
                value: f64::from(seq),
                unit: unit.into(),
                channel: channel.map(Into::into),
            })
        };
        let same = |seq| repeat(seq, f64::from(seq));
        assert_eq!(
            frames,
            vec![
                named(1, "V", Some("rail_5v")),
                same(2),
                named(3, "mV", Some("rail_3v3")),
                Frame::Invalid(InvalidReason::Syntax),
                Frame::Invalid(InvalidReason::Syntax),
                named(6, "mV", None),
                same(7),
                Frame::Invalid(InvalidReason::Syntax),
                Frame::Invalid(InvalidReason::Syntax),
                named(9, "kV", None),
                named(10, "kV", Some("rail_5v")),
                named(11, "kV", Some("rail_12v")),
            ]
        );
        // Decoded alone, every line carries its names.
        assert_eq!(
            parse_line(b"$TH,2,2.0,V,rail_5v*5E").map(|s| (s.unit, s.channel)),
            Ok(("V".into(), Some("rail_5v".into())))
        );
    }

    #[test]
    fn the_scan_finds_exactly_the_commas_and_the_checksum() {
        // Bytes next to ',' (0x2c) in value, and with its high bit set, around word edges.
        let alphabet = [b',', 0x2b, 0x2d, 0xac, 0x00, 0xff, b'a'];
        for len in 0..40usize {
            for shift in 0..alphabet.len() {
                let payload: Vec<u8> = (0..len)
                    .map(|i| alphabet[(i * 5 + shift + i / 3) % alphabet.len()])
                    .collect();
                let scan = Scan::of(&payload);
                let commas: Vec<usize> = (0..len).filter(|&i| payload[i] == b',').collect();
                assert_eq!(scan.commas, commas.len(), "{payload:?}");
                if commas.len() <= 8 {
                    assert_eq!(&scan.at[..commas.len()], &commas[..], "{payload:?}");
                }
                assert_eq!(scan.checksum, checksum(&payload), "{payload:?}");
            }
        }
    }

    #[test]
    fn eight_digits_reads_digits_and_refuses_every_other_byte() {
        let base = *b"12345678";
        assert_eq!(eight_digits(u64::from_le_bytes(base)), Some(12_345_678));
        assert_eq!(
            eight_digits(u64::from_le_bytes(*b"99999999")),
            Some(99_999_999)
        );
        assert_eq!(eight_digits(u64::from_le_bytes(*b"00000000")), Some(0));
        for at in 0..8 {
            for byte in 0..=255u8 {
                let mut word = base;
                word[at] = byte;
                let expected = std::str::from_utf8(&word)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                    .map(|s| s.parse::<u32>().unwrap());
                assert_eq!(eight_digits(u64::from_le_bytes(word)), expected, "{word:?}");
            }
        }
    }

    #[test]
    fn the_word_paths_read_what_the_byte_paths_read() {
        for field in [
            "42.914800",
            "-0.5",
            "+1.25",
            "0.0",
            "-0.0",
            "00.5",
            "1234567.12345678",
            "12345678.1",
            "1.123456789",
            "9007199254740993",
            "1.",
            ".5",
            "1.2.3",
            "1e5",
            "-",
            "+",
            "",
            "1,5",
            "1.5x",
            "x1.5",
            "inf",
            "4 2.5",
            "42.91480\u{0}",
        ] {
            // As it sits in a line: `$TH,<seq>,` before it, `,u*00` after it.
            let line = format!("$TH,{field},{field},u*00");
            let start = 4 + field.len() + 1;
            let end = start + field.len();
            assert_eq!(
                value_at(line.as_bytes(), start, end).map(f64::to_bits),
                parse_value(field.as_bytes()).map(f64::to_bits),
                "{field:?}"
            );
            assert_eq!(
                seq_at(line.as_bytes(), 4, 4 + field.len()),
                parse_u32(field.as_bytes()),
                "{field:?}"
            );
        }
        for seq in [
            "0",
            "7",
            "12345678",
            "123456789",
            "4294967295",
            "4294967296",
            "+5",
        ] {
            let line = format!("$TH,{seq},1.0,u*00");
            assert_eq!(
                seq_at(line.as_bytes(), 4, 4 + seq.len()),
                parse_u32(seq.as_bytes()),
                "{seq:?}"
            );
        }
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let names: Vec<Vec<u8>> = (0..=33usize)
            .flat_map(|n| {
                let a: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                let mut first = a.clone();
                let mut last = a.clone();
                let mut middle = a.clone();
                if n > 0 {
                    first[0] = b'Z';
                    last[n - 1] = b'Z';
                    middle[n / 2] = b'Z';
                }
                [a, first, last, middle]
            })
            .collect();
        for a in &names {
            for b in &names {
                assert_eq!(same_bytes(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn checksum_is_the_xor_of_every_byte_at_any_length() {
        let bytes: Vec<u8> = (0..40u8).map(|b| b.wrapping_mul(37)).collect();
        for len in 0..bytes.len() {
            let slow = bytes[..len].iter().fold(0, |acc, &b| acc ^ b);
            assert_eq!(checksum(&bytes[..len]), slow, "{len}");
        }
    }

    #[test]
    fn a_frame_followed_by_more_bytes_is_found_and_scanned_in_one_pass() {
        let mut src = BytesMut::new();
        encode_channel_frame(42, 21.5, "degC", "temperature", &mut src);
        let end = src.len() - 2;
        encode_frame(43, 42.9148, "arb.units", &mut src);
        let mut scan = Scan::default();
        let found = scan_line(&src, 128, &mut scan).expect("the one-pass path takes it");
        assert_eq!(found, end);
        assert_eq!(scan.checksum, checksum(&src[1..end - 3]));
        assert_eq!((scan.commas, &scan.at[..4]), (4, &[2, 5, 15, 20][..]));
        // Within `limit` only, and never the last frame of a read (no 8 bytes to load past it).
        assert!(scan_line(&src, end, &mut Scan::default()).is_none());
        assert!(scan_line(&src[..end + 2], 128, &mut Scan::default()).is_none());
    }

    #[test]
    fn decodes_one_frame() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"$TH,42,42.914800,arb.units*30\r\n"[..]);
        assert_eq!(decode_all(&mut codec, &mut buf), vec![sample(42, 42.9148)]);
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_split_across_reads_decodes_once_complete() {
        let whole = frame(7, 1.5, "arb.units");
        // Its `\r` completes the frame; the `\n` after it is an empty line.
        let complete_at = whole.len() - 1;
        for cut in 1..whole.len() {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut frames = decode_all(&mut codec, &mut buf);
            assert_eq!(frames.is_empty(), cut < complete_at, "cut at {cut}");
            buf.extend_from_slice(&whole[cut..]);
            frames.extend(decode_all(&mut codec, &mut buf));
            assert_eq!(frames, vec![sample(7, 1.5)], "cut at {cut}");
            assert!(buf.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut codec = FrameCodec::default();
        let mut buf = frame(1, 1.0, "arb.units");
        buf.extend_from_slice(&frame(2, 2.0, "arb.units"));
        buf.extend_from_slice(&frame(3, 3.0, "arb.units"));
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![sample(1, 1.0), sample(2, 2.0), sample(3, 3.0)]
        );
    }

    #[test]
    fn garbage_is_counted_once_per_run_and_skipped() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"\x00\xffnoise"[..]);
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Frame::Invalid(InvalidReason::Syntax)]
        );
        // The same run continues in the next read: not counted again.
        buf.extend_from_slice(b"more noise");
        buf.extend_from_slice(&frame(5, 5.0, "arb.units"));
        assert_eq!(decode_all(&mut codec, &mut buf), vec![sample(5, 5.0)]);
    }

    #[test]
    fn resynchronises_at_dollar_after_a_truncated_frame() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"$TH,1,1.0"[..]);
        buf.extend_from_slice(&frame(2, 2.0, "arb.units"));
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Frame::Invalid(InvalidReason::Syntax), sample(2, 2.0)]
        );
    }

    #[test]
    fn bad_checksum_is_reported() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"$TH,42,42.914800,arb.units*31\r\n"[..]);
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Frame::Invalid(InvalidReason::Checksum)]
        );
    }

    #[test]
    fn corrupted_byte_fails_the_checksum() {
        let mut buf = frame(9, 9.25, "arb.units");
        buf[6] ^= 0x01;
        let mut codec = FrameCodec::default();
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Frame::Invalid(InvalidReason::Checksum)]
        );
    }

    #[test]
    fn syntax_errors_with_valid_checksums() {
        for payload in [
            "XX,1,1.0,u",
            "TH,1,1.0",
            "TH,-1,1.0,u",
            "TH,1,abc,u",
            "TH,1,1.0,u,channel,extra",
            "TH,1,1.0,bad unit",
        ] {
            let line = format!("${payload}*{:02X}\r\n", checksum(payload.as_bytes()));
            let mut buf = BytesMut::from(line.as_bytes());
            let mut codec = FrameCodec::default();
            assert_eq!(
                decode_all(&mut codec, &mut buf),
                vec![Frame::Invalid(InvalidReason::Syntax)],
                "{payload}"
            );
        }
    }

    #[test]
    fn non_finite_values_decode_for_the_worker_to_reject() {
        let payload = "TH,1,NaN,arb.units";
        let line = format!("${payload}*{:02X}\r\n", checksum(payload.as_bytes()));
        let mut codec = FrameCodec::default();
        let frames = decode_all(&mut codec, &mut BytesMut::from(line.as_bytes()));
        assert!(matches!(&frames[..], [Frame::Sample(s)] if s.value.is_nan()));
    }

    #[test]
    fn oversized_line_is_bounded_counted_and_skipped() {
        let mut codec = FrameCodec::new(64);
        let mut buf = BytesMut::from(&b"$TH,1,"[..]);
        buf.extend_from_slice(&[b'9'; 200]);
        let frames = decode_all(&mut codec, &mut buf);
        assert_eq!(frames, vec![Frame::Invalid(InvalidReason::TooLong)]);
        assert!(
            buf.is_empty(),
            "the decoder must not keep an over-long line"
        );
        // More of the same line, then its end and a good frame.
        buf.extend_from_slice(&[b'9'; 1000]);
        assert_eq!(decode_all(&mut codec, &mut buf), vec![]);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"*00\r\n");
        buf.extend_from_slice(&frame(2, 2.0, "arb.units"));
        assert_eq!(decode_all(&mut codec, &mut buf), vec![sample(2, 2.0)]);
    }

    #[test]
    fn eof_mid_frame_is_a_syntax_error_not_an_io_error() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"$TH,1,1.0,arb"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(
            codec.decode_eof(&mut buf).unwrap(),
            Some(Frame::Invalid(InvalidReason::Syntax))
        );
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn replies_are_told_apart_from_frames_and_garbage() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"OK: rate=50\r\n"[..]);
        buf.extend_from_slice(&frame(1, 1.0, "arb.units"));
        buf.extend_from_slice(b"STATUS: seq=2 rate_ms=50\nERROR: unknown command\r\nOKAY\r\n");
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![
                Frame::Reply("OK: rate=50".into()),
                sample(1, 1.0),
                Frame::Reply("STATUS: seq=2 rate_ms=50".into()),
                Frame::Reply("ERROR: unknown command".into()),
                Frame::Invalid(InvalidReason::Syntax),
            ]
        );
    }

    #[test]
    fn a_reply_split_across_reads_waits_for_its_newline() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"ST"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"ATUS: ok");
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Reply("STATUS: ok".into()))
        );
    }

    #[test]
    fn a_reply_cut_by_a_frame_is_garbage_and_the_frame_survives() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"OK: ra"[..]);
        buf.extend_from_slice(&frame(4, 4.0, "arb.units"));
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Frame::Invalid(InvalidReason::Syntax), sample(4, 4.0)]
        );
    }

    #[test]
    fn lowercase_checksum_and_bare_newline_are_accepted() {
        let payload = "TH,3,0.500000,V";
        let line = format!("${payload}*{:02x}\n", checksum(payload.as_bytes()));
        let mut codec = FrameCodec::default();
        let frames = decode_all(&mut codec, &mut BytesMut::from(line.as_bytes()));
        assert_eq!(
            frames,
            vec![full(RawSample {
                seq: 3,
                value: 0.5,
                unit: "V".into(),
                channel: None,
            })]
        );
    }

    #[test]
    fn a_frame_naming_a_channel_decodes_with_it() {
        let mut buf = BytesMut::new();
        encode_channel_frame(42, 21.5, "degC", "temperature", &mut buf);
        assert_eq!(&buf[..], b"$TH,42,21.500000,degC,temperature*7B\r\n");
        buf.extend_from_slice(&frame(43, 1.0, "arb.units"));
        let mut codec = FrameCodec::default();
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![
                full(RawSample {
                    seq: 42,
                    value: 21.5,
                    unit: "degC".into(),
                    channel: Some("temperature".into()),
                }),
                sample(43, 1.0),
            ]
        );
    }

    #[test]
    fn the_encoder_writes_the_form_the_sample_asks_for() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let named = RawSample {
            seq: 1,
            value: 2.0,
            unit: "V".into(),
            channel: Some("rail_5v".into()),
        };
        let plain = RawSample {
            channel: None,
            ..named.clone()
        };
        codec.encode(&named, &mut buf).unwrap();
        codec.encode(&plain, &mut buf).unwrap();
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![full(named), full(plain)]
        );
    }

    #[test]
    fn bad_channels_are_syntax_errors_with_valid_checksums() {
        let too_long = format!("TH,1,1.0,u,{}", "c".repeat(MAX_CHANNEL_LEN + 1));
        let longest = format!("TH,1,1.0,u,{}", "c".repeat(MAX_CHANNEL_LEN));
        for payload in [
            "TH,1,1.0,u,",
            "TH,1,1.0,u,bad channel",
            "TH,1,1.0,u,temp/1",
            "TH,1,1.0,u,t\u{e9}mp",
            "TH,1,1.0,u,temp,extra",
            &too_long,
        ] {
            let line = format!("${payload}*{:02X}\r\n", checksum(payload.as_bytes()));
            let mut codec = FrameCodec::new(256);
            assert_eq!(
                decode_all(&mut codec, &mut BytesMut::from(line.as_bytes())),
                vec![Frame::Invalid(InvalidReason::Syntax)],
                "{payload}"
            );
        }
        let line = format!("${longest}*{:02X}\r\n", checksum(longest.as_bytes()));
        let frames = decode_all(
            &mut FrameCodec::new(256),
            &mut BytesMut::from(line.as_bytes()),
        );
        assert!(
            matches!(&frames[..], [Frame::Sample(s)] if s.names.as_ref().and_then(|n| n.channel.as_deref()) == Some(&"c".repeat(32)[..])),
            "{frames:?}"
        );
    }

    #[test]
    fn a_corrupted_channel_fails_the_checksum() {
        let mut buf = BytesMut::new();
        encode_channel_frame(9, 9.25, "V", "humidity", &mut buf);
        let at = buf.len() - 8;
        buf[at] ^= 0x01;
        assert_eq!(
            decode_all(&mut FrameCodec::default(), &mut buf),
            vec![Frame::Invalid(InvalidReason::Checksum)]
        );
    }

    /// `frame` with its `\r\n` replaced by `end`.
    fn ended(seq: u32, end: &[u8]) -> BytesMut {
        let mut buf = frame(seq, f64::from(seq), "arb.units");
        buf.truncate(buf.len() - 2);
        buf.extend_from_slice(end);
        buf
    }

    #[test]
    fn a_bare_cr_ends_a_frame_as_a_newline_does() {
        let mut codec = FrameCodec::default();
        let mut buf = ended(1, b"\r");
        buf.extend_from_slice(&ended(2, b"\r"));
        buf.extend_from_slice(&ended(3, b"\n"));
        buf.extend_from_slice(&ended(4, b"\r\n"));
        buf.extend_from_slice(&ended(5, b"\r"));
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            (1..=5).map(|n| sample(n, f64::from(n))).collect::<Vec<_>>()
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_frame_ending_in_cr_is_complete_without_waiting_for_more() {
        let mut codec = FrameCodec::default();
        let mut buf = ended(1, b"\r");
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(sample(1, 1.0)));
    }

    #[test]
    fn crlf_split_between_reads_is_one_line_end_not_an_empty_line_or_an_error() {
        let mut codec = FrameCodec::default();
        let mut buf = ended(1, b"\r");
        assert_eq!(decode_all(&mut codec, &mut buf), vec![sample(1, 1.0)]);
        buf.extend_from_slice(b"\n");
        assert_eq!(decode_all(&mut codec, &mut buf), vec![]);
        buf.extend_from_slice(&ended(2, b"\r"));
        buf.extend_from_slice(b"\n\r\n\n");
        assert_eq!(decode_all(&mut codec, &mut buf), vec![repeat(2, 2.0)]);
        assert!(buf.is_empty());
    }

    #[test]
    fn replies_and_garbage_runs_end_at_a_bare_cr_too() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"OK: rate_ms=50\rnoise\rSTATUS: seq=1\r"[..]);
        buf.extend_from_slice(&ended(7, b"\r"));
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![
                Frame::Reply("OK: rate_ms=50".into()),
                Frame::Invalid(InvalidReason::Syntax),
                Frame::Reply("STATUS: seq=1".into()),
                sample(7, 7.0),
            ]
        );
    }

    /// A valid frame of exactly `len` bytes before its line end (the value padded with zeros).
    fn frame_of_len(len: usize) -> String {
        let zeros = "0".repeat(len - "$TH,1,1.0,u*CC".len());
        let payload = format!("TH,1,{zeros}1.0,u");
        format!("${payload}*{:02X}", checksum(payload.as_bytes()))
    }

    #[test]
    fn the_length_limit_counts_a_frame_up_to_its_first_line_end_byte() {
        let (fits, too_long) = (frame_of_len(63), frame_of_len(64));
        for end in ["\r", "\n", "\r\n"] {
            let mut codec = FrameCodec::new(64);
            let mut buf = BytesMut::from(format!("{fits}{end}{too_long}{end}").as_bytes());
            let frames = decode_all(&mut codec, &mut buf);
            assert_eq!(
                frames,
                [sample(1, 1.0), Frame::Invalid(InvalidReason::TooLong)]
                    .map(|f| match f {
                        Frame::Sample(s) => full(RawSample {
                            seq: s.seq,
                            value: s.value,
                            unit: "u".into(),
                            channel: None,
                        }),
                        other => other,
                    })
                    .to_vec(),
                "{end:?}"
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// The line ends devices send.
        const LINE_ENDS: [&[u8]; 3] = [b"\r\n", b"\n", b"\r"];

        #[derive(Debug, Clone)]
        enum Piece {
            /// A frame, naming a channel or not, ending in `LINE_ENDS[.4]`.
            Frame(u32, f64, String, Option<String>, usize),
            /// A checksummed frame with a valid unit that is refused for another field: a bad
            /// value (`.2` 0), a bad channel (1) or a sixth field (2).
            Refused(String, Option<String>, u8),
            Garbage(Vec<u8>),
        }

        /// A unit: mostly from a pool of three, so runs repeat and return (samples without
        /// names between samples with them), sometimes anything valid.
        fn unit() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => prop::sample::select(vec!["V", "mV", "degC"]).prop_map(String::from),
                1 => "[A-Za-z0-9._/%-]{1,16}",
            ]
        }

        /// A channel or none, the same way.
        fn channel() -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                3 => prop::sample::select(vec![None, Some("a"), Some("b")])
                    .prop_map(|c| c.map(String::from)),
                1 => proptest::option::of("[A-Za-z0-9_.-]{1,32}"),
            ]
        }

        fn piece() -> impl Strategy<Value = Piece> {
            prop_oneof![
                4 => (any::<u32>(), -1e9..1e9f64, unit(), channel(), 0..LINE_ENDS.len())
                    .prop_map(|(seq, value, unit, channel, end)| {
                        Piece::Frame(seq, value, unit, channel, end)
                    }),
                1 => (unit(), channel(), 0..3u8)
                    .prop_map(|(unit, channel, why)| Piece::Refused(unit, channel, why)),
                1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Piece::Garbage),
            ]
        }

        impl Piece {
            /// The piece's bytes on the wire.
            fn bytes(&self) -> Vec<u8> {
                match self {
                    Piece::Frame(seq, value, unit, channel, end) => {
                        let mut buf = BytesMut::new();
                        match channel {
                            None => encode_frame(*seq, *value, unit, &mut buf),
                            Some(c) => encode_channel_frame(*seq, *value, unit, c, &mut buf),
                        }
                        buf.truncate(buf.len() - 2);
                        buf.extend_from_slice(LINE_ENDS[*end]);
                        buf.to_vec()
                    }
                    Piece::Refused(unit, channel, why) => {
                        let channel = channel.as_deref().unwrap_or("c");
                        let payload = match why {
                            0 => format!("TH,1,x,{unit},{channel}"),
                            1 => format!("TH,1,1.0,{unit},bad {channel}"),
                            _ => format!("TH,1,1.0,{unit},{channel},extra"),
                        };
                        format!("${payload}*{:02X}\r\n", checksum(payload.as_bytes())).into_bytes()
                    }
                    Piece::Garbage(bytes) => bytes.clone(),
                }
            }
        }

        /// Decodes `stream` fed in pieces cut at `cuts`, then at end of stream.
        fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<Frame> {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(stream.len());
            let mut from = 0;
            for cut in cuts {
                buf.extend_from_slice(&stream[from..cut]);
                from = cut;
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    frames.push(frame);
                }
                assert!(
                    buf.len() <= 128,
                    "the decoder holds at most one frame's bytes"
                );
            }
            while let Some(frame) = codec.decode_eof(&mut buf).unwrap() {
                frames.push(frame);
            }
            frames
        }

        /// [`decode_in_pieces`] the device task's way: every read decoded in calls of
        /// [`FrameCodec::decode_into`] taking at most `max` items each, then
        /// [`FrameCodec::finish_into`].
        fn decode_batches_in_pieces(stream: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(stream.len());
            let mut from = 0;
            for cut in cuts {
                buf.extend_from_slice(&stream[from..cut]);
                from = cut;
                loop {
                    let mut chunk = Vec::new();
                    codec.decode_into(&mut buf, &mut chunk, max);
                    assert!(chunk.len() <= max, "a call takes at most `max` items");
                    let full = chunk.len() == max;
                    frames.append(&mut chunk);
                    if !full {
                        break;
                    }
                }
                assert!(
                    buf.len() <= 128,
                    "the decoder holds at most one frame's bytes"
                );
            }
            codec.finish_into(&mut buf, &mut frames);
            assert!(buf.is_empty());
            frames
        }

        /// The `str::split(',')` parser `parse_line` replaced, kept as the oracle it must
        /// agree with on every line.
        fn reference_parse_line(line: &[u8]) -> Result<RawSample, InvalidReason> {
            let body = line.strip_prefix(b"$").ok_or(InvalidReason::Syntax)?;
            let star = body.len().checked_sub(3).ok_or(InvalidReason::Syntax)?;
            if body[star] != b'*' {
                return Err(InvalidReason::Syntax);
            }
            let (payload, cc) = (&body[..star], &body[star + 1..]);
            let sent = hex_byte(cc).ok_or(InvalidReason::Syntax)?;
            if checksum(payload) != sent {
                return Err(InvalidReason::Checksum);
            }
            let payload = std::str::from_utf8(payload).map_err(|_| InvalidReason::Syntax)?;
            let mut fields = payload.split(',');
            let (Some("TH"), Some(seq), Some(value), Some(unit), channel, None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(InvalidReason::Syntax);
            };
            let seq = seq.parse().map_err(|_| InvalidReason::Syntax)?;
            let value = value.parse().map_err(|_| InvalidReason::Syntax)?;
            if !valid_unit(unit.as_bytes()) {
                return Err(InvalidReason::Syntax);
            }
            let channel = match channel {
                None => None,
                Some(channel) if valid_channel(channel.as_bytes()) => Some(SmolStr::new(channel)),
                Some(_) => return Err(InvalidReason::Syntax),
            };
            Ok(RawSample {
                seq,
                value,
                unit: SmolStr::new(unit),
                channel,
            })
        }

        /// Field-like tokens: numbers in every spelling `str::parse` knows, and near misses.
        fn token() -> impl Strategy<Value = String> {
            prop_oneof![
                "[+-]?[0-9]{0,21}(\\.[0-9]{0,24})?",
                "[+-]?[0-9]{0,4}(\\.[0-9]{0,4})?([eE][+-]?[0-9]{1,3})?",
                any::<f64>().prop_map(|v| format!("{v:.6}")),
                any::<f64>().prop_map(|v| format!("{v}")),
                any::<u32>().prop_map(|v| v.to_string()),
                "(inf|-inf|NaN|infinity|Infinity|nan|\\.|-|\\+|)",
                "[A-Za-z0-9._/%-]{0,34}",
                "[ -~]{0,6}",
                "[\\x00-\\xff]{0,4}",
            ]
        }

        /// What any f64 looks like after `{:.6}`, as a parse result.
        fn sent(value: f64) -> f64 {
            format!("{value:.6}").parse().unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn frames_with_any_line_ends_decode_with_nothing_invalid(
                frames in proptest::collection::vec((any::<u32>(), 0..LINE_ENDS.len()), 0..40),
                cuts in proptest::collection::vec(any::<usize>(), 0..20),
            ) {
                let mut stream = Vec::new();
                for (seq, end) in &frames {
                    let mut buf = BytesMut::new();
                    encode_frame(*seq, 1.5, "V", &mut buf);
                    buf.truncate(buf.len() - 2);
                    stream.extend_from_slice(&buf);
                    stream.extend_from_slice(LINE_ENDS[*end]);
                }
                let decoded = whole(decode_in_pieces(&stream, &cuts));
                let expected: Vec<_> = frames
                    .iter()
                    .map(|(seq, _)| full(RawSample { seq: *seq, value: 1.5, unit: "V".into(), channel: None }))
                    .collect();
                prop_assert_eq!(decoded, expected);
            }

            #[test]
            fn decoding_a_read_at_once_yields_what_decoding_item_by_item_yields(
                pieces in proptest::collection::vec(
                    prop_oneof![
                        4 => piece(),
                        1 => "(OK|ERROR|STATUS):[ -~]{0,20}(\r\n|\n|\r|\\$)"
                            .prop_map(|reply| Piece::Garbage(reply.into_bytes())),
                    ],
                    0..40,
                ),
                cuts in proptest::collection::vec(any::<usize>(), 0..20),
                max in 1usize..6,
            ) {
                let stream: Vec<u8> = pieces.iter().flat_map(Piece::bytes).collect();
                let one_by_one = decode_in_pieces(&stream, &cuts);
                prop_assert_eq!(&decode_batches_in_pieces(&stream, &cuts, max), &one_by_one);
                prop_assert_eq!(&decode_batches_in_pieces(&stream, &cuts, usize::MAX), &one_by_one);
            }

            #[test]
            fn the_one_pass_line_scan_agrees_with_the_two_pass_path(
                frame in prop_oneof![
                    piece().prop_map(|piece| piece.bytes()),
                    "[ -~]{0,60}(\r|\n|\\$)".prop_map(String::into_bytes),
                ],
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
                after in proptest::collection::vec(any::<u8>(), 0..20),
                limit in 0usize..140,
            ) {
                let mut src = b"$".to_vec();
                src.extend_from_slice(frame.strip_prefix(b"$").unwrap_or(&frame));
                for (at, byte) in flips {
                    let at = 1 + at % src.len().max(1);
                    if at < src.len() {
                        src[at] = byte;
                    }
                }
                src.extend_from_slice(&after);
                let limit = limit.min(src.len());
                let mut scan = Scan::default();
                if let Some(end) = scan_line(&src, limit, &mut scan) {
                    let two_pass = memchr::memchr3(b'\r', b'\n', b'$', &src[1..limit]).map(|p| p + 1);
                    prop_assert_eq!(Some(end), two_pass);
                    let line = &src[..end];
                    prop_assert_eq!(
                        parse_scanned(line, &scan, &mut NameCache::default()),
                        parse_line_with(line, &mut NameCache::default())
                    );
                }
            }

            #[test]
            fn any_bytes_cut_anywhere_never_panic(
                stream in proptest::collection::vec(any::<u8>(), 0..2000),
                cuts in proptest::collection::vec(any::<usize>(), 0..20),
            ) {
                decode_in_pieces(&stream, &cuts);
            }

            #[test]
            fn every_embedded_frame_decodes_exactly_once(
                pieces in proptest::collection::vec(piece(), 0..40),
                cuts in proptest::collection::vec(any::<usize>(), 0..20),
            ) {
                let mut stream = Vec::new();
                let mut expected = Vec::new();
                for piece in &pieces {
                    stream.extend_from_slice(&piece.bytes());
                    match piece {
                        Piece::Frame(seq, value, unit, channel, _) => {
                            // What was sent, after the %.6f formatting the frame carries.
                            let sent: f64 = format!("{value:.6}").parse().unwrap();
                            expected.push((*seq, sent, unit.clone(), channel.clone()));
                        }
                        Piece::Refused(..) | Piece::Garbage(_) => {}
                    }
                }
                let mut trail = NameTrail::default();
                let decoded: Vec<_> = decode_in_pieces(&stream, &cuts)
                    .into_iter()
                    .filter_map(|f| match f {
                        Frame::Sample(s) => {
                            let s = trail.resolve(s).expect("the first sample carries its names");
                            Some((s.seq, s.value, s.unit.to_string(), s.channel.map(|c| c.to_string())))
                        }
                        _ => None,
                    })
                    .collect();
                prop_assert_eq!(decoded, expected);
            }

            #[test]
            fn parse_line_agrees_with_the_split_parser_it_replaced(
                head in prop_oneof![Just("TH".to_string()), "[A-Z]{0,3}"],
                fields in proptest::collection::vec(token(), 0..7),
                good_checksum in proptest::bool::weighted(0.9),
            ) {
                let mut payload = head.into_bytes();
                for field in &fields {
                    payload.push(b',');
                    payload.extend_from_slice(field.as_bytes());
                }
                let sum = checksum(&payload) ^ u8::from(!good_checksum);
                let mut line = vec![b'$'];
                line.extend_from_slice(&payload);
                line.extend_from_slice(format!("*{sum:02X}").as_bytes());
                let (new, old) = (parse_line(&line), reference_parse_line(&line));
                // Bit for bit, so NaN compares and -0.0 differs from 0.0.
                let bits = |r: &Result<RawSample, InvalidReason>| r.clone().map(|s| (s.seq, s.value.to_bits(), s.unit, s.channel));
                prop_assert_eq!(bits(&new), bits(&old), "{:?}", String::from_utf8_lossy(&line));
            }

            #[test]
            fn parse_value_reads_what_str_parse_reads(field in token()) {
                let std = field.parse::<f64>().ok().map(f64::to_bits);
                prop_assert_eq!(parse_value(field.as_bytes()).map(f64::to_bits), std, "{:?}", field);
            }

            #[test]
            fn the_value_is_written_as_format_writes_it(
                value in prop_oneof![
                    any::<f64>(),
                    -1e6..1e6f64,
                    (-2_000_000_000i64..2_000_000_000, 0u32..12).prop_map(|(n, k)| n as f64 / f64::from(1u32 << k) / 1e3),
                ],
            ) {
                let mut buf = BytesMut::new();
                push_value(value, &mut buf);
                prop_assert_eq!(std::str::from_utf8(&buf).unwrap(), format!("{value:.6}"));
            }

            #[test]
            fn frames_round_trip_through_encode_and_decode(
                seq in any::<u32>(),
                value in prop_oneof![any::<f64>(), -1e9..1e9f64],
                channel in proptest::option::of("[A-Za-z0-9_.-]{1,32}"),
            ) {
                let mut buf = BytesMut::new();
                match &channel {
                    None => encode_frame(seq, value, "V", &mut buf),
                    Some(c) => encode_channel_frame(seq, value, "V", c, &mut buf),
                }
                let payload = &buf[1..buf.len() - 5];
                let mut expected = format!("TH,{seq},{value:.6},V");
                if let Some(c) = &channel {
                    expected = format!("{expected},{c}");
                }
                prop_assert_eq!(std::str::from_utf8(payload).unwrap(), expected);
                let mut codec = FrameCodec::new(buf.len());
                match codec.decode(&mut buf).unwrap() {
                    Some(Frame::Sample(s)) => {
                        prop_assert_eq!(s.seq, seq);
                        prop_assert_eq!(s.value.to_bits(), sent(value).to_bits());
                        let names = s.names.expect("a codec's first sample carries its names");
                        prop_assert_eq!(names.channel.map(|c| c.to_string()), channel);
                    }
                    other => prop_assert!(false, "{:?} -> {:?}", value, other),
                }
            }
        }
    }
}
