//! Content bound to repositories: cached bytes are answered under a repository only once the
//! upstream has served or confirmed that digest for it (see `store::links`). An unlinked
//! digest costs one upstream `HEAD` under the asking repository (not a counted pull on Docker
//! Hub); a `404` or a refusal there is the answer, and no cached byte goes out.

use super::{Error, Mirror, Probe, Target};
use crate::oci::{Digest, Reference};
use crate::outcome::ObjectKind;
use crate::upstream;

impl Mirror {
    /// Records that the upstream served `digest` for `target`'s repository, and shares a new
    /// link with the other replicas.
    pub(super) async fn link(&self, target: &Target, digest: &Digest) {
        let (registry, repo) = (target.registry(), &target.repo);
        if self.tiers.local.links.add(registry, repo, digest).await {
            Box::pin(self.share_link(registry, repo, digest)).await;
        }
    }

    /// Makes sure `digest` may be answered under `target`'s repository: linked already (here or
    /// by another replica), or confirmed now with an upstream `HEAD` and linked.
    pub(super) async fn confirm_link(
        &self,
        target: &Target,
        digest: &Digest,
        kind: ObjectKind,
    ) -> Result<(), Error> {
        if self
            .tiers
            .local
            .links
            .contains(target.registry(), &target.repo, digest)
        {
            return Ok(());
        }
        // Boxed: inline, the upstream confirmation's state would sit in every hit's future.
        Box::pin(self.confirm_link_upstream(target, digest, kind)).await
    }

    /// [`Mirror::confirm_link`] for a digest not linked on this replica.
    async fn confirm_link_upstream(
        &self,
        target: &Target,
        digest: &Digest,
        kind: ObjectKind,
    ) -> Result<(), Error> {
        if self
            .fleet_link(target.registry(), &target.repo, digest)
            .await
        {
            self.tiers
                .local
                .links
                .add(target.registry(), &target.repo, digest)
                .await;
            return Ok(());
        }
        let reference;
        let probe = match kind {
            ObjectKind::Blob => Probe::Blob(digest),
            ObjectKind::Manifest => {
                reference = Reference::Digest(digest.clone());
                Probe::Manifest(&reference)
            }
        };
        let confirmed = probe.ask(target, &target.caller).await;
        match confirmed {
            Ok(()) => {
                self.link(target, digest).await;
                Ok(())
            }
            Err(
                upstream::Error::NotFound { .. }
                | upstream::Error::Unauthorized { .. }
                | upstream::Error::Denied { .. },
            ) => {
                // The access line records the 404; this says why.
                tracing::debug!(
                    upstream = %target.registry(), repo = %target.repo, %digest, kind = kind.as_str(),
                    "cached content refused: the upstream does not serve it for this repository"
                );
                Err(Error::NotInRepository { kind })
            }
            Err(e) => Err(e.into()),
        }
    }
}
