//! The outside channels: email over SMTP and SMS through an HTTP webhook.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("building the email: {0}")]
    Build(String),
    #[error("SMTP: {0}")]
    Smtp(String),
    #[error("SMS webhook: {0}")]
    Webhook(String),
}

#[derive(Clone)]
pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl Email {
    /// Plain SMTP to `host:port` (a local relay or a test server); no TLS in this build.
    pub fn new(host: &str, port: u16, from: &str, timeout: Duration) -> Result<Email, SendError> {
        let from = from
            .parse()
            .map_err(|e| SendError::Build(format!("smtp_from `{from}`: {e}")))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .build();
        Ok(Email { transport, from })
    }

    /// Sends one email; `message_id` makes a resend after a crash recognisable as the same mail.
    pub async fn send(
        &self,
        to: &str,
        subject: &str,
        body: &str,
        message_id: &str,
    ) -> Result<(), SendError> {
        let to = to
            .parse()
            .map_err(|e| SendError::Build(format!("recipient `{to}`: {e}")))?;
        let msg = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{message_id}@shopverse>")))
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_owned())
            .map_err(|e| SendError::Build(e.to_string()))?;
        self.transport
            .send(msg)
            .await
            .map_err(|e| SendError::Smtp(e.to_string()))?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct Sms {
    client: Client<HttpConnector, Full<Bytes>>,
    url: hyper::Uri,
    timeout: Duration,
}

impl Sms {
    /// Posts `{"id", "to", "text"}` as JSON to `url` (http only in this build).
    pub fn new(url: &str, timeout: Duration) -> Result<Sms, SendError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| SendError::Webhook(format!("url `{url}`: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(SendError::Webhook(format!(
                "url `{url}`: only http:// is supported in this build"
            )));
        }
        Ok(Sms {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url: uri,
            timeout,
        })
    }

    pub async fn send(&self, id: &str, to: &str, text: &str) -> Result<(), SendError> {
        let body = serde_json::json!({ "id": id, "to": to, "text": text }).to_string();
        let req = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", id)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Webhook(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| {
                SendError::Webhook(format!("no answer within {} ms", self.timeout.as_millis()))
            })?
            .map_err(|e| SendError::Webhook(e.to_string()))?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if !status.is_success() {
            return Err(SendError::Webhook(format!("answered {status}")));
        }
        Ok(())
    }
}
