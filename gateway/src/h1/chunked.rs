//! A strict decoder of chunked request bodies (RFC 9112 7.1), fed the bytes as they arrive.
//!
//! Strict where a lenient reading would let two parsers disagree on where a body ends:
//! chunk sizes are `1*HEXDIG` (no `0x`, no sign, no spaces before the extensions), at most 16
//! digits and never past `u64`; every line ends in CR LF (a bare LF, or a CR followed by
//! anything else, is an error); chunk data is followed by exactly CR LF; extensions and
//! trailer lines hold no control bytes and are bounded in size. Trailers are read and dropped.

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum ChunkError {
    Size,
    Overflow,
    LineEnd,
    DataEnd,
    Control,
    TooLong,
}

impl ChunkError {
    /// What a client is told.
    pub fn reason(self) -> &'static str {
        match self {
            ChunkError::Size => "a chunk size is not hexadecimal digits",
            ChunkError::Overflow => "a chunk size is too large",
            ChunkError::LineEnd => "a chunk line does not end in CR LF",
            ChunkError::DataEnd => "chunk data is not followed by CR LF",
            ChunkError::Control => "a chunk extension or trailer holds a control byte",
            ChunkError::TooLong => "chunk extensions or trailers are too long",
        }
    }
}

/// Extension bytes of one chunk line, and trailer bytes in all, at most.
const MAX_LINE_EXTRA: usize = 4096;
const MAX_TRAILERS: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// At the start of a chunk-size line.
    #[default]
    SizeStart,
    /// In the size's digits.
    Size,
    /// In the extensions, after `;`.
    Ext,
    /// Expecting the LF of a size line.
    SizeLf,
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting its LF.
    DataLf,
    /// At the start of a trailer line or of the final empty line.
    TrailerStart,
    /// In a trailer line.
    Trailer,
    /// Expecting the LF of a trailer line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    LastLf,
    Done,
}

/// Decodes one chunked body.
#[derive(Debug, Default)]
pub struct Decoder {
    state: State,
    /// The size being read, then the data left in the chunk.
    left: u64,
    digits: u8,
    /// Extension bytes on this line; trailer bytes so far.
    extra: usize,
    trailers: usize,
}

impl Decoder {
    /// Whether the body has ended.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, appending the data to `out`. `Ok(Some(n))`: the body ended after the
    /// first `n` bytes of `input` (the rest is the next request's); `Ok(None)`: all of `input`
    /// was taken and the body goes on.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::SizeStart | State::Size => match hex(b) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 16 {
                            return Err(ChunkError::Overflow);
                        }
                        self.left = self
                            .left
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(d)))
                            .ok_or(ChunkError::Overflow)?;
                        self.state = State::Size;
                    }
                    None if self.state == State::SizeStart => return Err(ChunkError::Size),
                    None => match b {
                        b';' => {
                            self.extra = 0;
                            self.state = State::Ext;
                        }
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError::LineEnd),
                        _ => return Err(ChunkError::Size),
                    },
                },
                State::Ext => {
                    if text_byte(b, &mut self.extra, MAX_LINE_EXTRA)? {
                        self.state = State::SizeLf;
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.digits = 0;
                    self.state = if self.left == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = State::SizeStart;
                }
                State::TrailerStart => match b {
                    b'\r' => self.state = State::LastLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => {
                        self.state = State::Trailer;
                        continue;
                    }
                },
                State::Trailer => {
                    if text_byte(b, &mut self.trailers, MAX_TRAILERS)? {
                        self.state = State::TrailerLf;
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::TrailerStart;
                }
                State::LastLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
                State::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok(if self.done() { Some(i) } else { None })
    }
}

/// A byte of an extension or a trailer line: `Ok(true)` at the CR that ends it; text bytes
/// are counted against `max`.
fn text_byte(b: u8, count: &mut usize, max: usize) -> Result<bool, ChunkError> {
    match b {
        b'\r' => Ok(true),
        b'\n' => Err(ChunkError::LineEnd),
        b'\t' | 0x20..=0x7e | 0x80..=0xff => {
            *count += 1;
            if *count > max {
                Err(ChunkError::TooLong)
            } else {
                Ok(false)
            }
        }
        _ => Err(ChunkError::Control),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Finds the end of a chunked body (RFC 9112 7.1) across the reads it arrives in.
#[derive(Default, Debug)]
pub(crate) struct Chunks {
    state: ChunkState,
    /// Bytes left in the current chunk's data.
    left: u64,
}

#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum ChunkState {
    /// In the chunk-size digits.
    #[default]
    Size,
    /// In extensions, up to the line's LF.
    SizeLine,
    Data,
    /// The CR LF after a chunk's data.
    DataEnd,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer line, up to its LF.
    TrailerLine,
    /// The final empty line's LF.
    LastLf,
}

impl Chunks {
    /// How far into `data` the body ends, or `None` if it goes on past it.
    pub(crate) fn scan(&mut self, data: &[u8]) -> std::io::Result<Option<usize>> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunked framing");
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = u64::from((b as char).to_digit(16).ok_or_else(bad)?);
                        self.left = self
                            .left
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(digit))
                            .ok_or_else(bad)?;
                    }
                    b';' | b' ' | b'\t' | b'\r' => self.state = ChunkState::SizeLine,
                    b'\n' => self.state = self.after_size(),
                    _ => return Err(bad()),
                },
                ChunkState::SizeLine => {
                    if b == b'\n' {
                        self.state = self.after_size();
                    }
                }
                ChunkState::Data => {
                    let n = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    continue;
                }
                ChunkState::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err(bad()),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::LastLf,
                    b'\n' => return Ok(Some(i + 1)),
                    _ => self.state = ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::LastLf => {
                    if b == b'\n' {
                        return Ok(Some(i + 1));
                    }
                    return Err(bad());
                }
            }
            i += 1;
        }
        Ok(None)
    }

    fn after_size(&mut self) -> ChunkState {
        if self.left == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent reading of RFC 9112 7.1, on the whole body at once: line by line.
    /// `Ok((data, length of the body))`, or `Err` where the decoder must refuse.
    fn reference(body: &[u8]) -> Result<(Vec<u8>, usize), ()> {
        let line = |at: usize| -> Result<(&[u8], usize), ()> {
            let rest = body.get(at..).ok_or(())?;
            let lf = rest.iter().position(|&b| b == b'\n').ok_or(())?;
            if lf == 0 || rest[lf - 1] != b'\r' {
                return Err(());
            }
            let text = &rest[..lf - 1];
            if text.contains(&b'\r') {
                return Err(());
            }
            Ok((text, at + lf + 1))
        };
        let mut data = Vec::new();
        let mut at = 0;
        loop {
            let (text, next) = line(at)?;
            let size_text = text.split(|&b| b == b';').next().ok_or(())?;
            if size_text.is_empty()
                || size_text.len() > 16
                || !size_text.iter().all(u8::is_ascii_hexdigit)
            {
                return Err(());
            }
            let ext = &text[size_text.len()..];
            if ext.len() > 4097 || ext.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
                return Err(());
            }
            let size = u64::from_str_radix(std::str::from_utf8(size_text).map_err(|_| ())?, 16)
                .map_err(|_| ())?;
            at = next;
            if size == 0 {
                break;
            }
            let size = usize::try_from(size).map_err(|_| ())?;
            let chunk = body.get(at..at.checked_add(size).ok_or(())?).ok_or(())?;
            data.extend_from_slice(chunk);
            at += size;
            if body.get(at..at + 2) != Some(b"\r\n") {
                return Err(());
            }
            at += 2;
        }
        let mut trailer_bytes = 0;
        loop {
            let (text, next) = line(at)?;
            at = next;
            if text.is_empty() {
                return Ok((data, at));
            }
            if text.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
                return Err(());
            }
            trailer_bytes += text.len();
            if trailer_bytes > MAX_TRAILERS {
                return Err(());
            }
        }
    }

    /// Decodes `body` fed in the pieces `cuts` makes; what the decoder says.
    fn fed(body: &[u8], cuts: &[usize]) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
            let cut = cut.clamp(from, body.len());
            if let Some(n) = d.decode(&body[from..cut], &mut out)? {
                return Ok(Some((out, from + n)));
            }
            from = cut;
        }
        Ok(None)
    }

    #[test]
    fn bodies_decode_whatever_the_read_boundaries() {
        let body = b"4\r\nWiki\r\n5;name=val\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let want = (b"Wikipedia in\r\n\r\nchunks.".to_vec(), body.len() - 4);
        assert_eq!(fed(body, &[]), Ok(Some(want.clone())));
        for a in 0..body.len() {
            assert_eq!(fed(body, &[a]), Ok(Some(want.clone())), "cut at {a}");
            for b in a..body.len() {
                assert_eq!(fed(body, &[a, b]), Ok(Some(want.clone())), "cuts {a} {b}");
            }
        }
        assert_eq!(fed(b"0\r\n\r\n", &[]), Ok(Some((Vec::new(), 5))));
        assert_eq!(fed(b"5\r\nhel", &[]), Ok(None));
    }

    #[test]
    fn lenient_framings_are_refused() {
        for (bad, why) in [
            (&b"0x5\r\nhello\r\n0\r\n\r\n"[..], ChunkError::Size),
            (b"-1\r\n", ChunkError::Size),
            (b"+5\r\n", ChunkError::Size),
            (b" 5\r\n", ChunkError::Size),
            (b"5 \r\nhello\r\n", ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"5\nhello\r\n", ChunkError::LineEnd),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhelloX\r\n", ChunkError::DataEnd),
            (b"3\r\nhello\r\n", ChunkError::DataEnd),
            (b"10000000000000000\r\n", ChunkError::Overflow),
            (b"0\r\n\n", ChunkError::LineEnd),
            (b"0\r\nx: 1\n\r\n", ChunkError::LineEnd),
            (b"5;a\x01\r\n", ChunkError::Control),
            (b"0\r\nx:\x00\r\n\r\n", ChunkError::Control),
        ] {
            assert_eq!(fed(bad, &[]), Err(why), "{}", bad.escape_ascii());
        }
        assert_eq!(
            fed(b"ffffffffffffffff\r\n", &[]),
            Ok(None),
            "16 digits fit in u64"
        );
    }

    /// Small pseudo-random bodies, valid and broken, each fed split at random points: the
    /// decoder agrees with the reference on every one.
    #[test]
    fn agrees_with_an_independent_decoder() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        const PIECES: [&[u8]; 16] = [
            b"0",
            b"1",
            b"5",
            b"a",
            b"F",
            b"\r",
            b"\n",
            b"\r\n",
            b";",
            b"x=1",
            b" ",
            b"\t",
            b"hello",
            b"\x00",
            b"0\r\n\r\n",
            b"3\r\nabc\r\n",
        ];
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..next(12) {
                body.extend_from_slice(PIECES[next(16) as usize]);
            }
            let cuts: Vec<usize> = (0..next(4))
                .map(|_| next(body.len() as u64 + 1) as usize)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let got = fed(&body, &cuts);
            match reference(&body) {
                Ok(want) => assert_eq!(got, Ok(Some(want)), "{}", body.escape_ascii()),
                // The reference needs the whole body: a prefix of a valid one is `Ok(None)`
                // for the decoder; anything else it refuses.
                Err(()) => assert!(
                    matches!(got, Err(_) | Ok(None)),
                    "{} decoded as {got:?}",
                    body.escape_ascii()
                ),
            }
            // A body the decoder ended agrees with the reference, and one it is still reading
            // is a prefix of something (never refused by it later for what it took).
            if let Ok(Some((data, n))) = &got {
                assert_eq!(reference(&body[..*n]), Ok((data.clone(), *n)));
            }
        }
    }

    #[test]
    fn chunked_bodies_end_where_the_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        // In one piece...
        assert_eq!(Chunks::default().scan(body).unwrap(), Some(end));
        // ...and split at every byte.
        for cut in 0..body.len() {
            let mut c = Chunks::default();
            let (a, b) = body.split_at(cut);
            match c.scan(a).unwrap() {
                Some(e) => assert_eq!(e, end, "cut at {cut}"),
                None => assert_eq!(c.scan(b).unwrap().map(|e| e + cut), Some(end), "cut {cut}"),
            }
        }
        assert_eq!(Chunks::default().scan(b"0\r\n\r\n").unwrap(), Some(5));
        assert_eq!(Chunks::default().scan(b"3\r\nab").unwrap(), None);
        assert!(Chunks::default().scan(b"zz\r\n").is_err());
        assert!(Chunks::default().scan(b"2\r\nabX").is_err());
    }
}
