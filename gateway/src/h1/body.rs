//! A chunked request body, read from the client whole before anything goes upstream.

use std::time::{Duration, Instant};

use http::StatusCode;
use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::AsyncReadExt;

use super::{BUF, chunked};
use crate::policy;

/// A chunked request body, read and decoded.
pub(super) struct ChunkedBody {
    pub(super) data: Vec<u8>,
    /// Bytes of it that were in the connection's read buffer.
    pub(super) from_buffer: usize,
    /// Bytes read from the client past the body's end: the next request's.
    pub(super) carry: Vec<u8>,
}

/// Reads a chunked body: `buffered` first (what followed the head in the read buffer), then
/// from the client, within `timeout` in all and at most `max` bytes of data. `Err(Some)`: a
/// refusal for the client (400 for bad framing, 413, 408); `Err(None)`: the client went away.
pub(super) async fn read_chunked(
    io: &mut L4Stream,
    buffered: &[u8],
    max: usize,
    timeout: Duration,
) -> Result<ChunkedBody, Option<policy::Refusal>> {
    let too_large = || policy::Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        reason: "the request body is too large",
    };
    let bad = |e: chunked::ChunkError| policy::Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: e.reason(),
    };
    let mut d = chunked::Decoder::default();
    let mut data = Vec::new();
    if let Some(n) = d.decode(buffered, &mut data).map_err(|e| Some(bad(e)))? {
        return if data.len() > max {
            Err(Some(too_large()))
        } else {
            Ok(ChunkedBody {
                data,
                from_buffer: n,
                carry: Vec::new(),
            })
        };
    }
    let deadline = Instant::now() + timeout;
    let mut chunk = vec![0u8; BUF];
    loop {
        if data.len() > max {
            return Err(Some(too_large()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match pingora::time::timeout(left, io.read(&mut chunk)).await {
            Err(_) => {
                return Err(Some(policy::Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    reason: "the request body did not arrive in time",
                }));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Err(None),
            Ok(Ok(n)) => n,
        };
        if let Some(end) = d.decode(&chunk[..n], &mut data).map_err(|e| Some(bad(e)))? {
            if data.len() > max {
                return Err(Some(too_large()));
            }
            return Ok(ChunkedBody {
                data,
                from_buffer: buffered.len(),
                carry: chunk[end..n].to_vec(),
            });
        }
    }
}
