//! A time limit that is cheap to move.

use std::time::Duration;

/// The time limit elapsed.
pub(super) struct Elapsed;

/// A time limit that costs little to move later, as every request does: the timer is set
/// again only when it fires before the limit (which moved since), or the limit moves before
/// it. A timer per request cost more than parsing the request.
pub(super) struct Deadline {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the timer fires.
    armed: tokio::time::Instant,
    /// The limit.
    at: tokio::time::Instant,
}

impl Deadline {
    pub(super) fn new() -> Deadline {
        // Not registered with the runtime's timers until first polled.
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(far)),
            armed: far,
            at: far,
        }
    }

    /// `fut`, unless it takes longer than `limit`.
    pub(super) async fn within<F: std::future::Future>(
        &mut self,
        limit: Duration,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        self.at = tokio::time::Instant::now() + limit;
        if self.at < self.armed {
            self.armed = self.at;
            self.sleep.as_mut().reset(self.at);
        }
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
                return std::task::Poll::Ready(Ok(v));
            }
            while self.sleep.as_mut().poll(cx).is_ready() {
                if self.armed >= self.at {
                    return std::task::Poll::Ready(Err(Elapsed));
                }
                self.armed = self.at;
                self.sleep.as_mut().reset(self.at);
            }
            std::task::Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_deadline_moved_later_still_fires_at_the_latest_limit() {
        let mut d = Deadline::new();
        let quick = tokio::time::sleep(Duration::from_millis(1));
        assert!(d.within(Duration::from_millis(20), quick).await.is_ok());
        // The timer is still set for the first limit: it fires early here and is set again.
        let slower = tokio::time::sleep(Duration::from_millis(60));
        assert!(d.within(Duration::from_secs(5), slower).await.is_ok());
        let never = std::future::pending::<()>();
        let started = Instant::now();
        assert!(d.within(Duration::from_millis(50), never).await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(50));
        // An earlier limit than the timer's sets it sooner.
        let mut d = Deadline::new();
        let never = std::future::pending::<()>();
        assert!(d.within(Duration::from_secs(3600), async {}).await.is_ok());
        assert!(d.within(Duration::from_millis(30), never).await.is_err());
    }
}
