//! The pull budget of an upstream as `warm` reads it before spending counted pulls.

use super::{Error, Mirror};

/// An upstream's remaining counted pulls, as its latest response said, and the configured
/// reserve (`budget_reserve`) that pulls the mirror can avoid should not eat into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullBudget {
    pub remaining: u64,
    pub reserve: u64,
}

impl Mirror {
    /// The budget of the upstream for `registry`; `None` until it has reported one (unlimited
    /// accounts never do).
    pub fn budget(&self, registry: &str) -> Result<Option<PullBudget>, Error> {
        let registry = self.routing.registry_for(Some(registry))?;
        let upstream = self
            .upstreams
            .get(registry)
            .ok_or_else(|| Error::NotMirrored(registry.to_owned()))?;
        Ok(upstream.budget().map(|b| PullBudget {
            remaining: b.remaining,
            reserve: upstream.config().budget_reserve,
        }))
    }
}
