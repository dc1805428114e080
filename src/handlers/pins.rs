//! `/_pullthrough/pins`, the admin API of `pullthrough cache pin|unpin --mirror`: `GET` lists
//! the pins, `POST ?image=REF&image=…[&platform=os/arch…]` pins, `DELETE ?image=REF&…`
//! unpins. Admitted as `/metrics` and the status are (the client access control); answers
//! with what is pinned then, or the registry's JSON error.

use http::{Method, Response, StatusCode};

use super::body::Body;
use super::error::{ApiError, Code};
use crate::config::PinConfig;
use crate::image::{ImageRef, Platform};
use crate::mirror::Housekeeping;
use crate::store::pins::{PinError, PinSummary};

pub async fn handle(
    hk: &Housekeeping,
    method: &Method,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    if *method == Method::GET || *method == Method::HEAD {
        return Ok(answer(&hk.pins().await, *method == Method::HEAD));
    }
    let (images, platforms) = parse(query)?;
    if images.is_empty() {
        return Err(bad("name at least one image: ?image=REFERENCE"));
    }
    let done = if *method == Method::POST {
        let add = images
            .into_iter()
            .map(|i| PinConfig::image(i, platforms.clone()))
            .collect();
        hk.pin(add).await
    } else if *method == Method::DELETE {
        hk.unpin(images).await
    } else {
        return Err(ApiError::unsupported());
    };
    match done {
        Ok(summary) => Ok(answer(&summary, false)),
        Err(e) => Err(refused(&e)),
    }
}

fn answer(summary: &PinSummary, head: bool) -> Response<Body> {
    let bytes = serde_json::to_vec(summary).unwrap_or_default();
    super::json(bytes, head)
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, Code::NameInvalid, message)
}

/// A refusal says why, with its figures; a store that cannot write says no more than that.
fn refused(e: &PinError) -> ApiError {
    match e {
        PinError::OverBound { .. } | PinError::PinnedByConfig(_) => {
            ApiError::new(StatusCode::CONFLICT, Code::Denied, e.to_string())
        }
        PinError::NotPinned(_) => {
            ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, e.to_string())
        }
        PinError::Io(cause) => {
            tracing::error!(error = %cause, "cannot change the pins");
            ApiError::internal()
        }
    }
}

/// The `image` and `platform` parameters, each repeatable; an unknown one is refused.
fn parse(query: Option<&str>) -> Result<(Vec<ImageRef>, Vec<Platform>), ApiError> {
    let (mut images, mut platforms) = (Vec::new(), Vec::new());
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "image" => images.push(
                value
                    .parse()
                    .map_err(|e: crate::image::ParseError| bad(e.to_string()))?,
            ),
            "platform" => platforms.push(
                value
                    .parse()
                    .map_err(|e: crate::image::ParseError| bad(e.to_string()))?,
            ),
            other => return Err(bad(format!("unknown parameter {other:?}: image, platform"))),
        }
    }
    Ok((images, platforms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_platforms_come_from_the_query() {
        let (images, platforms) = parse(Some(
            "image=alpine%3A3.20&image=ghcr.io/org/app:1&platform=linux/amd64",
        ))
        .unwrap();
        assert_eq!(images[0].to_string(), "docker.io/library/alpine:3.20");
        assert_eq!(images[1].registry(), "ghcr.io");
        assert_eq!(platforms[0].to_string(), "linux/amd64");
        let e = parse(Some("image=Alpine")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("Alpine"), "{}", e.message);
        assert!(parse(Some("digest=sha256:x"))
            .unwrap_err()
            .message
            .contains("unknown parameter"));
    }
}
