//! Who is in the cluster: this replica announces itself every [`super::HEARTBEAT`] (see
//! [`Cluster::heartbeat`]) and keeps the live members it was answered with, for the status
//! page and the `cluster_members` gauge.

use std::sync::{Arc, Mutex};

use super::Cluster;
use crate::clock::Clock;
use crate::sync::lock;

pub struct Members {
    cluster: Arc<Cluster>,
    clock: Clock,
    /// The advertise URLs of the live members, sorted, as of the last answered heartbeat.
    live: Mutex<Vec<String>>,
}

impl Members {
    pub fn new(cluster: Arc<Cluster>, clock: Clock) -> Members {
        Members {
            cluster,
            clock,
            live: Mutex::new(Vec::new()),
        }
    }

    /// One heartbeat. While the coordinator does not answer, the last list stays (the status
    /// page shows the coordinator down beside it).
    pub async fn heartbeat(&self) {
        if let Some(members) = self.cluster.heartbeat(self.clock.now()).await {
            *lock(&self.live) = members;
        }
    }

    pub fn live(&self) -> Vec<String> {
        lock(&self.live).clone()
    }
}
