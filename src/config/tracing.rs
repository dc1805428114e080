//! `[tracing]`: OpenTelemetry traces of requests, sent over OTLP/HTTP.

use serde::{Deserialize, Serialize};
use url::Url;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/HTTP (protobuf) collector to send traces to, e.g. `"http://collector:4318"`
    /// (spans go to its `/v1/traces`). Default: none, and then the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` environment variable, if set; with neither, tracing is off
    /// and costs requests nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<Url>,
    /// The share of requests without a sampled parent that are traced, from 0 to 1. A request
    /// carrying a W3C `traceparent` follows its caller's decision. Default: 1.0 (every one).
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}
