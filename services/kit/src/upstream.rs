//! Calling another service at a list of endpoints (`http://a:50052,http://b:50052`): requests
//! are balanced over the replicas whose gRPC health check says SERVING; a replica that stops
//! answering is taken out within a check interval and put back when it answers again. A single
//! endpoint this process serves itself is called in-process ([`crate::link`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::link::{Link, LocalServices};

/// How often each replica's health is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a replica has to answer its health check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no endpoint given")]
    Empty,
    #[error("`{url}` is not a valid endpoint: {reason}")]
    Invalid { url: String, reason: String },
}

/// Whether `service` on `channel` answers SERVING to a gRPC health check (`grpc.health.v1`)
/// within `timeout`; an empty `service` asks about the server as a whole.
pub async fn is_serving(link: impl Into<Link>, service: &str, timeout: Duration) -> bool {
    let mut client = HealthClient::new(link.into());
    let check = client.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    matches!(
        tokio::time::timeout(timeout, check).await,
        Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving
    )
}

/// The URLs of a comma-separated list, checked.
pub fn parse_list(urls: &str) -> Result<Vec<String>, UpstreamError> {
    let list: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if list.is_empty() {
        return Err(UpstreamError::Empty);
    }
    for u in &list {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(UpstreamError::Invalid {
                url: u.clone(),
                reason: "must be an http:// or https:// URL".into(),
            });
        }
        Endpoint::from_shared(u.clone()).map_err(|e| UpstreamError::Invalid {
            url: u.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(list)
}

fn endpoint(url: &str, timeout: Duration) -> Result<Endpoint, UpstreamError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| UpstreamError::Invalid {
            url: url.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .tcp_nodelay(true))
}

/// A link to `service` at `urls`. One URL: in-process if `local` serves it, else a plain lazy
/// channel. Several: a balanced channel fed by a health-check task that runs until `shutdown`.
pub fn balanced(
    urls: &str,
    service: &'static str,
    timeout: Duration,
    local: &LocalServices,
    shutdown: CancellationToken,
) -> Result<Link, UpstreamError> {
    let list = parse_list(urls)?;
    if let [one] = list.as_slice() {
        if let Some(link) = local.link(one, timeout) {
            return Ok(link);
        }
        return Ok(endpoint(one, timeout)?.connect_lazy().into());
    }
    let endpoints = list
        .iter()
        .map(|u| endpoint(u, timeout))
        .collect::<Result<Vec<_>, _>>()?;
    let (channel, tx) = Channel::balance_channel::<String>(list.len() * 2 + 4);
    tokio::spawn(async move {
        // Each replica starts in: calls go out at once, and the first check takes out the dead.
        let mut probes: Vec<(String, Endpoint, Channel, bool)> = list
            .into_iter()
            .zip(endpoints)
            .map(|(u, e)| {
                let probe = e.clone().connect_lazy();
                (u, e, probe, false)
            })
            .collect();
        for (u, e, _, inside) in &mut probes {
            if tx.send(Change::Insert(u.clone(), e.clone())).await.is_err() {
                return;
            }
            *inside = true;
        }
        loop {
            for i in 0..probes.len() {
                let others_inside = probes.iter().enumerate().any(|(j, p)| j != i && p.3);
                let (url, ep, probe, inside) = &mut probes[i];
                let healthy = is_serving(probe.clone(), service, PROBE_TIMEOUT).await;
                let change = match (healthy, *inside) {
                    (true, false) => {
                        tracing::info!(upstream = %url, service, "replica healthy again; back in the pool");
                        Change::Insert(url.clone(), ep.clone())
                    }
                    // The last one stays: with none left a call would wait instead of failing.
                    (false, true) if others_inside => {
                        tracing::warn!(upstream = %url, service, "replica failed its health check; out of the pool");
                        Change::Remove(url.clone())
                    }
                    _ => continue,
                };
                if tx.send(change).await.is_err() {
                    return;
                }
                *inside = healthy;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
    });
    Ok(channel.into())
}
