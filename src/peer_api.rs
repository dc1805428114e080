//! The replica-to-replica endpoint as both of its sides know it: the server side is a route
//! (`routes`, `handlers::blobs::peer`), the client side `cluster::peer`. Neither imports the
//! other; both take the endpoint's names from here.

/// The path under which a replica serves the blobs it holds or is downloading:
/// `<advertise>/_pullthrough/peer/blobs/<digest>`.
pub const BLOBS_PATH: &str = "/_pullthrough/peer/blobs/";

/// The header that carries the cluster secret between replicas.
pub const SECRET_HEADER: &str = "pullthrough-cluster-secret";
