//! The Prometheus endpoint on the metrics listener.

use http::StatusCode;
use tonic::body::Body;

use super::landing::{not_found, response};
use crate::metrics::Metrics;

pub fn handle(metrics: &Metrics, path: &str) -> http::Response<Body> {
    match path {
        "/metrics" => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => not_found(),
    }
}
