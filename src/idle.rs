//! The idle timeout of a streamed body, whichever tier sends it: a body that stays silent for
//! its limit ends with an error instead of holding its reader forever.

use std::time::Duration;

use futures_util::stream::{BoxStream, StreamExt};

/// `items` ending with `timed_out()` once nothing arrives for `limit`, and ending after its
/// first error.
pub fn idle_timeout<'a, T, E>(
    items: BoxStream<'a, Result<T, E>>,
    limit: Duration,
    timed_out: impl Fn() -> E + Send + Sync + 'a,
) -> BoxStream<'a, Result<T, E>>
where
    T: Send + 'a,
    E: Send + 'a,
{
    let timed_out = std::sync::Arc::new(timed_out);
    futures_util::stream::unfold(Some(items), move |items| {
        let timed_out = timed_out.clone();
        async move {
            let mut items = items?;
            match tokio::time::timeout(limit, items.next()).await {
                Ok(None) => None,
                Ok(Some(Ok(item))) => Some((Ok(item), Some(items))),
                Ok(Some(Err(e))) => Some((Err(e), None)),
                Err(_) => Some((Err(timed_out()), None)),
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_ends_with_the_timeout_error() {
        let items = futures_util::stream::iter([Ok::<u8, &str>(1)])
            .chain(futures_util::stream::pending())
            .boxed();
        let got: Vec<_> = idle_timeout(items, Duration::from_secs(5), || "silent")
            .collect()
            .await;
        assert_eq!(got, [Ok(1), Err("silent")]);
    }
}
