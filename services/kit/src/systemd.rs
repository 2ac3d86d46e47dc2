//! The systemd service protocol (`sd_notify`): READY when the process serves, STOPPING when it
//! begins to shut down, and watchdog pings while it runs. Without `NOTIFY_SOCKET` (not under
//! systemd) every call is a no-op.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

fn socket_path() -> Option<String> {
    std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Sends `state` (e.g. `READY=1`) to systemd. Errors are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = socket_path() else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "sd_notify: no socket");
            return;
        }
    };
    let sent = if let Some(name) = path.strip_prefix('@') {
        // An abstract socket (Linux).
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            Ok(0)
        }
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Reports READY and, if systemd wants a watchdog, pings it at half its interval until
/// `shutdown`, then reports STOPPING.
pub fn ready(shutdown: CancellationToken, status: &str) {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
    let every = watchdog_interval().map(|d| d / 2);
    tokio::spawn(async move {
        match every {
            Some(every) => loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => notify("WATCHDOG=1"),
                }
            },
            None => shutdown.cancelled().await,
        }
        notify("STOPPING=1\nSTATUS=stopping");
    });
}
