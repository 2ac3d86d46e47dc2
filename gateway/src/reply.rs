//! The answers the gateway writes itself: one JSON error shape, the gRPC status of each
//! refusal, and the headers every answer carries.

use bytes::Bytes;
use http::StatusCode;
use tonic::Code;

use crate::h1::pool;

/// The HTTP status for a gRPC status code (the table Envoy and grpc-gateway use).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response the gateway writes itself.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
    pub(crate) headers: Vec<(&'static str, String)>,
    /// For an error: its gRPC code and message, so a gRPC caller gets the same refusal.
    pub(crate) grpc: Option<(Code, String)>,
}

impl Reply {
    pub(crate) fn json(status: StatusCode, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body: Bytes::from(body),
            headers: Vec::new(),
            grpc: None,
        }
    }

    /// The one error shape: `{"code", "message", "details"}`.
    pub(crate) fn error(
        status: StatusCode,
        code: Code,
        message: &str,
        details: serde_json::Value,
    ) -> Reply {
        let body =
            serde_json::json!({ "code": code_name(code), "message": message, "details": details });
        Reply {
            grpc: Some((code, message.to_owned())),
            ..Reply::json(status, body.to_string().into_bytes())
        }
    }

    /// A request the [policy](crate::policy) refuses, in the one error shape. The connection
    /// closes after it: what follows a refused head cannot be trusted to be the next request.
    pub(crate) fn refused(r: crate::policy::Refusal) -> Reply {
        let code = match r.status {
            StatusCode::NOT_IMPLEMENTED => Code::Unimplemented,
            StatusCode::REQUEST_TIMEOUT => Code::DeadlineExceeded,
            // 400, and 413 and 431 as the REST routes have always named them.
            _ => Code::InvalidArgument,
        };
        Reply::error(r.status, code, r.reason, serde_json::json!([])).with("connection", "close")
    }

    /// Whether the connection closes after this reply.
    pub(crate) fn closes(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, v)| *k == "connection" && v.eq_ignore_ascii_case("close"))
    }

    /// The gRPC status of this refusal.
    pub(crate) fn into_grpc(self) -> (Code, String) {
        self.grpc.unwrap_or((Code::Unknown, String::new()))
    }

    pub(crate) fn with(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// A pass-through upstream whose configured address does not resolve: 502.
    pub(crate) fn upstream_address(e: &impl std::fmt::Display) -> Reply {
        Reply::error(
            StatusCode::BAD_GATEWAY,
            Code::Unavailable,
            &format!("upstream address: {e}"),
            serde_json::json!([]),
        )
    }

    /// The answer to a pass-through request that failed before its response began, on
    /// either HTTP/1 path.
    pub(crate) fn for_failure(e: pool::Failure, route: &str) -> Reply {
        match e {
            pool::Failure::Timeout { .. } => {
                tracing::warn!(route, "{e}");
                Reply::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    Code::DeadlineExceeded,
                    "the upstream did not answer in time",
                    serde_json::json!([]),
                )
            }
            pool::Failure::TooLarge { max } => Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidArgument,
                &format!("the request body is larger than {max} bytes"),
                serde_json::json!([]),
            )
            .with("connection", "close"),
            pool::Failure::ClientTimeout => Reply::error(
                StatusCode::REQUEST_TIMEOUT,
                Code::DeadlineExceeded,
                "the request body did not arrive in time",
                serde_json::json!([]),
            )
            .with("connection", "close"),
            pool::Failure::Client(e) => Reply::error(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                &format!("reading the request body: {e}"),
                serde_json::json!([]),
            ),
            e => {
                tracing::warn!(route, "{e}");
                Reply::error(
                    StatusCode::BAD_GATEWAY,
                    Code::Unavailable,
                    "the upstream is unavailable",
                    serde_json::json!([]),
                )
            }
        }
    }

    /// Status, headers and body as they go out, on either HTTP/1 path.
    pub(crate) fn into_response(
        self,
        request_id: &str,
        cors: Option<&str>,
    ) -> (StatusCode, Vec<(&'static str, String)>, Bytes) {
        let mut headers = Vec::with_capacity(10 + self.headers.len());
        headers.push(("content-type", "application/json".to_owned()));
        // A 204 has no body and no length; a 304's length would be the full answer's
        // (RFC 9110 8.6, 15.4.5), which this reply does not carry: none.
        if !matches!(self.status.as_u16(), 204 | 304) {
            headers.push(("content-length", self.body.len().to_string()));
        }
        headers.push(("x-request-id", request_id.to_owned()));
        headers.extend(SECURITY_HEADERS.map(|(k, v)| (k, v.to_owned())));
        if !self.headers.iter().any(|(k, _)| *k == "cache-control") {
            headers.push(("cache-control", "no-store".to_owned()));
        }
        let preflight = self.status == StatusCode::NO_CONTENT;
        headers.extend(self.headers);
        if let Some(origin) = cors
            && !preflight
        {
            headers.push(("access-control-allow-origin", origin.to_owned()));
            headers.push((
                "access-control-expose-headers",
                "x-request-id, retry-after, ratelimit, ratelimit-policy".to_owned(),
            ));
            headers.push(("vary", "origin".to_owned()));
        }
        (self.status, headers, self.body)
    }
}

/// Whether an `If-None-Match` value names `etag` (or is `*`): the client has it, a 304.
pub(crate) fn etag_matches(if_none_match: Option<&str>, etag: &str) -> bool {
    if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// Sent with every JSON answer, after `x-request-id`.
pub(crate) const SECURITY_HEADERS: [(&str, &str); 3] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
];

/// `00`, `01`, ... `99`: two digits per division.
const DIGIT_PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// `n`'s decimal digits, written into the end of `digits`.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    &digits[i..]
}

#[cfg(test)]
mod tests {
    use super::{Reply, StatusCode};

    #[test]
    fn decimals_read_as_format_would_write_them() {
        let mut n = 1u64;
        let mut cases = vec![0, 9, 10, 99, 100, 101, 999, 1000, u64::MAX, u64::MAX - 1];
        while n < u64::MAX / 7 {
            cases.extend([n, n - 1, n + 1]);
            n = n * 7 + 3;
        }
        for n in cases {
            let got = super::decimal(n, &mut [0; 20]).to_vec();
            assert_eq!(String::from_utf8(got).unwrap(), n.to_string());
        }
    }

    #[test]
    fn a_304_and_a_204_carry_no_length() {
        for status in [StatusCode::NOT_MODIFIED, StatusCode::NO_CONTENT] {
            let (_, headers, body) = Reply::json(status, Vec::new()).into_response("id", None);
            assert!(body.is_empty());
            assert!(
                !headers.iter().any(|(k, _)| *k == "content-length"),
                "{status}: {headers:?}"
            );
        }
        let (_, headers, _) = Reply::json(StatusCode::OK, b"{}".to_vec()).into_response("id", None);
        assert!(headers.contains(&("content-length", "2".to_owned())));
    }
}
